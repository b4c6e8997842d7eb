//! A step's inputs on the device: one buffer of u32 words, filled by one
//! copy per forward, that every kernel reads its part of. A prepared step
//! is sized to its batch; a static one (for a CUDA graph) to a capacity,
//! at an address that stays put while [`CudaBackend::refill`] rewrites it.

use super::ops::check;
use super::{sampling, CudaBackend};
use crate::backend::{Result, StepCapacity, StepInputs};
use cudarc::driver::{CudaSlice, CudaView};

/// Consecutive tokens of one sequence that one block of the attention
/// kernel takes together (`kernels/attention.cu`).
pub const TILE_TOKENS: usize = 8;

/// The words of a step, section after section (`t` tokens, `s` sequences,
/// `b` blocks a sequence, `r` logit rows, `a` adjustments):
/// positions `[t]`, slots `[t]`, each token's sequence `[t]` and position
/// in it `[t]`, block tables `[s, b]` (padded with 0), attention tiles
/// `[t, 3]` (first token, tokens, sequence; the used ones first), token
/// ids `[t]`, logit rows `[r]`, sampling parameters `[r, PARAM_WORDS]`,
/// adjustments `[a, ADJUSTMENT_WORDS]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Positions,
    Slots,
    TokenSeq,
    TokenPos,
    BlockTables,
    Tiles,
    TokenIds,
    LogitRows,
    Params,
    Adjustments,
}

fn offset(c: &StepCapacity, section: Section) -> usize {
    let t = c.tokens;
    let tables = 4 * t;
    let tiles = tables + c.seqs * c.max_blocks;
    let ids = tiles + 3 * t;
    let rows = ids + t;
    let params = rows + c.rows;
    let adjustments = params + c.rows * sampling::PARAM_WORDS;
    match section {
        Section::Positions => 0,
        Section::Slots => t,
        Section::TokenSeq => 2 * t,
        Section::TokenPos => 3 * t,
        Section::BlockTables => tables,
        Section::Tiles => tiles,
        Section::TokenIds => ids,
        Section::LogitRows => rows,
        Section::Params => params,
        Section::Adjustments => adjustments,
    }
}

fn words(c: &StepCapacity) -> usize {
    offset(c, Section::Adjustments) + c.adjustments * sampling::ADJUSTMENT_WORDS
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

/// A step's inputs on the device, and where the tokens sampled from it land.
pub struct CudaStep {
    buf: CudaSlice<u32>,
    /// `[rows]`
    sampled: CudaSlice<u32>,
    capacity: StepCapacity,
    block_size: usize,
    /// Attention tiles in use.
    tiles: usize,
    /// The longest context a sequence of the step may have.
    max_context: usize,
    /// Whether the inputs carry a sampling row per logit row.
    samples: bool,
    /// The largest token id, checked against an embedding table's rows.
    max_token: u32,
}

impl CudaStep {
    pub fn tokens(&self) -> usize {
        self.capacity.tokens
    }

    pub fn rows(&self) -> usize {
        self.capacity.rows
    }

    pub fn max_blocks(&self) -> usize {
        self.capacity.max_blocks
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
        let end = words(&self.capacity);
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

/// `inputs` as the words of a step of `capacity` (checked for
/// consistency), and its attention tiles.
fn pack(inputs: &StepInputs<'_>, capacity: &StepCapacity) -> Result<(Vec<u32>, usize)> {
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
    for table in &meta.block_tables {
        words.extend_from_slice(table);
        words.extend(std::iter::repeat_n(0, capacity.max_blocks - table.len()));
    }
    let tiles = tiles_of(&meta.query_lens);
    words.extend(tiles.iter().flatten());
    words.extend(std::iter::repeat_n(0, 3 * (capacity.tokens - tiles.len())));
    words.extend_from_slice(inputs.token_ids);
    words.extend_from_slice(inputs.logit_rows);
    sampling::pack_rows(inputs.sampling, capacity.rows, &mut words);
    words.resize(self::words(capacity), 0);
    Ok((words, tiles.len()))
}

impl CudaBackend {
    /// A step sized to `inputs`, uploaded.
    pub(super) fn prepare(&self, inputs: StepInputs<'_>) -> Result<CudaStep> {
        let capacity = capacity_of(&inputs);
        let (words, tiles) = pack(&inputs, &capacity)?;
        self.timeline.begin(&self.stream)?;
        Ok(CudaStep {
            buf: self.upload(&words, "step inputs")?,
            sampled: self.alloc_for_kernel(capacity.rows, "sampled ids")?,
            capacity,
            block_size: inputs.attn.block_size,
            tiles,
            max_context: inputs.attn.context_lens.iter().copied().max().unwrap_or(0),
            samples: !inputs.sampling.is_empty(),
            max_token: inputs.token_ids.iter().copied().max().unwrap_or(0),
        })
    }

    /// A step buffer of `capacity`, holding no inputs yet.
    pub(super) fn static_step_of(&self, capacity: StepCapacity) -> Result<CudaStep> {
        Ok(CudaStep {
            buf: self.upload(&vec![0u32; words(&capacity)], "a step buffer")?,
            sampled: self.alloc_for_kernel(capacity.rows, "sampled ids")?,
            capacity,
            block_size: 0,
            tiles: 0,
            max_context: 0,
            samples: false,
            max_token: 0,
        })
    }

    /// Rewrites a static step's buffer in place with `inputs`. A graph
    /// recorded on the step launched as many attention blocks as it had
    /// tiles then: every refill after the first must have as many.
    pub(super) fn refill(&self, step: &mut CudaStep, inputs: StepInputs<'_>) -> Result<()> {
        let (words, tiles) = pack(&inputs, &step.capacity)?;
        check(step.tiles == 0 || step.tiles == tiles, || {
            format!("a step buffer of {} attention tiles refilled with {tiles}", step.tiles)
        })?;
        self.timeline.begin(&self.stream)?;
        self.stream
            .memcpy_htod(&words, &mut step.buf)
            .map_err(super::driver_error("refilling a step buffer"))?;
        step.block_size = inputs.attn.block_size;
        step.tiles = tiles;
        // Graphs replay with the contexts of later steps: plan for the longest.
        step.max_context = step.capacity.max_blocks * step.block_size;
        step.samples = !inputs.sampling.is_empty();
        step.max_token = inputs.token_ids.iter().copied().max().unwrap_or(0);
        Ok(())
    }
}
