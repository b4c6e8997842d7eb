//! The memory of the GPUs a command's ranks use on this machine, as their
//! driver reports it: what `serve` sizes its KV cache from, and what it and
//! `bench` report once the model is loaded or has run.

use super::ParallelArgs;
use shardline::backend::{cuda, BackendError};
use shardline::config::ModelConfig;
use shardline::generation::BLOCK_SIZE;
use shardline::model_dir::{self, ModelOptions};
use shardline::parallel::plan::{self, gib, GpuMemory, Workload};
use shardline::parallel::Layout;

/// GPUs 0.. that this node's ranks run on (rank `r` on GPU `r` mod the GPUs
/// visible).
fn this_nodes_gpus(parallel: &ParallelArgs) -> std::ops::Range<usize> {
    0..cuda::gpu_count().min(parallel.ranks_per_node())
}

/// This node's GPUs, each's primary context held open until the result is
/// dropped: `serve` holds them from reading their memory until its workers
/// have opened theirs, so each context is made once.
pub(super) fn hold(parallel: &ParallelArgs) -> Result<Vec<cuda::HeldGpu>, BackendError> {
    this_nodes_gpus(parallel).map(cuda::HeldGpu::open).collect()
}

/// Each of `gpus`' free and total bytes now.
pub(super) fn memory_of(gpus: &[cuda::HeldGpu]) -> Result<Vec<GpuMemory>, BackendError> {
    gpus.iter()
        .map(|g| {
            let (free, total) = g.memory_info()?;
            Ok(GpuMemory {
                free: free as u64,
                total: total as u64,
            })
        })
        .collect()
}

/// Prints what each of `gpus` holds now, after `when`.
pub(super) fn report(gpus: &[cuda::HeldGpu], when: &str) {
    for (g, m) in memory_of(gpus).unwrap_or_default().iter().enumerate() {
        eprintln!("shardline: GPU {g}: {:.2} GiB of {:.2} GiB free {when}", gib(m.free), gib(m.total));
    }
}

/// Bytes `shardline plan` expects the one rank of a whole model to hold
/// under `workload`, with `kv_blocks` blocks of KV cache: weights,
/// workspace and cache (the CUDA context and libraries come on top).
fn predicted_whole(options: &ModelOptions, config: &ModelConfig, workload: Workload, kv_blocks: usize) -> anyhow::Result<u64> {
    let dtype = model_dir::weight_dtype(options)?;
    let stages = Layout { tp: 1, pp: 1 }.stage_layers(config, None)?;
    let rank = plan::stage_memory(config, 1, &stages, dtype, workload)[0];
    Ok(rank.weights + rank.workspace + (kv_blocks * BLOCK_SIZE) as u64 * rank.kv_per_token)
}

/// What the GPUs hold after a load run, against what `shardline plan`
/// (and so `serve`'s KV-cache sizing) expects a whole model to hold.
pub(super) struct MemoryHeld {
    /// Bytes in use on each GPU of this node.
    pub(super) in_use: Vec<u64>,
    /// For one rank: its weights, workspace and KV cache.
    pub(super) predicted: Option<u64>,
}

impl MemoryHeld {
    /// Now, after a run of `workload` with `kv_blocks` blocks of KV cache.
    pub(super) fn now(
        parallel: &ParallelArgs,
        options: &ModelOptions,
        config: &ModelConfig,
        workload: Workload,
        kv_blocks: usize,
    ) -> anyhow::Result<Self> {
        let in_use = memory_of(&hold(parallel)?)?.iter().map(|m| m.total - m.free).collect();
        // Decode graphs keep a padding block beside the cache.
        let blocks = kv_blocks + usize::from(workload.graph_tokens > 0);
        let predicted = match parallel.layout().world_size() {
            1 => Some(predicted_whole(options, config, workload, blocks)?),
            _ => None,
        };
        Ok(MemoryHeld { in_use, predicted })
    }

    pub(super) fn print(&self) {
        let held: Vec<String> = self.in_use.iter().map(|&b| format!("{:.2}", gib(b))).collect();
        print!("GPU memory in use after the run: {} GiB", held.join(" / "));
        match self.predicted {
            Some(p) => println!(
                "; plan expects {:.2} GiB of weights, workspace and KV cache (the CUDA context and libraries come on top)",
                gib(p)
            ),
            None => println!(),
        }
    }
}
