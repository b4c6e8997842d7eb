//! The wrapper of `kernels/sampling.cu`: each row's parameters and
//! adjustments packed into one upload, one block per row, and only the
//! token ids copied back.

use super::ops::check;
use super::{grid, wait_for, CudaBackend, CudaTensor};
use crate::backend::Result;
use crate::sampling::RowSampling;
use cudarc::driver::PushKernelArg;

/// Threads per row (`__launch_bounds__` of `sample_f32`).
const SAMPLE_THREADS: u32 = 512;
/// Words of a `RowParams` and of an `Adjustment` in the kernel.
const PARAM_WORDS: usize = 8;
const ADJUSTMENT_WORDS: usize = 3;

/// The rows' parameters `[rows, PARAM_WORDS]`, then all their adjustments
/// `[total, ADJUSTMENT_WORDS]`, each row naming its range of them.
fn pack(rows: &[RowSampling]) -> Vec<u32> {
    let total: usize = rows.iter().map(|r| r.adjustments.len()).sum();
    let mut words = Vec::with_capacity(rows.len() * PARAM_WORDS + total * ADJUSTMENT_WORDS);
    let mut begin = 0;
    for r in rows {
        let end = begin + r.adjustments.len() as u32;
        words.extend([
            r.temperature.to_bits(),
            r.top_k,
            r.top_p.to_bits(),
            r.min_p.to_bits(),
            r.repetition_penalty.to_bits(),
            r.uniform.to_bits(),
            begin,
            end,
        ]);
        begin = end;
    }
    for a in rows.iter().flat_map(|r| &r.adjustments) {
        words.extend([a.token, a.shift.to_bits(), a.repeated as u32]);
    }
    words
}

impl CudaBackend {
    pub(super) fn sample_rows(&self, logits: &mut CudaTensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
        check(rows.len() == logits.rows, || {
            format!("sample: {} rows of sampling for {} rows of logits", rows.len(), logits.rows)
        })?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let words = self.upload(&pack(rows), "sampling parameters")?;
        let params = words.slice(..rows.len() * PARAM_WORDS);
        let adjustments = words.slice(rows.len() * PARAM_WORDS..);
        let mut out = self.alloc_for_kernel::<u32>(rows.len(), "sampled ids")?;
        let vocab = logits.cols as i32;
        let mut args = self.stream.launch_builder(self.function("sample_f32"));
        args.arg(&mut out).arg(&mut logits.data).arg(&params).arg(&adjustments).arg(&vocab);
        self.launch("sample_f32", args, grid(rows.len(), SAMPLE_THREADS, 0))?;
        let mut ids = vec![0; rows.len()];
        wait_for("copying the sampled ids", || {
            self.stream.memcpy_dtoh(&out.slice(..rows.len()), ids.as_mut_slice())?;
            self.stream.synchronize()
        })?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::LogitAdjustment;

    #[test]
    fn rows_name_their_ranges_of_the_packed_adjustments() {
        let adjust = |token| LogitAdjustment {
            token,
            shift: -1.0,
            repeated: true,
        };
        let rows = [
            RowSampling {
                adjustments: vec![adjust(3), adjust(9)],
                ..RowSampling::greedy()
            },
            RowSampling {
                temperature: 0.7,
                top_k: 5,
                uniform: 0.25,
                adjustments: vec![adjust(4)],
                ..RowSampling::greedy()
            },
        ];
        let words = pack(&rows);
        assert_eq!(words.len(), 2 * PARAM_WORDS + 3 * ADJUSTMENT_WORDS);
        assert_eq!(words[6..8], [0, 2]);
        assert_eq!(
            words[PARAM_WORDS..PARAM_WORDS + 8],
            [0.7f32.to_bits(), 5, 1f32.to_bits(), 0, 1f32.to_bits(), 0.25f32.to_bits(), 2, 3]
        );
        let third = 2 * PARAM_WORDS + 2 * ADJUSTMENT_WORDS;
        assert_eq!(words[third..], [4, (-1f32).to_bits(), 1]);
    }
}
