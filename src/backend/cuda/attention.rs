//! The wrapper of `kernels/attention.cu`: one block per (tile of a
//! sequence's tokens, KV head, pass over the group's rows, split of the
//! keys), and the kernel that merges the splits when there are several.
//! How many splits: enough blocks for two per multiprocessor, at most 32,
//! and no more than the longest context has 32-key tiles.

use super::ops::check;
use super::step::TILE_TOKENS;
use super::{grid, CudaBackend, CudaKvCache, CudaStep, CudaTensor};
use crate::backend::{AttentionSpec, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `ATTENTION_THREADS`, `KEY_TILE` and `ROWS_PER_BLOCK` of the kernel.
const THREADS: u32 = 128;
const KEY_TILE: usize = 32;
const ROWS_PER_BLOCK: usize = 32;
const MAX_SPLITS: usize = 32;

/// The entry point for a head size, and the shared memory it takes: the
/// block's query rows (f32), the warps' weights, a key tile and a value
/// tile (bf16, key rows one word longer).
fn kernel_for(head_dim: usize) -> Option<(&'static str, u32)> {
    let name = match head_dim {
        32 => "paged_attention_bf16_d32",
        64 => "paged_attention_bf16_d64",
        128 => "paged_attention_bf16_d128",
        _ => return None,
    };
    let shared = 4 * (ROWS_PER_BLOCK * head_dim + THREADS as usize) + 2 * KEY_TILE * (2 * head_dim + 2);
    Some((name, shared as u32))
}

/// Key splits for `blocks` blocks of one split on a GPU of `sms` multiprocessors.
fn splits_for(blocks: usize, sms: usize, max_context: usize) -> usize {
    (2 * sms)
        .div_ceil(blocks.max(1))
        .clamp(1, MAX_SPLITS.min(max_context.div_ceil(KEY_TILE).max(1)))
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
        let (name, shared) = kernel.expect("checked above");
        let rows = step.tokens() * heads;
        let mut out = self.tensor(step.tokens(), heads * head_dim, "attention output")?;
        let passes = (TILE_TOKENS * (heads / kv_heads)).div_ceil(ROWS_PER_BLOCK);
        let splits = splits_for(step.tiles() * kv_heads, self.multiprocessors, step.max_context());
        // Each split's softmax state of every row, merged below; unused with one split.
        let mut partial = self.alloc_for_kernel::<f32>(if splits > 1 { splits * rows * (head_dim + 2) } else { 1 }, "attention splits")?;
        let (tokens, seqs, block_size) = (step.tokens() as i32, step.seqs() as i32, step.block_size() as i32);
        let (heads_i, kv_heads_i, passes_i, scale) = (heads as i32, kv_heads as i32, passes as i32, spec.scale);
        let (tables, tiles, token_pos) = (step.block_tables(), step.tile_table(), step.token_pos());
        let mut args = self.stream.launch_builder(self.function(name));
        args.arg(&mut out.data).arg(&mut partial).arg(&qkv.data).arg(&cache.k).arg(&cache.v);
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
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        self.launch(name, args, config)?;
        if splits > 1 {
            let (rows_i, splits_i, head_dim_i) = (rows as i32, splits as i32, head_dim as i32);
            let mut args = self.stream.launch_builder(self.function("attention_combine_f32"));
            args.arg(&mut out.data).arg(&partial).arg(&rows_i).arg(&splits_i).arg(&head_dim_i);
            self.launch("attention_combine_f32", args, grid(rows, 32, 0))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_within_the_context() {
        // Batch-1 decode of a 4-KV-head model at 4K context on 132 SMs: 32 splits.
        assert_eq!(splits_for(4, 132, 4096), 32);
        // A 40-token context has two key tiles.
        assert_eq!(splits_for(4, 132, 40), 2);
        // 64 sequences of 4 KV heads already make 256 blocks: 2 splits; 512 make 1.
        assert_eq!(splits_for(256, 132, 4096), 2);
        assert_eq!(splits_for(512, 132, 4096), 1);
    }

    #[test]
    fn every_head_size_fits_the_default_shared_memory() {
        for head_dim in [32, 64, 128] {
            let (_, shared) = kernel_for(head_dim).unwrap();
            assert!(shared <= 48 << 10, "head_dim {head_dim}: {shared} bytes");
        }
        assert!(kernel_for(96).is_none());
    }
}
