//! The wrapper of `kernels/sampling.cu`: each row's parameters and
//! adjustments packed into the step's inputs, one block per row (several
//! for a greedy row, one whose top-k keeps few, or one with no top-k, in a
//! step of at most half as many rows as the GPU has SMs), and only the
//! token ids copied back.

use super::ops::check;
use super::timeline::StepSpan;
use super::{alloc_error, driver_error, grid, wait_for, CudaBackend, CudaStep, CudaTensor, PREVIOUS_ROWS};
use crate::backend::Result;
use crate::sampling::{LogitAdjustment, RowSampling};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use std::sync::Arc;

/// Threads per row (`__launch_bounds__` of `sample_f32`).
const SAMPLE_THREADS: u32 = 512;
/// Words of a `RowParams` and of an adjustment in the kernel (at most:
/// see [`adjustment_width`]).
pub const PARAM_WORDS: usize = 12;
pub const ADJUSTMENT_WORDS: usize = 3;
/// A launch of rows that leave each row two SMs or more has as many blocks
/// a row as there are SMs for it, up to `SPLIT_BLOCKS` (the kernel's too):
/// one SM reads a 151,936-id row in ≈ 5 µs a pass. A greedy row splits
/// over all of them, as does a drawn row with no top-k (where its
/// vocabulary fits the kernel's marks of adjusted ids, `LISTED_WORDS`: a
/// Qwen2 row's does); a drawn row whose top-k keeps at most
/// `CANDIDATES / 2` over as many as leave room for each part's k best
/// among the row's `CANDIDATES` (the kernel's).
const SPLIT_BLOCKS: usize = 32;
const CANDIDATES: usize = 512;
/// A row's `coming` when it has none (`NO_COMING` in the kernel).
const NO_COMING: u32 = u32::MAX;
/// The bit of an adjustment's third word that marks it repeated; the
/// others hold its generated count.
const REPEATED: u32 = 1 << 31;

/// The words each of a row's adjustments takes: its token alone where
/// every one is just repeated (no bias, no count: HF's repetition penalty
/// alone, Qwen2.5's default), else token, bias and counts.
fn adjustment_width(row: &RowSampling) -> u32 {
    let plain = |a: &LogitAdjustment| a.repeated && a.generated == 0 && a.bias.to_bits() == 0;
    match row.adjustments.iter().all(plain) {
        true => 1,
        false => ADJUSTMENT_WORDS as u32,
    }
}

/// Appends the parameters of `rows` (`[capacity, PARAM_WORDS]`, zeros where
/// there are no rows), then all their adjustments, each row naming its
/// range of words and how many words an adjustment takes.
pub fn pack_rows(rows: &[RowSampling], capacity: usize, words: &mut Vec<u32>) {
    if rows.is_empty() {
        words.resize(words.len() + capacity * PARAM_WORDS, 0);
        return;
    }
    let mut begin = 0;
    for r in rows {
        let width = adjustment_width(r);
        let end = begin + r.adjustments.len() as u32 * width;
        words.extend([
            r.temperature.to_bits(),
            r.top_k,
            r.top_p.to_bits(),
            r.min_p.to_bits(),
            r.repetition_penalty.to_bits(),
            r.presence_penalty.to_bits(),
            r.frequency_penalty.to_bits(),
            r.uniform.to_bits(),
            begin,
            end,
            width,
            r.coming.unwrap_or(NO_COMING),
        ]);
        begin = end;
    }
    for r in rows {
        match adjustment_width(r) {
            1 => words.extend(r.adjustments.iter().map(|a| a.token)),
            _ => {
                for a in &r.adjustments {
                    let counts = a.generated.min(REPEATED - 1) | if a.repeated { REPEATED } else { 0 };
                    words.extend([a.token, a.bias.to_bits(), counts]);
                }
            }
        }
    }
}

/// The most rows a launch splits on a GPU of `multiprocessors` SMs: as
/// many as leave each row two.
fn most_split_rows(multiprocessors: usize) -> usize {
    multiprocessors / 2
}

/// The blocks of each of `rows` sampled rows on a GPU of `multiprocessors`
/// SMs: the SMs a row has where it has two or more, else one.
fn blocks_a_row(rows: usize, multiprocessors: usize) -> usize {
    match rows {
        0 => 1,
        _ if rows <= most_split_rows(multiprocessors) => (multiprocessors / rows).min(SPLIT_BLOCKS),
        _ => 1,
    }
}

/// What the blocks of a split row leave for the last of them, for the
/// most rows that split ([`most_split_rows`]): each block's (id, logit) pairs
/// (`[rows, CANDIDATES, 2]` words: its argmax, or its k best; or its kept
/// mass and band sums) and how many (`[rows, SPLIT_BLOCKS]`), and a count
/// a row of the blocks done (zeros; the last sets it back).
pub(super) struct SplitRows {
    parts: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    arrivals: CudaSlice<u32>,
}

impl SplitRows {
    pub fn new(stream: &Arc<CudaStream>, multiprocessors: usize) -> Result<Self> {
        let rows = most_split_rows(multiprocessors).max(1);
        let words = |what: &'static str, n: usize| {
            stream
                .alloc_zeros::<u32>(n)
                .map_err(alloc_error(what, n * std::mem::size_of::<u32>()))
        };
        Ok(SplitRows {
            parts: words("split sampling rows' parts", rows * CANDIDATES * 2)?,
            counts: words("split sampling rows' part sizes", rows * SPLIT_BLOCKS)?,
            arrivals: words("split sampling rows' counts", rows)?,
        })
    }
}

impl CudaBackend {
    /// Each row's blocks ([`blocks_a_row`]) pick its token into the step's
    /// sampled ids (and the backend's previous-sample tokens).
    pub(super) fn sample_rows(&self, logits: &mut CudaTensor, step: &mut CudaStep) -> Result<()> {
        check(step.samples() && step.rows() == logits.rows, || {
            format!(
                "sample: a step of {} rows ({}) for {} rows of logits",
                step.rows(),
                if step.samples() { "with sampling" } else { "without sampling" },
                logits.rows
            )
        })?;
        let (rows, vocab, kept) = (step.rows(), logits.cols as i32, PREVIOUS_ROWS as i32);
        let (params, adjustments, out) = step.sampling_args();
        let mut args = self.kernel_args("sample_f32");
        args.arg(out).arg(&self.previous).arg(&self.coming).arg(&kept);
        args.out(logits.data_mut()).arg(&params).arg(&adjustments);
        let split = &self.split_rows;
        args.arg(&split.parts).arg(&split.counts).arg(&split.arrivals).arg(&vocab);
        let mut config = grid(rows, SAMPLE_THREADS, 0);
        config.grid_dim.1 = blocks_a_row(rows, self.multiprocessors) as u32;
        self.launch("sample_f32", args, config)
    }

    /// Queues the copy of a step's sampled ids into page-locked host
    /// memory (a buffer from the backend's pool, with the event that marks
    /// the copy done), so the host need not wait for it yet.
    pub(super) fn start_fetch(&self, step: &CudaStep) -> Result<SampledFetch> {
        let rows = step.rows();
        let reused = self.pinned.lock().expect("the pinned pool is not poisoned").pop();
        let mut fetch = match reused.filter(|f| f.buffer.len() >= rows) {
            Some(fetch) => fetch,
            None => SampledFetch {
                // SAFETY: only the ids a copy has written are read.
                buffer: unsafe {
                    self.stream
                        .context()
                        .alloc_pinned_with_flags::<u32>(rows.max(1).next_power_of_two(), 0)
                }
                .map_err(alloc_error("page-locked sampled ids", rows * 4))?,
                done: self.stream.context().new_event(None).map_err(driver_error("creating an event"))?,
                span: None,
            },
        };
        if rows > 0 {
            let host = fetch.buffer.as_mut_slice().map_err(driver_error("a page-locked buffer"))?;
            let (src, _record) = step.sampled().device_ptr(&self.stream);
            // SAFETY: `host` holds at least `rows` ids and outlives the copy
            // (the fetch owns it until `finish_fetch` has waited).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..rows], src, self.stream.cu_stream()) }
                .map_err(driver_error("copying the sampled ids"))?;
        }
        fetch.done.record(&self.stream).map_err(driver_error("recording a copy"))?;
        fetch.span = self.timeline.end(&self.stream)?;
        Ok(fetch)
    }

    /// Waits for a fetch and returns its first `n` ids; the buffer goes back to the pool.
    pub(super) fn finish_fetch(&self, mut fetch: SampledFetch, n: usize) -> Result<Vec<u32>> {
        wait_for("waiting for the sampled ids", || fetch.done.synchronize())?;
        if let Some(span) = fetch.span.take() {
            self.timeline.collect(span)?;
        }
        let ids = fetch.buffer.as_slice().map_err(driver_error("a page-locked buffer"))?[..n].to_vec();
        self.pinned.lock().expect("the pinned pool is not poisoned").push(fetch);
        Ok(ids)
    }
}

/// Sampled ids being copied to the host (made by `CudaBackend::start_fetch`).
pub struct SampledFetch {
    buffer: PinnedHostSlice<u32>,
    done: CudaEvent,
    /// The step's span on the device, when steps are timed.
    span: Option<StepSpan>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_over_the_sms_they_leave_each_other() {
        assert_eq!(blocks_a_row(1, 132), SPLIT_BLOCKS);
        assert_eq!(blocks_a_row(8, 132), 16);
        assert_eq!(blocks_a_row(64, 132), 2);
        assert_eq!(blocks_a_row(66, 132), 2);
        assert_eq!(blocks_a_row(67, 132), 1);
        assert_eq!(blocks_a_row(1, 1), 1);
        for multiprocessors in [1, 2, 3, 78, 132] {
            // SplitRows holds half the SMs' rows; the split ones must fit.
            let held = multiprocessors / 2;
            for rows in 0..300 {
                let blocks = blocks_a_row(rows, multiprocessors);
                assert!((1..=SPLIT_BLOCKS).contains(&blocks), "{rows} rows on {multiprocessors} SMs");
                assert!(blocks == 1 || (rows <= held && rows * blocks <= multiprocessors));
            }
        }
    }

    #[test]
    fn rows_name_their_ranges_of_the_packed_adjustments() {
        let adjust = |token, generated| LogitAdjustment::from_parts(token, -1.0, generated, true);
        let repeated = |token| LogitAdjustment::from_parts(token, 0.0, 0, true);
        let rows = [
            RowSampling {
                adjustments: vec![adjust(3, 0), adjust(9, 2)],
                ..RowSampling::greedy()
            },
            RowSampling {
                temperature: 0.7,
                top_k: 5,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                uniform: 0.25,
                adjustments: vec![adjust(4, 1)],
                coming: Some(6),
                ..RowSampling::greedy()
            },
            RowSampling {
                repetition_penalty: 1.05,
                adjustments: vec![repeated(2), repeated(8)],
                ..RowSampling::greedy()
            },
        ];
        let mut words = vec![7];
        pack_rows(&rows, rows.len(), &mut words);
        let words = &words[1..];
        assert_eq!(words.len(), 3 * PARAM_WORDS + 3 * ADJUSTMENT_WORDS + 2);
        assert_eq!(words[8..12], [0, 6, 3, NO_COMING]);
        assert_eq!(
            words[PARAM_WORDS..2 * PARAM_WORDS],
            [
                0.7f32.to_bits(),
                5,
                1f32.to_bits(),
                0,
                1f32.to_bits(),
                0.5f32.to_bits(),
                0.25f32.to_bits(),
                0.25f32.to_bits(),
                6,
                9,
                3,
                6
            ]
        );
        assert_eq!(words[2 * PARAM_WORDS + 8..3 * PARAM_WORDS], [9, 11, 1, NO_COMING]);
        let second = 3 * PARAM_WORDS + ADJUSTMENT_WORDS;
        assert_eq!(
            words[second..],
            [9, (-1f32).to_bits(), REPEATED | 2, 4, (-1f32).to_bits(), REPEATED | 1, 2, 8]
        );
    }
}
