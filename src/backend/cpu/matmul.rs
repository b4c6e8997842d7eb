//! `y = x · wᵀ + b` on the CPU: the linear layers, split across every core.
//!
//! Work is divided by output features, so each thread streams its own slice
//! of the weight matrix once per call (batch-1 decode is a pure weight stream,
//! bound by memory bandwidth). For prefill, tokens go four at a time through
//! each weight row while the row is hot in L1, in blocks of tokens small
//! enough that the activations stay in L2.

use super::simd::{dot_rows, dot_tile, WeightRow, TILE_ROWS, TILE_TOKENS};
use super::{CpuTensor, CpuWeight};
use rayon::prelude::*;
use std::ops::Range;

/// Tokens per block, a whole number of tiles: 30 × 4,864 f32 activations
/// (Qwen2.5-0.5B's widest input) ≈ 580 KB, inside L2.
const TOKEN_BLOCK: usize = 10 * TILE_TOKENS;

pub fn linear(x: &CpuTensor, w: &CpuWeight, bias: Option<&[f32]>) -> CpuTensor {
    assert_eq!(x.cols, w.cols, "linear: input width {} but weight expects {}", x.cols, w.cols);
    let (tokens, outputs) = (x.rows, w.rows);
    // Column-major result: output feature `o` owns yt[o*tokens .. (o+1)*tokens].
    let mut yt = vec![0.0f32; outputs * tokens];
    let tasks = rayon::current_num_threads() * 4;
    let rows_per_task = outputs.div_ceil(tasks).max(1);
    yt.par_chunks_mut(rows_per_task * tokens.max(1))
        .enumerate()
        .for_each(|(task, chunk)| {
            let first_row = task * rows_per_task;
            let rows = chunk.len() / tokens;
            for block_start in (0..tokens).step_by(TOKEN_BLOCK) {
                let block = block_start..(block_start + TOKEN_BLOCK).min(tokens);
                let mut r = 0;
                while r + TILE_ROWS <= rows && block.len() >= TILE_TOKENS {
                    tile_rows(
                        x,
                        w.rows(first_row + r, TILE_ROWS),
                        block.clone(),
                        &mut chunk[r * tokens..(r + TILE_ROWS) * tokens],
                    );
                    r += TILE_ROWS;
                }
                for r in r..rows {
                    one_row(x, w.rows(first_row + r, 1), block.clone(), &mut chunk[r * tokens..(r + 1) * tokens]);
                }
            }
        });
    let mut y = if tokens == 1 {
        CpuTensor::new(yt, 1, outputs)
    } else {
        transpose(&yt, outputs, tokens)
    };
    if let Some(b) = bias {
        for row in y.data.chunks_mut(outputs) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    y
}

/// `out[t] = row · x[t]` for the tokens `t` in `tokens`, four at a time.
fn one_row(x: &CpuTensor, row: WeightRow<'_>, tokens: Range<usize>, out: &mut [f32]) {
    let mut t = tokens.start;
    while t < tokens.end {
        let n = (tokens.end - t).min(4);
        let xs = [0, 1, 2, 3].map(|j| x.row((t + j).min(x.rows - 1)));
        dot_rows(row, &xs[..n], &mut out[t..t + n]);
        t += n;
    }
}

/// `TILE_ROWS` consecutive weight rows (`rows` spans them) against the
/// tokens in `tokens`, `TILE_TOKENS` at a time through the register tile;
/// `out` holds each row's outputs, `x.rows` per row.
fn tile_rows(x: &CpuTensor, rows: WeightRow<'_>, tokens: Range<usize>, out: &mut [f32]) {
    let (n, k) = (x.rows, x.cols);
    let mut t = tokens.start;
    while t + TILE_TOKENS <= tokens.end {
        let mut tile = [[0.0f32; TILE_TOKENS]; TILE_ROWS];
        dot_tile(rows, std::array::from_fn(|j| x.row(t + j)), &mut tile);
        for (r, values) in tile.iter().enumerate() {
            out[r * n + t..r * n + t + TILE_TOKENS].copy_from_slice(values);
        }
        t += TILE_TOKENS;
    }
    for r in 0..TILE_ROWS {
        one_row(x, rows.slice(r * k..(r + 1) * k), t..tokens.end, &mut out[r * n..(r + 1) * n]);
    }
}

/// `[outputs, tokens]` column-major → `[tokens, outputs]` row-major.
///
/// Each task writes a block of token rows, reading for every output feature
/// the block's consecutive values (one cache line) rather than one value per
/// line, which made this copy cost as much as the matmul for wide outputs.
fn transpose(yt: &[f32], outputs: usize, tokens: usize) -> CpuTensor {
    const ROWS: usize = 16;
    let mut data = vec![0.0f32; outputs * tokens];
    data.par_chunks_mut(ROWS * outputs).enumerate().for_each(|(block, rows)| {
        let first = block * ROWS;
        let n = rows.len() / outputs;
        for o in 0..outputs {
            let column = &yt[o * tokens + first..o * tokens + first + n];
            for (r, &v) in column.iter().enumerate() {
                rows[r * outputs + o] = v;
            }
        }
    });
    CpuTensor::new(data, tokens, outputs)
}

impl CpuWeight {
    /// `count` consecutive rows from row `first`, as one contiguous span.
    pub(super) fn rows(&self, first: usize, count: usize) -> WeightRow<'_> {
        let span = first * self.cols..(first + count) * self.cols;
        match &self.data {
            super::WeightData::F32(v) => WeightRow::F32(&v[span]),
            super::WeightData::Bf16(v) => WeightRow::Bf16(&v.as_slice()[span]),
            super::WeightData::F16(v) => WeightRow::F16(&v.as_slice()[span]),
        }
    }
}
