//! "Do the math" before buying GPUs: for every `tp × pp` layout on up to N
//! GPUs and every weight dtype, the bytes each GPU holds, the KV cache each
//! token takes on it, how many tokens of KV cache fit in what is left, and
//! whether that is enough to serve. `serve` sizes its KV cache on the GPUs
//! it finds with the same arithmetic ([`kv_tokens_on`]).

use super::layout::{valid_tp, Layout, ShardSizes};
use crate::backend::cuda;
use crate::backend::DType;
use crate::config::ModelConfig;
use std::ops::Range;

/// What a plan assumes beyond the model and the GPUs.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    pub gpus: usize,
    pub gpu_memory_bytes: u64,
    /// Fraction of each GPU's memory shardline may use (vLLM's default 0.9
    /// leaves the rest to the CUDA context, NCCL and fragmentation).
    pub gpu_memory_utilization: f64,
    pub workload: Workload,
    /// A layout fits when, after weights and workspace, this many tokens of
    /// KV cache fit (one request of this length, or several shorter).
    pub min_kv_tokens: usize,
}

/// The most one step asks, which sizes the activation workspace.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Tokens per step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Sequences per step, which sizes the logits buffer.
    pub max_num_seqs: usize,
    /// Rows of the largest decode graph (0 without graphs): the recorded
    /// graphs keep their activations and logits, in buffers that sum to
    /// under twice the largest graph's.
    pub graph_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PlanRow {
    pub tp: usize,
    pub pp: usize,
    /// The checkpoint's weight dtype (an f16 checkpoint is held in f32).
    pub dtype: String,
    /// On the GPU that holds the most (the heaviest pipeline stage).
    pub weight_bytes_per_gpu: u64,
    /// Activation workspace and logits reserved per GPU.
    pub workspace_bytes_per_gpu: u64,
    /// KV cache one token takes on the GPU with the least room for it (its
    /// layers, its KV heads).
    pub kv_bytes_per_token: u64,
    pub max_kv_tokens: u64,
    pub fits: bool,
}

impl PlanRow {
    pub fn gpus(&self) -> usize {
        self.tp * self.pp
    }
}

/// What one rank of a pipeline stage needs on its GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankMemory {
    /// Its weights as the GPU holds them.
    pub weights: u64,
    /// Peak activations of one step, and the logits.
    pub workspace: u64,
    /// The KV cache of one token (its layers, its KV heads, bf16).
    pub kv_per_token: u64,
}

/// One GPU's memory as its driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuMemory {
    pub free: u64,
    pub total: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FitError {
    #[error(
        "{gpu} has {total:.2} GiB, {in_use:.2} GiB of it in use before loading; --gpu-memory-utilization {utilization} leaves {usable:.2} GiB, \
         but its {ranks} rank(s) need {weights:.2} GiB of weights and {workspace:.2} GiB of workspace before any KV cache: \
         use more GPUs (--tp, --pp), a higher --gpu-memory-utilization, or a lower --max-num-seqs or --max-num-batched-tokens"
    )]
    NoRoom {
        gpu: String,
        ranks: usize,
        total: f64,
        in_use: f64,
        utilization: f64,
        usable: f64,
        weights: f64,
        workspace: f64,
    },
}

/// Every valid layout on up to `options.gpus` GPUs, for each checkpoint
/// dtype shardline reads. Weights take what the CUDA backend holds them in
/// (bf16 as is; f16 and f32 in f32) and the KV cache is bf16.
pub fn plan(config: &ModelConfig, options: &PlanOptions) -> Vec<PlanRow> {
    let mut rows = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for tp in valid_tp(config, options.gpus) {
            for pp in 1..=(options.gpus / tp).min(config.num_hidden_layers) {
                rows.push(row(config, Layout { tp, pp }, dtype, options));
            }
        }
    }
    rows
}

/// The layout to use: among those that fit, the fewest GPUs (the rest serve
/// as replicas), then bf16, then tensor over pipeline parallelism (TP cuts
/// per-token latency, PP does not), then the most KV cache.
pub fn recommend(rows: &[PlanRow]) -> Option<&PlanRow> {
    rows.iter()
        .filter(|r| r.fits)
        .min_by_key(|r| (r.gpus(), r.dtype != "bf16", r.pp, std::cmp::Reverse(r.max_kv_tokens)))
}

fn row(config: &ModelConfig, layout: Layout, dtype: DType, options: &PlanOptions) -> PlanRow {
    let stages = layout.stage_layers(config, None).expect("plan only builds valid layouts");
    let per_stage = stage_memory(config, layout.tp, &stages, dtype, options.workload);
    let usable = (options.gpu_memory_bytes as f64 * options.gpu_memory_utilization) as u64;
    let tokens = |m: &RankMemory| usable.saturating_sub(m.weights + m.workspace) / m.kv_per_token.max(1);
    let weight_bytes_per_gpu = per_stage.iter().map(|m| m.weights).max().expect("at least one stage");
    // Every stage caches every token: the tightest stage sets the capacity.
    let tightest = per_stage.iter().min_by_key(|m| tokens(m)).expect("at least one stage");
    let max_kv_tokens = tokens(tightest);
    PlanRow {
        tp: layout.tp,
        pp: layout.pp,
        dtype: dtype.to_string(),
        weight_bytes_per_gpu,
        workspace_bytes_per_gpu: tightest.workspace,
        kv_bytes_per_token: tightest.kv_per_token,
        max_kv_tokens,
        fits: max_kv_tokens >= options.min_kv_tokens as u64,
    }
}

/// What each rank of each stage (`stages`, tensor-parallel over `tp`)
/// needs on its GPU for a checkpoint of `dtype` under `workload`.
pub fn stage_memory(config: &ModelConfig, tp: usize, stages: &[Range<usize>], dtype: DType, workload: Workload) -> Vec<RankMemory> {
    let shard = ShardSizes::new(config, tp);
    let bytes = cuda::weight_element_bytes(dtype) as u64;
    let workspace = workspace_bytes(config, tp, workload);
    stages
        .iter()
        .enumerate()
        .map(|(i, range)| {
            let mut params = range.len() * shard.layer;
            if i == 0 {
                params += shard.embedding;
            }
            if i == stages.len() - 1 {
                // The LM head: its own matrix, or the tied embedding's copy
                // when the last stage is not the first.
                if !config.tie_word_embeddings || stages.len() > 1 {
                    params += shard.embedding;
                }
                params += shard.norm;
            }
            RankMemory {
                weights: params as u64 * bytes,
                workspace,
                kv_per_token: kv_bytes_per_token(config, tp, range.len(), cuda::KV_CACHE_BYTES) as u64,
            }
        })
        .collect()
}

/// `bytes` in GiB, for messages and tables.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes one token's keys and values take on a rank of a `tp`-wide split
/// that caches `layers` layers, at `value_bytes` a value.
pub fn kv_bytes_per_token(config: &ModelConfig, tp: usize, layers: usize, value_bytes: usize) -> usize {
    layers * 2 * ShardSizes::new(config, tp).kv_heads * config.head_dim() * value_bytes
}

/// Tokens of KV cache every rank can hold, with rank `r` of a `tp`-wide
/// layout (stage `r / tp`, needing `stages[r / tp]`) on GPU `r % gpus.len()`
/// of its node, `ranks_per_node` ranks a node, every node's GPUs like these.
/// A GPU lends its ranks `utilization` of its memory, less what is in use
/// before they load, less their weights and workspaces; its ranks' KV
/// bytes a token share the rest. The tightest GPU sets the capacity.
pub fn kv_tokens_on(
    stages: &[RankMemory],
    tp: usize,
    gpus: &[GpuMemory],
    ranks_per_node: usize,
    utilization: f64,
) -> Result<u64, FitError> {
    let nodes = (stages.len() * tp / ranks_per_node.max(1)).max(1);
    let mut least = u64::MAX;
    for node in 0..nodes {
        for (gpu, memory) in gpus.iter().enumerate() {
            let on_gpu: Vec<RankMemory> = (node * ranks_per_node..(node + 1) * ranks_per_node)
                .filter(|r| r % gpus.len() == gpu)
                .map(|r| stages[r / tp])
                .collect();
            if on_gpu.is_empty() {
                continue;
            }
            let weights: u64 = on_gpu.iter().map(|m| m.weights).sum();
            let workspace: u64 = on_gpu.iter().map(|m| m.workspace).sum();
            let kv: u64 = on_gpu.iter().map(|m| m.kv_per_token).sum();
            let in_use = memory.total.saturating_sub(memory.free);
            let usable = ((memory.total as f64 * utilization) as u64).saturating_sub(in_use);
            if usable <= weights + workspace {
                return Err(FitError::NoRoom {
                    gpu: match nodes {
                        1 => format!("GPU {gpu}"),
                        _ => format!("node {node}'s GPU {gpu}"),
                    },
                    ranks: on_gpu.len(),
                    total: gib(memory.total),
                    in_use: gib(in_use),
                    utilization,
                    usable: gib(usable),
                    weights: gib(weights),
                    workspace: gib(workspace),
                });
            }
            least = least.min((usable - weights - workspace) / kv.max(1));
        }
    }
    Ok(least)
}

/// Peak activations of one step, in f32: the residual stream and norms
/// (4 × hidden), this rank's q/k/v and gate/up outputs, and the logits of
/// every sequence over this rank's vocabulary slice; beside them what the
/// decode graphs hold of the same (twice the largest graph's rows), and
/// cuBLAS's workspace.
fn workspace_bytes(config: &ModelConfig, tp: usize, workload: Workload) -> u64 {
    let shard = ShardSizes::new(config, tp);
    let hd = config.head_dim();
    let qkv = (config.num_attention_heads / tp + 2 * shard.kv_heads) * hd;
    let per_token = 4 * config.hidden_size + qkv + 2 * config.intermediate_size / tp;
    let graphs = 2 * workload.graph_tokens;
    let activations = (workload.max_num_batched_tokens + graphs) * per_token;
    let logits = (workload.max_num_seqs + graphs) * config.vocab_size.div_ceil(tp);
    4 * (activations + logits) as u64 + cuda::CUBLAS_WORKSPACE_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn options(gpus: usize) -> PlanOptions {
        PlanOptions {
            gpus,
            gpu_memory_bytes: 80 * GIB,
            gpu_memory_utilization: 0.9,
            workload: Workload {
                max_num_batched_tokens: 2048,
                max_num_seqs: 256,
                graph_tokens: 256,
            },
            min_kv_tokens: 4096,
        }
    }

    fn qwen_72b() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/qwen2.5-72b.json");
        ModelConfig::from_file(&path).unwrap()
    }

    #[test]
    fn qwen_72b_in_bf16_needs_two_80_gib_gpus() {
        let c = qwen_72b();
        let rows = plan(&c, &options(8));
        let find = |tp, pp, dtype: &str| rows.iter().find(|r| r.tp == tp && r.pp == pp && r.dtype == dtype).unwrap();
        let one = find(1, 1, "bf16");
        assert!(!one.fits);
        // 72.7B parameters at 2 bytes.
        assert_eq!(one.weight_bytes_per_gpu, 2 * c.num_parameters() as u64);
        assert!(find(2, 1, "bf16").fits);
        assert!(find(1, 2, "bf16").fits);
        assert!(!find(2, 1, "f32").fits);
        // 80 layers × K and V × 8 KV heads × 128 × 2 bytes, halved by tp=2.
        assert_eq!(find(1, 1, "bf16").kv_bytes_per_token, 80 * 2 * 8 * 128 * 2);
        assert_eq!(find(2, 1, "bf16").kv_bytes_per_token, 80 * 2 * 4 * 128 * 2);
        assert_eq!(recommend(&rows).map(|r| (r.tp, r.pp, r.dtype.as_str())), Some((2, 1, "bf16")));
    }

    #[test]
    fn only_valid_layouts_within_the_gpu_count_are_listed() {
        let c = qwen_72b();
        let rows = plan(&c, &options(6));
        assert!(rows
            .iter()
            .all(|r| r.gpus() <= 6 && Layout { tp: r.tp, pp: r.pp }.validate(&c).is_ok()));
        // 64 heads: tp 3, 5 and 6 are out; tp 4 with pp 1 is in.
        assert!(rows.iter().all(|r| ![3, 5, 6].contains(&r.tp)));
        assert!(rows.iter().any(|r| r.tp == 4 && r.pp == 1));
        assert!(recommend(&plan(&c, &options(1))).is_none());
    }

    #[test]
    fn f16_weights_are_held_in_f32_and_the_kv_cache_is_bf16_whatever_the_weights() {
        let c = qwen_72b();
        let rows = plan(&c, &options(8));
        let find = |dtype: &str| rows.iter().find(|r| r.tp == 4 && r.pp == 1 && r.dtype == dtype).unwrap();
        let (bf16, f16, f32) = (find("bf16"), find("f16"), find("f32"));
        assert_eq!(f16.weight_bytes_per_gpu, 2 * bf16.weight_bytes_per_gpu);
        assert_eq!(f16.weight_bytes_per_gpu, f32.weight_bytes_per_gpu);
        assert_eq!(f32.kv_bytes_per_token, bf16.kv_bytes_per_token);
    }

    #[test]
    fn stage_memory_counts_the_7b_shape_in_bf16() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/qwen2.5-7b.json");
        let c = ModelConfig::from_file(&path).unwrap();
        let workload = options(1).workload;
        let one_stage = Layout { tp: 1, pp: 1 }.stage_layers(&c, None).unwrap();
        let [whole] = stage_memory(&c, 1, &one_stage, DType::BF16, workload)[..] else {
            panic!("one stage")
        };
        assert_eq!(whole.weights, 2 * c.num_parameters() as u64);
        // 28 layers × K and V × 4 KV heads × 128 × 2 bytes.
        assert_eq!(whole.kv_per_token, 28 * 2 * 4 * 128 * 2);
        // Two stages (the 7B's embedding is untied): the weights split, each
        // caches its own layers.
        let halves = stage_memory(&c, 1, &[0..14, 14..28], DType::BF16, workload);
        assert_eq!(halves.iter().map(|m| m.weights).sum::<u64>(), whole.weights);
        assert_eq!(halves[1].kv_per_token, whole.kv_per_token / 2);
    }

    const RANK: RankMemory = RankMemory {
        weights: 10 * GIB,
        workspace: GIB,
        kv_per_token: 1 << 20,
    };

    fn gpu(total_gib: u64, free_gib: u64) -> GpuMemory {
        GpuMemory {
            free: free_gib * GIB,
            total: total_gib * GIB,
        }
    }

    #[test]
    fn kv_tokens_fill_the_share_of_each_gpu_left_after_weights_and_workspace() {
        // Half of 40 GiB, less the 1 GiB in use, less 11 GiB: 8 GiB at 1 MiB a token.
        assert_eq!(kv_tokens_on(&[RANK], 1, &[gpu(40, 39)], 1, 0.5), Ok(8192));
        // Two ranks on one GPU share it: 39 - 22 GiB at 2 MiB a token.
        assert_eq!(kv_tokens_on(&[RANK], 2, &[gpu(40, 39)], 2, 1.0), Ok(8704));
        // A rank a GPU, the busier GPU sets the capacity: 36 - 10 - 11 GiB.
        assert_eq!(kv_tokens_on(&[RANK], 2, &[gpu(40, 39), gpu(40, 30)], 2, 0.9), Ok(15 * 1024));
        // Pipeline stages differ: the heavier one sets it (36 - 1 - 15 GiB).
        let heavy = RankMemory { weights: 14 * GIB, ..RANK };
        assert_eq!(kv_tokens_on(&[RANK, heavy], 1, &[gpu(40, 39), gpu(40, 39)], 2, 0.9), Ok(20 * 1024));
    }

    #[test]
    fn ranks_on_other_nodes_use_their_own_gpus() {
        // tp=4 over two nodes of two GPUs: one rank a GPU, as on one node.
        let alone = kv_tokens_on(&[RANK], 1, &[gpu(40, 39)], 1, 0.9);
        assert_eq!(kv_tokens_on(&[RANK], 4, &[gpu(40, 39), gpu(40, 39)], 2, 0.9), alone);
        // pp=2 × tp=2 over two nodes: node 1 holds the stage that does not fit.
        let heavy = RankMemory { weights: 40 * GIB, ..RANK };
        let Err(FitError::NoRoom { gpu: which, ranks, .. }) = kv_tokens_on(&[RANK, heavy], 2, &[gpu(40, 39), gpu(40, 39)], 2, 0.9) else {
            panic!("the heavy stage does not fit")
        };
        assert_eq!((which.as_str(), ranks), ("node 1's GPU 0", 1));
    }

    #[test]
    fn a_gpu_without_room_for_its_ranks_says_what_they_need() {
        let err = kv_tokens_on(&[RANK], 2, &[gpu(40, 39)], 2, 0.5).unwrap_err();
        let text = err.to_string();
        for part in [
            "GPU 0 has 40.00 GiB, 1.00 GiB of it in use before loading",
            "--gpu-memory-utilization 0.5 leaves 19.00 GiB",
            "its 2 rank(s) need 20.00 GiB of weights and 2.00 GiB of workspace",
            "use more GPUs (--tp, --pp)",
        ] {
            assert!(text.contains(part), "{part:?} not in {text:?}");
        }
        // Memory other processes hold counts against the share.
        assert!(kv_tokens_on(&[RANK], 1, &[gpu(40, 10)], 1, 0.9).is_err());
    }

    #[test]
    fn the_decode_graphs_reserve_twice_their_largest_rows_of_activations_and_logits() {
        let c = qwen_72b();
        let with = options(1).workload;
        let without = Workload { graph_tokens: 0, ..with };
        // Per row at tp=2: 4 × hidden, q/k/v (32 + 2 × 4 heads of 128), gate and up, and the vocabulary slice.
        let row = 4 * 8192 + 40 * 128 + 29568 + 152064 / 2;
        assert_eq!(
            workspace_bytes(&c, 2, with) - workspace_bytes(&c, 2, without),
            4 * 2 * 256 * row as u64
        );
    }
}
