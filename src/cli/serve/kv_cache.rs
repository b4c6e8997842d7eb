//! How big `serve` makes the KV cache: what the user asks, else what the
//! GPUs' memory leaves beside the weights and workspace (as `shardline
//! plan` works it out, on the memory the driver reports), else a share of
//! the host's memory.

use super::ServeArgs;
use anyhow::{bail, Context};
use shardline::backend::{cpu, cuda};
use shardline::config::ModelConfig;
use shardline::generation::BLOCK_SIZE;
use shardline::model_dir::{self, ModelOptions};
use shardline::parallel::plan::{self, GpuMemory, Workload};
use std::ops::Range;

/// The KV cache's blocks, and the bytes a token takes on the rank with the
/// most layers, on this node's `gpus` (their memory now) or, without them,
/// on the CPU: `--kv-cache-memory` a rank if given; else, on GPUs, what
/// `--gpu-memory-utilization` of each leaves beside its ranks' weights and
/// workspace (the arithmetic of `shardline plan`, on the memory the driver
/// reports), and on the CPU a fifth of the available memory; never more
/// than `--max-num-seqs` full contexts of `context_len` tokens.
pub(super) fn kv_cache_blocks(
    args: &ServeArgs,
    options: &ModelOptions,
    config: &ModelConfig,
    stages: &[Range<usize>],
    gpus: Option<&[GpuMemory]>,
    context_len: usize,
) -> anyhow::Result<(usize, usize)> {
    let layout = args.parallel.layout();
    let value_bytes = match gpus {
        Some(_) => cuda::KV_CACHE_BYTES,
        None => cpu::KV_CACHE_BYTES,
    };
    let fullest = stages.iter().map(|s| s.len()).max().unwrap_or(0);
    let per_token = plan::kv_bytes_per_token(config, layout.tp, fullest, value_bytes);
    let tokens = match (args.kv_cache_memory, gpus) {
        (Some(bytes), _) => bytes / per_token,
        (None, Some(gpus)) => gpu_kv_tokens(args, options, config, stages, gpus)?,
        (None, None) => available_memory().unwrap_or(4 << 30) / (5 * layout.world_size()) / per_token,
    };
    let tokens = tokens.min(args.max_num_seqs * context_len);
    // Decode graphs keep one more block, for their padding rows.
    let graphs = gpus.is_some() && args.parallel.decode_graph_rows(args.max_num_seqs) > 0;
    let blocks = (tokens / BLOCK_SIZE).saturating_sub(usize::from(graphs));
    if blocks == 0 {
        let why = match args.kv_cache_memory {
            Some(bytes) => format!("--kv-cache-memory {bytes} bytes"),
            None => "the memory left".into(),
        };
        let padding = if graphs { ", and one more for the decode graphs" } else { "" };
        bail!(
            "{why} holds no {BLOCK_SIZE}-token block of KV cache ({} bytes each{padding})",
            BLOCK_SIZE * per_token
        );
    }
    Ok((blocks, per_token))
}

/// KV-cache tokens `gpus` hold beside the weights and workspace.
fn gpu_kv_tokens(
    args: &ServeArgs,
    options: &ModelOptions,
    config: &ModelConfig,
    stages: &[Range<usize>],
    gpus: &[GpuMemory],
) -> anyhow::Result<usize> {
    let layout = args.parallel.layout();
    let dtype = model_dir::weight_dtype(options).context("reading the weights' dtype")?;
    let workload = Workload {
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        graph_tokens: args.parallel.decode_graph_rows(args.max_num_seqs),
    };
    let needs = plan::stage_memory(config, layout.tp, stages, dtype, workload);
    let tokens = plan::kv_tokens_on(&needs, layout.tp, gpus, args.parallel.ranks_per_node(), args.gpu_memory_utilization)?;
    Ok(usize::try_from(tokens).unwrap_or(usize::MAX))
}

/// `MemAvailable` from /proc/meminfo, if readable.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kib| kib * 1024)
}
