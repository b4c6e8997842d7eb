//! "Do the math" before buying GPUs: for every `tp × pp` layout on up to N
//! GPUs and every weight dtype, the bytes each GPU holds, the KV cache each
//! token takes on it, how many tokens of KV cache fit in what is left, and
//! whether that is enough to serve.

use super::layout::{valid_tp, Layout, ShardSizes};
use crate::backend::DType;
use crate::config::ModelConfig;

/// What a plan assumes beyond the model and the GPUs.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    pub gpus: usize,
    pub gpu_memory_bytes: u64,
    /// Fraction of each GPU's memory shardline may use (vLLM's default 0.9
    /// leaves the rest to the CUDA context, NCCL and fragmentation).
    pub gpu_memory_utilization: f64,
    /// Tokens per step, which sizes the activation workspace.
    pub max_num_batched_tokens: usize,
    /// Sequences per step, which sizes the logits buffer.
    pub max_num_seqs: usize,
    /// A layout fits when, after weights and workspace, this many tokens of
    /// KV cache fit (one request of this length, or several shorter).
    pub min_kv_tokens: usize,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PlanRow {
    pub tp: usize,
    pub pp: usize,
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

/// Every valid layout on up to `options.gpus` GPUs, for each weight dtype
/// shardline runs (KV cache in the same width: bf16/f16 → 2 bytes, f32 → 4).
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
    let shard = ShardSizes::new(config, layout.tp);
    let stages = layout.stage_layers(config, None).expect("plan only builds valid layouts");
    let bytes = dtype.size_in_bytes() as u64;
    let workspace = workspace_bytes(config, layout.tp, options);
    let usable = (options.gpu_memory_bytes as f64 * options.gpu_memory_utilization) as u64;
    // Per stage: its weights, its KV bytes per token, the tokens it can cache.
    let per_stage: Vec<(u64, u64, u64)> = stages
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
            let weights = params as u64 * bytes;
            let kv = (range.len() * 2 * shard.kv_heads * config.head_dim()) as u64 * bytes;
            (weights, kv, usable.saturating_sub(weights + workspace) / kv.max(1))
        })
        .collect();
    let weight_bytes_per_gpu = per_stage.iter().map(|s| s.0).max().expect("at least one stage");
    // Every stage caches every token: the tightest stage sets the capacity.
    let (_, kv_bytes_per_token, max_kv_tokens) = *per_stage.iter().min_by_key(|s| s.2).expect("at least one stage");
    PlanRow {
        tp: layout.tp,
        pp: layout.pp,
        dtype: dtype.to_string(),
        weight_bytes_per_gpu,
        workspace_bytes_per_gpu: workspace,
        kv_bytes_per_token,
        max_kv_tokens,
        fits: max_kv_tokens >= options.min_kv_tokens as u64,
    }
}

/// Peak activations of one step, in f32: the residual stream and norms
/// (4 × hidden), this rank's q/k/v and gate/up outputs, and the logits of
/// every sequence over this rank's vocabulary slice.
fn workspace_bytes(config: &ModelConfig, tp: usize, options: &PlanOptions) -> u64 {
    let shard = ShardSizes::new(config, tp);
    let hd = config.head_dim();
    let qkv = (config.num_attention_heads / tp + 2 * shard.kv_heads) * hd;
    let per_token = 4 * config.hidden_size + qkv + 2 * config.intermediate_size / tp;
    let logits = options.max_num_seqs * config.vocab_size.div_ceil(tp);
    4 * (options.max_num_batched_tokens * per_token + logits) as u64
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
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
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
}
