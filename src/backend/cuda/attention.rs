//! The wrapper of `kernels/attention.cu`: one block per (tile of a
//! sequence's tokens, KV head, pass over the tile's query rows, split of
//! the keys). A block has a warp for each 16 query rows of a tile (at most
//! 4), so a decode step's blocks are one warp each. Splits: enough warps
//! for eight per multiprocessor, at most 32 splits, and no more than the
//! longest context has 32-key tiles; the last split of a block group to
//! finish merges the group's rows, counting in the backend's `arrivals`.

use super::ops::check;
use super::{driver_error, CudaBackend, CudaKvCache, CudaStep, CudaTensor};
use crate::backend::{AttentionSpec, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};
use half::bf16;
use std::collections::HashMap;

/// `KEY_TILE`, `STAGES`, `WARP_ROWS` and `MAX_WARPS` of the kernel.
const KEY_TILE: usize = 32;
const STAGES: usize = 2;
const WARP_ROWS: usize = 16;
const MAX_WARPS: usize = 4;
/// At most a warp's lanes: the merge gives each split's state a lane.
const MAX_SPLITS: usize = 32;
/// The kernel's variants: a head size and its entry point.
const VARIANTS: [(usize, &str); 3] = [
    (32, "paged_attention_bf16_d32"),
    (64, "paged_attention_bf16_d64"),
    (128, "paged_attention_bf16_d128"),
];

/// The entry point for a head size.
fn kernel_for(head_dim: usize) -> Option<&'static str> {
    VARIANTS.iter().find(|&&(d, _)| d == head_dim).map(|&(_, name)| name)
}

/// The dynamic shared memory of a block of `warps` warps (the kernel's
/// `Layout`): the key and value stages, a 16×16 f32 matrix of row numbers,
/// then each warp's query rows or scores and probabilities, and its rows'
/// rescale factors and sums. A block given less writes past it, which the
/// emulated GPU reports.
fn shared_bytes(head_dim: usize, warps: usize) -> usize {
    let kv_stride = head_dim + 8;
    let stages = STAGES * 2 * KEY_TILE * kv_stride * 2;
    let queries = WARP_ROWS * kv_stride * 2;
    let scores_and_probs = WARP_ROWS * (KEY_TILE + 4) * 4 + WARP_ROWS * (KEY_TILE + 8) * 2;
    let warp = queries.max(scores_and_probs) + 2 * WARP_ROWS * 4;
    stages + 16 * 16 * 4 + warps * warp
}

/// Warps a block and passes over a tile's rows, for tiles of up to
/// `tile_tokens` tokens of `group` query heads each.
fn warps_and_passes(tile_tokens: usize, group: usize) -> (usize, usize) {
    let rows = tile_tokens.max(1) * group;
    let warps = rows.div_ceil(WARP_ROWS).clamp(1, MAX_WARPS);
    (warps, rows.div_ceil(WARP_ROWS * warps))
}

/// Warps a multiprocessor is given by splitting a step's keys.
const WARPS_PER_SM: usize = 8;

/// Key splits for `blocks` blocks of `warps` warps and one split each on a
/// GPU of `sms` multiprocessors.
fn splits_for(blocks: usize, warps: usize, sms: usize, max_context: usize) -> usize {
    (WARPS_PER_SM * sms)
        .div_ceil(blocks.max(1) * warps)
        .clamp(1, MAX_SPLITS.min(max_context.div_ceil(KEY_TILE).max(1)))
}

/// The merge counters a GPU of `sms` multiprocessors needs, one a block
/// group: keys are split only while a step has fewer blocks than this.
pub(super) fn split_counters(sms: usize) -> usize {
    WARPS_PER_SM * sms
}

/// Lets each attention variant have the shared memory its largest block
/// takes (over the 48 KiB a kernel gets unasked for the largest heads).
pub(super) fn allow_shared_memory(functions: &HashMap<&'static str, CudaFunction>) -> Result<()> {
    for (head_dim, name) in VARIANTS {
        functions[name]
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes(head_dim, MAX_WARPS) as i32,
            )
            .map_err(driver_error(name))?;
    }
    Ok(())
}

impl CudaBackend {
    pub(super) fn attention(&self, qkv: &CudaTensor, cache: &CudaKvCache, step: &CudaStep, spec: &AttentionSpec) -> Result<CudaTensor> {
        let (heads, kv_heads, head_dim) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let kernel = kernel_for(head_dim);
        check(
            qkv.rows == step.tokens() && qkv.cols == (heads + 2 * kv_heads) * head_dim && kernel.is_some() && heads % kv_heads == 0,
            || {
                format!(
                    "paged_attention: [{}, {}] for {} tokens of {heads} heads, {kv_heads} KV heads of {head_dim} (32, 64 or 128)",
                    qkv.rows,
                    qkv.cols,
                    step.tokens()
                )
            },
        )?;
        let name = kernel.expect("checked above");
        let rows = step.tokens() * heads;
        let mut out = self.tensor(step.tokens(), heads * head_dim, "attention output")?;
        let (warps, passes) = warps_and_passes(step.tile_tokens(), heads / kv_heads);
        let groups = step.tiles() * kv_heads * passes;
        let splits = splits_for(groups, warps, self.multiprocessors, step.max_context());
        // Each split's sums of weighted values and softmax state of every row; unused with one split.
        let state = if splits > 1 { splits * rows * (head_dim + 2) } else { 1 };
        check(splits == 1 || groups <= self.arrivals.len(), || {
            format!(
                "paged_attention: {groups} block groups split, over the {} counters",
                self.arrivals.len()
            )
        })?;
        let mut partial = self.scratch::<f32>(state, "attention splits")?;
        let (tokens, seqs, block_size) = (step.tokens() as i32, step.seqs() as i32, step.block_size() as i32);
        let (heads_i, kv_heads_i, passes_i, scale) = (heads as i32, kv_heads as i32, passes as i32, spec.scale);
        let (tables, tiles, token_pos) = (step.block_tables(), step.tile_table(), step.token_pos());
        // Where o_proj multiplies through cuBLAS, it takes the output
        // rounded to bf16 (for bf16 weights): written here.
        let mut rounded = match self.through_matvec(step.tokens()) {
            true => None,
            false => Some(self.scratch::<bf16>(out.rows * out.cols, "bf16 attention output")?),
        };
        let mut args = self.kernel_args(name);
        args.out(out.data_mut()).out_or_null(rounded.as_mut());
        args.out(&mut partial).arg(&self.arrivals);
        args.arg(&qkv.data).arg(&cache.k).arg(&cache.v);
        args.arg(&tables).arg(&tiles).arg(&token_pos);
        args.arg(&tokens)
            .arg(&seqs)
            .arg(&heads_i)
            .arg(&kv_heads_i)
            .arg(&passes_i)
            .arg(&block_size)
            .arg(&scale);
        let config = LaunchConfig {
            grid_dim: (step.tiles() as u32, (kv_heads * passes) as u32, splits as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: shared_bytes(head_dim, warps) as u32,
        };
        self.launch(name, args, config)?;
        out.rounded = rounded;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_blocks_are_one_warp_and_prefill_tiles_up_to_four() {
        // Decode: one token of a 7-head group is one warp's 16 rows.
        assert_eq!(warps_and_passes(1, 7), (1, 1));
        // 8 tokens of 7 heads: 56 rows, four warps in one pass.
        assert_eq!(warps_and_passes(8, 7), (4, 1));
        // 8 tokens of a 16-head group: 128 rows, two passes of 64.
        assert_eq!(warps_and_passes(8, 16), (4, 2));
        // Without GQA 3 tokens are 3 rows.
        assert_eq!(warps_and_passes(3, 1), (1, 1));
        // An MQA decode of 32 heads: two passes of one warp.
        assert_eq!(warps_and_passes(1, 32), (2, 1));
    }

    #[test]
    fn splits_fill_the_gpu_within_the_context() {
        // Batch-1 decode of a 4-KV-head model at 4K context on 132 SMs: 32 splits.
        assert_eq!(splits_for(4, 1, 132, 4096), 32);
        // A 40-token context has two key tiles.
        assert_eq!(splits_for(4, 1, 132, 40), 2);
        // 64 sequences of 4 KV heads make 256 one-warp blocks: 5 splits; 2048 make 1.
        assert_eq!(splits_for(256, 1, 132, 4096), 5);
        assert_eq!(splits_for(2048, 1, 132, 4096), 1);
        // Prefill blocks of four warps.
        assert_eq!(splits_for(256, 4, 132, 4096), 2);
    }

    #[test]
    fn every_split_step_has_a_merge_counter_for_each_block_group() {
        for sms in [1, 78, 132] {
            for blocks in 1..2 * split_counters(sms) {
                if splits_for(blocks, 1, sms, 1 << 15) > 1 {
                    assert!(blocks <= split_counters(sms), "{blocks} blocks on {sms} SMs");
                }
            }
        }
    }

    #[test]
    fn every_block_fits_the_shared_memory_of_an_sm() {
        for (head_dim, name) in VARIANTS {
            assert_eq!(kernel_for(head_dim), Some(name));
            // Decode blocks fit the default 48 KiB; every block fits what any
            // GPU of compute capability 8.0 or later lets one have (99 KiB at least).
            assert!(shared_bytes(head_dim, 1) <= 48 << 10, "head_dim {head_dim}");
            assert!(shared_bytes(head_dim, MAX_WARPS) <= 99 << 10, "head_dim {head_dim}");
        }
        assert!(kernel_for(96).is_none());
    }
}
