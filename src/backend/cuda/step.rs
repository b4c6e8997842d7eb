//! A step's inputs on the device: one buffer of u32 words, filled by one
//! copy per forward, that every kernel reads its part of. A prepared step
//! is sized to its batch; a static one (for a CUDA graph) to a capacity,
//! at an address that stays put while [`CudaBackend::refill`] rewrites it:
//! from page-locked memory, so the copy queues behind the step before
//! without the host waiting, and only the parts in use (a graph's block
//! tables have room for the longest context, a decode step uses a few
//! columns of them).

use super::ops::check;
use super::{alloc_error, driver_error, sampling, wait_for, CudaBackend, PREVIOUS_ROWS};
use crate::backend::{previous_row, BackendError, Result, StepCapacity, StepInputs};
use cudarc::driver::{CudaEvent, CudaSlice, CudaView, DevicePtr, PinnedHostSlice};
use std::ops::Range;

/// Consecutive tokens of one sequence that one block of the attention
/// kernel takes together (`kernels/attention.cu`).
pub const TILE_TOKENS: usize = 8;

/// The words of a step, section after section (`t` tokens, `s` sequences,
/// `b` blocks a sequence, `r` logit rows, `a` adjustments):
/// positions `[t]`, slots `[t]`, each token's sequence `[t]` and position
/// in it `[t]`, attention tiles `[t, 3]` (first token, tokens, sequence;
/// the used ones first), token ids `[t]`, logit rows `[r]`, sampling
/// parameters `[r, PARAM_WORDS]`, adjustments (room for `[a,
/// ADJUSTMENT_WORDS]`; the used words first, a row's a word each where it
/// can), then the block tables `[b, s]`, block by block
/// (word `j·s + i` is block `j` of sequence `i`; 0 past its blocks), so
/// that the blocks in use are a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Positions,
    Slots,
    TokenSeq,
    TokenPos,
    Tiles,
    TokenIds,
    LogitRows,
    Params,
    Adjustments,
    BlockTables,
}

fn offset(c: &StepCapacity, section: Section) -> usize {
    let t = c.tokens;
    let tiles = 4 * t;
    let ids = tiles + 3 * t;
    let rows = ids + t;
    let params = rows + c.rows;
    let adjustments = params + c.rows * sampling::PARAM_WORDS;
    let tables = adjustments + c.adjustments * sampling::ADJUSTMENT_WORDS;
    match section {
        Section::Positions => 0,
        Section::Slots => t,
        Section::TokenSeq => 2 * t,
        Section::TokenPos => 3 * t,
        Section::Tiles => tiles,
        Section::TokenIds => ids,
        Section::LogitRows => rows,
        Section::Params => params,
        Section::Adjustments => adjustments,
        Section::BlockTables => tables,
    }
}

fn words(c: &StepCapacity) -> usize {
    offset(c, Section::BlockTables) + c.seqs * c.max_blocks
}

/// The capacity a batch's inputs need exactly.
pub fn capacity_of(inputs: &StepInputs<'_>) -> StepCapacity {
    StepCapacity {
        tokens: inputs.token_ids.len(),
        seqs: inputs.attn.block_tables.len(),
        max_blocks: inputs.attn.max_blocks().max(1),
        rows: inputs.logit_rows.len(),
        adjustments: inputs.sampling.iter().map(|r| r.adjustments.len()).sum(),
    }
}

/// Page-locked words a static step's buffer is refilled from, and the
/// event that marks the last copy out of them done.
struct Staging {
    host: PinnedHostSlice<u32>,
    copied: CudaEvent,
}

/// A step's inputs on the device, and where the tokens sampled from it land.
pub struct CudaStep {
    buf: CudaSlice<u32>,
    /// A static step's staging words (made on its first refill).
    staging: Option<Staging>,
    /// `[rows]`
    sampled: CudaSlice<u32>,
    capacity: StepCapacity,
    block_size: usize,
    /// Attention tiles in use.
    tiles: usize,
    /// The most tokens a tile holds (1 in a decode step).
    tile_tokens: usize,
    /// The longest context a sequence of the step may have.
    max_context: usize,
    /// Whether the inputs carry a sampling row per logit row.
    samples: bool,
    /// The largest token id known on the host, checked against an
    /// embedding table's rows.
    max_token: u32,
}

impl CudaStep {
    pub fn tokens(&self) -> usize {
        self.capacity.tokens
    }

    pub fn rows(&self) -> usize {
        self.capacity.rows
    }

    pub fn seqs(&self) -> usize {
        self.capacity.seqs
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn samples(&self) -> bool {
        self.samples
    }

    pub fn tiles(&self) -> usize {
        self.tiles
    }

    pub fn tile_tokens(&self) -> usize {
        self.tile_tokens
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn max_token(&self) -> u32 {
        self.max_token
    }

    fn view(&self, section: Section, len: usize) -> CudaView<'_, u32> {
        let start = offset(&self.capacity, section);
        self.buf.slice(start..start + len)
    }

    pub fn positions(&self) -> CudaView<'_, u32> {
        self.view(Section::Positions, self.tokens())
    }

    pub fn slots(&self) -> CudaView<'_, u32> {
        self.view(Section::Slots, self.tokens())
    }

    pub fn token_seq(&self) -> CudaView<'_, u32> {
        self.view(Section::TokenSeq, self.tokens())
    }

    pub fn token_pos(&self) -> CudaView<'_, u32> {
        self.view(Section::TokenPos, self.tokens())
    }

    pub fn block_tables(&self) -> CudaView<'_, u32> {
        self.view(Section::BlockTables, self.capacity.seqs * self.capacity.max_blocks)
    }

    pub fn tile_table(&self) -> CudaView<'_, u32> {
        self.view(Section::Tiles, 3 * self.tiles)
    }

    pub fn token_ids(&self) -> CudaView<'_, u32> {
        self.view(Section::TokenIds, self.tokens())
    }

    pub fn logit_rows(&self) -> CudaView<'_, u32> {
        self.view(Section::LogitRows, self.rows())
    }

    /// What the sampling kernel reads (parameters, adjustments) and writes.
    pub fn sampling_args(&mut self) -> (CudaView<'_, u32>, CudaView<'_, u32>, &mut CudaSlice<u32>) {
        let params = offset(&self.capacity, Section::Params);
        let adjustments = offset(&self.capacity, Section::Adjustments);
        let end = offset(&self.capacity, Section::BlockTables);
        (
            self.buf.slice(params..adjustments),
            self.buf.slice(adjustments..end),
            &mut self.sampled,
        )
    }

    pub fn sampled(&self) -> &CudaSlice<u32> {
        &self.sampled
    }
}

/// The attention tiles of a batch: each sequence's new tokens, in runs of
/// at most [`TILE_TOKENS`], as (first token, tokens, sequence).
fn tiles_of(query_lens: &[usize]) -> Vec<[u32; 3]> {
    let mut tiles = Vec::new();
    let mut first = 0;
    for (s, &q) in query_lens.iter().enumerate() {
        for start in (0..q).step_by(TILE_TOKENS) {
            tiles.push([(first + start) as u32, TILE_TOKENS.min(q - start) as u32, s as u32]);
        }
        first += q;
    }
    tiles
}

/// The most tokens an attention tile of the batch holds.
fn tile_tokens(query_lens: &[usize]) -> usize {
    query_lens.iter().copied().max().unwrap_or(0).min(TILE_TOKENS)
}

/// The largest token id of `ids` known on the host, once the rows of the
/// previous sample that the others name are checked to be among the
/// [`PREVIOUS_ROWS`] the device keeps.
fn max_token(ids: &[u32]) -> Result<u32> {
    let (token, rows) = ids.iter().fold((0, 0), |(token, rows), &id| match previous_row(id) {
        None => (token.max(id), rows),
        Some(at) => (token, rows.max(at + 1)),
    });
    check(rows as usize <= PREVIOUS_ROWS, || {
        format!("a token of row {} of the previous sample, which keeps {PREVIOUS_ROWS}", rows - 1)
    })?;
    Ok(token)
}

/// `inputs` as the words of a step of `capacity` (checked for
/// consistency), up to the last block-table column in use; its attention
/// tiles; and the words in use before the block tables.
fn pack(inputs: &StepInputs<'_>, capacity: &StepCapacity) -> Result<(Vec<u32>, usize, usize)> {
    let meta = inputs.attn;
    let tokens = meta.num_tokens();
    let need = capacity_of(inputs);
    check(
        inputs.positions.len() == tokens && inputs.token_ids.len() == tokens && meta.query_lens.iter().sum::<usize>() == tokens,
        || {
            format!(
                "a step of {tokens} slots has {} positions, {} token ids and query lengths summing to {}",
                inputs.positions.len(),
                inputs.token_ids.len(),
                meta.query_lens.iter().sum::<usize>()
            )
        },
    )?;
    check(
        (need.tokens, need.seqs, need.rows) == (capacity.tokens, capacity.seqs, capacity.rows)
            && need.max_blocks <= capacity.max_blocks
            && need.adjustments <= capacity.adjustments,
        || format!("a step needing {need:?} in a step buffer of {capacity:?}"),
    )?;
    check(inputs.logit_rows.iter().all(|&r| (r as usize) < tokens), || {
        format!("a logit row is outside the step's {tokens} tokens")
    })?;
    check(
        inputs.sampling.is_empty() || inputs.sampling.len() == inputs.logit_rows.len(),
        || format!("{} sampling rows for {} logit rows", inputs.sampling.len(), inputs.logit_rows.len()),
    )?;
    if let Some(at) = inputs.unresolved_coming() {
        return Err(BackendError::Device(format!(
            "a sampling row counts row {at} of the previous sample, which no token of the step takes"
        )));
    }
    let mut words = Vec::with_capacity(words(capacity));
    words.extend_from_slice(inputs.positions);
    words.extend_from_slice(&meta.slot_mapping);
    for (s, (&q, &ctx)) in meta.query_lens.iter().zip(&meta.context_lens).enumerate() {
        check(q <= ctx && ctx <= meta.block_tables[s].len() * meta.block_size, || {
            format!("sequence {s}: {q} new of {ctx} tokens over {} blocks", meta.block_tables[s].len())
        })?;
        words.extend(std::iter::repeat_n(s as u32, q));
    }
    for (&q, &ctx) in meta.query_lens.iter().zip(&meta.context_lens) {
        words.extend((ctx - q..ctx).map(|p| p as u32));
    }
    let tiles = tiles_of(&meta.query_lens);
    words.extend(tiles.iter().flatten());
    words.extend(std::iter::repeat_n(0, 3 * (capacity.tokens - tiles.len())));
    words.extend_from_slice(inputs.token_ids);
    words.extend_from_slice(inputs.logit_rows);
    sampling::pack_rows(inputs.sampling, capacity.rows, &mut words);
    let used = words.len();
    words.resize(offset(capacity, Section::BlockTables), 0);
    for j in 0..need.max_blocks {
        words.extend(meta.block_tables.iter().map(|table| table.get(j).copied().unwrap_or(0)));
    }
    Ok((words, tiles.len(), used))
}

impl CudaBackend {
    /// Copies the `parts` of `words` into a static step's buffer, at the
    /// same offsets, through its page-locked staging words.
    fn stage(&self, step: &mut CudaStep, words: &[u32], parts: [Range<usize>; 2]) -> Result<()> {
        let staging = match &mut step.staging {
            Some(staging) => staging,
            None => {
                let len = step.buf.len();
                // SAFETY: only words written below are copied out.
                let host = unsafe { self.stream.context().alloc_pinned_with_flags::<u32>(len, 0) }
                    .map_err(alloc_error("page-locked step inputs", len * 4))?;
                let copied = self.stream.context().new_event(None).map_err(driver_error("creating an event"))?;
                step.staging.insert(Staging { host, copied })
            }
        };
        // The copy out of the last refill may still wait behind earlier steps.
        wait_for("waiting for the last step inputs' copy", || staging.copied.synchronize())?;
        let host = staging.host.as_mut_slice().map_err(driver_error("page-locked step inputs"))?;
        let (base, _record) = step.buf.device_ptr(&self.stream);
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            host[part.clone()].copy_from_slice(&words[part.clone()]);
            let at = base + (part.start * std::mem::size_of::<u32>()) as u64;
            // SAFETY: the part lies within both the staging words and the
            // buffer (as long as each other), and the staging words stay
            // untouched until `copied` says this copy is done.
            unsafe { cudarc::driver::result::memcpy_htod_async(at, &host[part], self.stream.cu_stream()) }
                .map_err(driver_error("refilling a step buffer"))?;
        }
        staging.copied.record(&self.stream).map_err(driver_error("recording a copy"))
    }

    /// A step sized to `inputs`, uploaded.
    pub(super) fn prepare(&self, inputs: StepInputs<'_>) -> Result<CudaStep> {
        let capacity = capacity_of(&inputs);
        let (words, tiles, _) = pack(&inputs, &capacity)?;
        self.timeline.begin(&self.stream)?;
        let max_token = max_token(inputs.token_ids)?;
        Ok(CudaStep {
            buf: self.upload(&words, "step inputs")?,
            staging: None,
            sampled: self.alloc_for_kernel(capacity.rows, "sampled ids")?,
            capacity,
            block_size: inputs.attn.block_size,
            tiles,
            tile_tokens: tile_tokens(&inputs.attn.query_lens),
            max_context: inputs.attn.context_lens.iter().copied().max().unwrap_or(0),
            samples: !inputs.sampling.is_empty(),
            max_token,
        })
    }

    /// A step buffer of `capacity`, holding no inputs yet.
    pub(super) fn static_step_of(&self, capacity: StepCapacity) -> Result<CudaStep> {
        Ok(CudaStep {
            buf: self.upload(&vec![0u32; words(&capacity)], "a step buffer")?,
            staging: None,
            sampled: self.alloc_for_kernel(capacity.rows, "sampled ids")?,
            capacity,
            block_size: 0,
            tiles: 0,
            tile_tokens: 0,
            max_context: 0,
            samples: false,
            max_token: 0,
        })
    }

    /// Rewrites a static step's buffer in place with `inputs`. A graph
    /// recorded on the step launched attention blocks for the tiles it had
    /// then: every refill after the first must have as many, as long.
    pub(super) fn refill(&self, step: &mut CudaStep, inputs: StepInputs<'_>) -> Result<()> {
        let (words, tiles, used) = pack(&inputs, &step.capacity)?;
        let tile_tokens = tile_tokens(&inputs.attn.query_lens);
        check(step.tiles == 0 || (step.tiles, step.tile_tokens) == (tiles, tile_tokens), || {
            format!(
                "a step buffer of {} attention tiles of up to {} tokens refilled with {tiles} of up to {tile_tokens}",
                step.tiles, step.tile_tokens
            )
        })?;
        self.timeline.begin(&self.stream)?;
        let tables = offset(&step.capacity, Section::BlockTables);
        self.stage(step, &words, [0..used, tables..words.len()])?;
        step.block_size = inputs.attn.block_size;
        step.tiles = tiles;
        step.tile_tokens = tile_tokens;
        // Graphs replay with the contexts of later steps: plan for the longest.
        step.max_context = step.capacity.max_blocks * step.block_size;
        step.samples = !inputs.sampling.is_empty();
        step.max_token = max_token(inputs.token_ids)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{PagedAttentionMeta, PREVIOUS_SAMPLE};
    use crate::sampling::RowSampling;

    #[test]
    fn block_tables_go_last_block_by_block_so_a_refill_copies_the_columns_in_use() {
        // Two decode rows, of 37 and 17 tokens over 3 and 2 blocks of 16.
        let attn = PagedAttentionMeta {
            block_size: 16,
            slot_mapping: vec![3 * 16 + 4, 9 * 16],
            query_lens: vec![1, 1],
            context_lens: vec![37, 17],
            block_tables: vec![vec![1, 2, 3], vec![8, 9]],
        };
        let sampling = [RowSampling::greedy(), RowSampling::greedy()];
        let inputs = StepInputs {
            token_ids: &[5, PREVIOUS_SAMPLE | 1],
            positions: &[36, 16],
            attn: &attn,
            logit_rows: &[0, 1],
            sampling: &sampling,
        };
        // A graph's room: blocks for a 32K context, 64 adjustments a row.
        let capacity = StepCapacity {
            tokens: 2,
            seqs: 2,
            max_blocks: 2048,
            rows: 2,
            adjustments: 128,
        };
        let (words, tiles, used) = pack(&inputs, &capacity).unwrap();
        let tables = offset(&capacity, Section::BlockTables);
        assert_eq!(super::words(&capacity), tables + 2 * 2048);
        assert_eq!(
            words[tables..],
            [1, 8, 2, 9, 3, 0],
            "block j of sequence i at j·seqs + i, three columns"
        );
        assert_eq!(used, offset(&capacity, Section::Adjustments), "no adjustment in use");
        assert_eq!(words[offset(&capacity, Section::TokenIds)..][..2], [5, PREVIOUS_SAMPLE | 1]);
        assert_eq!(tiles, 2);
        assert_eq!(max_token(inputs.token_ids).unwrap(), 5);
        let too_far = [PREVIOUS_SAMPLE | PREVIOUS_ROWS as u32];
        assert!(max_token(&too_far).unwrap_err().to_string().contains("which keeps"));
        // A row may count the coming token of row 1, which token 1 takes,
        // but not of row 0, which no token takes.
        for (coming, ok) in [(1, true), (0, false)] {
            let sampling = [
                RowSampling::greedy(),
                RowSampling {
                    coming: Some(coming),
                    ..RowSampling::greedy()
                },
            ];
            let packed = pack(
                &StepInputs {
                    sampling: &sampling,
                    ..inputs
                },
                &capacity,
            );
            match ok {
                true => assert_eq!(
                    packed.unwrap().0[offset(&capacity, Section::Params) + 2 * sampling::PARAM_WORDS - 1],
                    1
                ),
                false => assert!(packed.unwrap_err().to_string().contains("counts row 0 of the previous sample")),
            }
        }
    }
}
