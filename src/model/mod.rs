//! A Qwen2 causal LM over any [`Backend`]: embedding, decoder layers, final
//! norm and LM head (tied to the embedding or not), driven one batch of new
//! tokens at a time through a paged KV cache.

mod qwen2;

use crate::backend::{Backend, BackendError, KvCacheShape, PagedAttentionMeta};
use crate::config::ModelConfig;
use crate::loader::{LoadError, WeightSource};
use qwen2::{rope_cos_sin_table, ForwardCtx, Qwen2DecoderLayer};

/// One step's input: the new tokens of every sequence in the batch, where
/// they go in the KV cache, and which of them need logits.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    /// `[n]` new tokens, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// `[n]` position of each new token in its sequence.
    pub positions: Vec<u32>,
    pub attn: PagedAttentionMeta,
    /// Rows of the batch whose logits are returned (usually each sequence's last).
    pub logit_rows: Vec<u32>,
}

impl ForwardBatch {
    /// One sequence whose context `[0, start + ids.len())` lives in the blocks
    /// of `block_table`, appending `ids` at positions `start..`.
    pub fn single(ids: &[u32], start: usize, block_table: &[u32], block_size: usize, all_logits: bool) -> Self {
        let positions: Vec<u32> = (start..start + ids.len()).map(|p| p as u32).collect();
        let slot_mapping = positions
            .iter()
            .map(|&p| block_table[p as usize / block_size] * block_size as u32 + p % block_size as u32)
            .collect();
        let logit_rows = if all_logits {
            (0..ids.len() as u32).collect()
        } else {
            vec![ids.len() as u32 - 1]
        };
        ForwardBatch {
            token_ids: ids.to_vec(),
            positions,
            attn: PagedAttentionMeta {
                block_size,
                slot_mapping,
                query_lens: vec![ids.len()],
                context_lens: vec![start + ids.len()],
                block_tables: vec![block_table.to_vec()],
            },
            logit_rows,
        }
    }
}

pub struct Qwen2ForCausalLM<B: Backend> {
    backend: B,
    config: ModelConfig,
    embed_tokens: B::Weight,
    layers: Vec<Qwen2DecoderLayer<B>>,
    norm: B::Weight,
    /// `None` when the LM head is tied to `embed_tokens`.
    lm_head: Option<B::Weight>,
    rope_cos_sin: B::Weight,
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    pub fn load(backend: B, config: ModelConfig, source: &dyn WeightSource) -> Result<Self, LoadError> {
        let (vocab, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = backend.load_weight(source.tensor("model.embed_tokens.weight", &[vocab, h])?)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Qwen2DecoderLayer::load(&backend, &config, source, i))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = backend.load_weight(source.tensor("model.norm.weight", &[h])?)?;
        let lm_head = match config.tie_word_embeddings {
            true => None,
            false => Some(backend.load_weight(source.tensor("lm_head.weight", &[vocab, h])?)?),
        };
        let rope_cos_sin = backend.load_weight(rope_cos_sin_table(&config))?;
        Ok(Qwen2ForCausalLM {
            backend,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_cos_sin,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Weight bytes one decode step streams: every layer, the final norm and
    /// the LM head (the embedding lookup reads a single row).
    pub fn decode_weight_bytes(&self) -> usize {
        let b = &self.backend;
        let layers: usize = self.layers.iter().map(|l| l.weight_bytes(b)).sum();
        layers + b.weight_bytes(&self.norm) + b.weight_bytes(self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// The per-layer KV cache shape for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads(),
            head_dim: self.config.head_dim(),
        }
    }

    /// KV-cache bytes one token takes across all layers, at `dtype_bytes` per value.
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        self.layers.len() * self.kv_cache_shape(1, 1).bytes_per_slot(dtype_bytes)
    }

    /// One KV cache per layer.
    pub fn alloc_kv_caches(&self, shape: KvCacheShape) -> Result<Vec<B::KvCache>, BackendError> {
        (0..self.layers.len()).map(|_| self.backend.alloc_kv_cache(shape)).collect()
    }

    /// Runs the batch through every layer, writing its keys and values into
    /// `kv_caches`, and puts the logits of `batch.logit_rows` into `logits`
    /// as row-major `[logit_rows, vocab]` f32.
    pub fn forward(&self, batch: &ForwardBatch, kv_caches: &mut [B::KvCache], logits: &mut Vec<f32>) -> Result<(), BackendError> {
        let b = &self.backend;
        let ctx = ForwardCtx {
            backend: b,
            batch,
            rope_cos_sin: &self.rope_cos_sin,
            rms_norm_eps: self.config.rms_norm_eps as f32,
        };
        let mut hidden = b.embedding(&self.embed_tokens, &batch.token_ids)?;
        for (layer, cache) in self.layers.iter().zip(kv_caches.iter_mut()) {
            layer.forward(&mut hidden, cache, &ctx)?;
        }
        let last = b.select_rows(&hidden, &batch.logit_rows)?;
        let normed = b.rms_norm(&last, &self.norm, ctx.rms_norm_eps)?;
        let device_logits = b.linear(&normed, self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)?;
        b.to_host(&device_logits, logits)
    }
}
