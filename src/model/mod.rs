//! A Qwen2 causal LM over any [`Backend`]: embedding, decoder layers, final
//! norm and LM head (tied to the embedding or not), driven one batch of new
//! tokens at a time through a paged KV cache.

mod graphs;
mod qwen2;
mod shard;

pub use graphs::{largest_graph, DecodeGraphs, BUCKETS};
pub use shard::Shard;

use crate::backend::{previous_row, Backend, BackendError, KvCacheShape, PagedAttentionMeta, StepInputs};
use crate::config::ModelConfig;
use crate::loader::{LoadError, WeightSource};
use crate::parallel::Communicator;
use crate::sampling::RowSampling;
use qwen2::{rope_cos_sin_table, ForwardCtx, Qwen2DecoderLayer};
use std::borrow::Cow;

/// One step's input: the new tokens of every sequence in the batch, where
/// they go in the KV cache, and which of them need logits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardBatch {
    /// `[n]` new tokens, sequence after sequence; a token the previous
    /// step samples and has not returned yet is a
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) id (on an executor with
    /// [`crate::executor::Executor::lookahead`]).
    pub token_ids: Vec<u32>,
    /// `[n]` position of each new token in its sequence.
    pub positions: Vec<u32>,
    pub attn: PagedAttentionMeta,
    /// Rows of the batch whose logits are computed (usually each sequence's last).
    pub logit_rows: Vec<u32>,
    pub sampling: Sampling,
}

/// Who turns the logits of a batch's `logit_rows` into tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Sampling {
    /// The caller: the step returns the logits.
    #[default]
    Caller,
    /// The last stage, one [`RowSampling`] per logit row, on its device:
    /// the step returns the token ids, and the raw logits only when
    /// `logits` is set (for logprobs).
    Model { rows: Vec<RowSampling>, logits: bool },
}

/// What a step returns for its batch's `logit_rows`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// `[rows, vocab]`, unless the model sampled and was not asked for them.
    pub logits: Vec<f32>,
    /// `[rows]` when the model sampled; else empty.
    pub token_ids: Vec<u32>,
}

/// A step queued on the device whose sampled tokens are still on their
/// way: [`Qwen2ForCausalLM::finish`] waits for them.
pub struct Pending<B: Backend> {
    fetch: Option<B::Fetch>,
    /// The batch's rows among those fetched (a graph's are padded).
    rows: usize,
}

impl StepOutput {
    /// Logit row `row` of a `vocab`-token model, if the logits came back.
    pub fn row_logits(&self, row: usize, vocab: usize) -> Option<&[f32]> {
        self.logits.get(row * vocab..(row + 1) * vocab)
    }
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
            sampling: Sampling::Caller,
        }
    }

    /// One past the largest row of the previous step whose token a
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) id of this batch names; 0
    /// where none does.
    pub fn previous_sample_rows(&self) -> usize {
        let rows = self.token_ids.iter().filter_map(|&id| previous_row(id));
        rows.map(|at| at as usize + 1).max().unwrap_or(0)
    }

    fn returns_logits(&self) -> bool {
        matches!(self.sampling, Sampling::Caller | Sampling::Model { logits: true, .. })
    }

    /// The step's inputs with `token_ids` (this rank's rows of the
    /// embedding), and the sampling rows when the backend samples them.
    pub fn inputs<'a>(&'a self, token_ids: &'a [u32], backend_samples: bool) -> StepInputs<'a> {
        let sampling = match &self.sampling {
            Sampling::Model { rows, .. } if backend_samples => rows.as_slice(),
            _ => &[],
        };
        StepInputs {
            token_ids,
            positions: &self.positions,
            attn: &self.attn,
            logit_rows: &self.logit_rows,
            sampling,
        }
    }
}

pub struct Qwen2ForCausalLM<B: Backend> {
    backend: B,
    config: ModelConfig,
    shard: Shard,
    /// First stage: the token embedding (this rank's vocabulary rows).
    embed_tokens: Option<B::Weight>,
    /// This stage's layers.
    layers: Vec<Qwen2DecoderLayer<B>>,
    /// Last stage: the final norm.
    norm: Option<B::Weight>,
    /// Last stage: the LM head, unless it is tied to `embed_tokens` on
    /// this same stage.
    lm_head: Option<B::Weight>,
    rope_cos_sin: B::Weight,
}

/// The communicators of a rank whose model is split: its tensor-parallel
/// group (the ranks of its stage) and its pipeline group (the stages, at
/// its TP rank).
pub struct Collectives<'a, T> {
    pub tp: &'a dyn Communicator<T>,
    pub pp: &'a dyn Communicator<T>,
}

/// The tensor-parallel group, where the layers are split over more than one rank.
fn tp_group<'a, T>(comms: Option<&Collectives<'a, T>>) -> Option<&'a dyn Communicator<T>> {
    comms.map(|c| c.tp).filter(|tp| tp.size() > 1)
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// The whole model on one device.
    pub fn load(backend: B, config: ModelConfig, source: &dyn WeightSource) -> Result<Self, LoadError> {
        let shard = Shard::whole(&config);
        Self::load_shard(backend, config, source, shard)
    }

    /// The part of the model one rank holds: its stage's layers, sliced for
    /// its TP rank. Each weight is read, sliced and uploaded in turn.
    pub fn load_shard(backend: B, config: ModelConfig, source: &dyn WeightSource, shard: Shard) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let vocab_rows =
            |name: &str| -> Result<B::Weight, LoadError> { Ok(backend.load_weight(shard.vocab_rows(&config, source, name)?)?) };
        let embedding = || vocab_rows("model.embed_tokens.weight");
        let embed_tokens = match shard.first_stage {
            true => Some(embedding()?),
            false => None,
        };
        let layers = shard
            .layers
            .clone()
            .map(|i| Qwen2DecoderLayer::load(&backend, &config, source, i, &shard))
            .collect::<Result<Vec<_>, _>>()?;
        let (norm, lm_head) = match shard.last_stage {
            false => (None, None),
            true => {
                let norm = backend.load_weight(source.tensor("model.norm.weight", &[h])?)?;
                let lm_head = match (config.tie_word_embeddings, shard.first_stage) {
                    (true, true) => None,
                    (true, false) => Some(embedding()?),
                    (false, _) => Some(vocab_rows("lm_head.weight")?),
                };
                (Some(norm), lm_head)
            }
        };
        let rope_cos_sin = backend.load_weight(rope_cos_sin_table(&config))?;
        Ok(Qwen2ForCausalLM {
            backend,
            config,
            shard,
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

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn head(&self) -> Option<&B::Weight> {
        self.lm_head
            .as_ref()
            .or(self.embed_tokens.as_ref().filter(|_| self.shard.last_stage))
    }

    /// Weight bytes one decode step streams on this rank: its layers and,
    /// on the last stage, the final norm and the LM head (the embedding
    /// lookup reads a single row).
    pub fn decode_weight_bytes(&self) -> usize {
        let b = &self.backend;
        let layers: usize = self.layers.iter().map(|l| l.weight_bytes(b)).sum();
        layers + self.norm.iter().chain(self.head()).map(|w| b.weight_bytes(w)).sum::<usize>()
    }

    /// The per-layer KV cache shape for `num_blocks` blocks of `block_size`
    /// tokens (this rank's KV heads).
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_blocks,
            block_size,
            num_kv_heads: self.shard.kv_heads(&self.config).len(),
            head_dim: self.config.head_dim(),
        }
    }

    /// KV-cache bytes one token takes across this rank's layers, at `dtype_bytes` per value.
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        self.layers.len() * self.kv_cache_shape(1, 1).bytes_per_slot(dtype_bytes)
    }

    /// One KV cache per layer of this stage.
    pub fn alloc_kv_caches(&self, shape: KvCacheShape) -> Result<Vec<B::KvCache>, BackendError> {
        (0..self.layers.len()).map(|_| self.backend.alloc_kv_cache(shape)).collect()
    }

    /// Runs the batch through every layer, writing its keys and values into
    /// `kv_caches`, and puts what `batch.sampling` asks for (the logits of
    /// `batch.logit_rows` as row-major `[rows, vocab]` f32, or the tokens
    /// sampled from them) into `out`.
    pub fn forward(&self, batch: &ForwardBatch, kv_caches: &mut [B::KvCache], out: &mut StepOutput) -> Result<(), BackendError> {
        let pending = self.queue_shard(batch, kv_caches, None, out)?;
        self.finish(pending, out)
    }

    /// Queues this rank's part of a forward on the device, up to its
    /// sampled tokens, which may still be on their way
    /// ([`Qwen2ForCausalLM::finish`] waits for them): as a replay of its
    /// decode graph where `graphs` allow one, else op by op. A first stage
    /// embeds the tokens, a later one receives the hidden states from the
    /// stage before; a last stage fills `out` (on its first TP rank, which
    /// reports the step), an earlier one sends its hidden states on and
    /// leaves `out` empty.
    pub fn queue(
        &self,
        graphs: Option<&mut DecodeGraphs<B>>,
        batch: &ForwardBatch,
        kv_caches: &mut [B::KvCache],
        comms: Option<&Collectives<'_, B::Tensor>>,
        out: &mut StepOutput,
    ) -> Result<Pending<B>, BackendError> {
        if let Some(graphs) = graphs {
            if let Some(pending) = self.queue_graphed(graphs, batch, kv_caches, comms, out)? {
                return Ok(pending);
            }
        }
        self.queue_shard(batch, kv_caches, comms, out)
    }

    /// [`Qwen2ForCausalLM::queue`], op by op.
    fn queue_shard(
        &self,
        batch: &ForwardBatch,
        kv_caches: &mut [B::KvCache],
        comms: Option<&Collectives<'_, B::Tensor>>,
        out: &mut StepOutput,
    ) -> Result<Pending<B>, BackendError> {
        let ids = self.local_ids(&batch.token_ids);
        let mut step = self.backend.prepare_step(batch.inputs(&ids, self.shard.last_stage))?;
        out.logits.clear();
        out.token_ids.clear();
        let fetch = match self.run_layers(&step, batch.token_ids.len(), kv_caches, comms)? {
            Some(local) => self.output(batch, local, &mut step, tp_group(comms), out)?,
            None => None,
        };
        Ok(Pending {
            fetch,
            rows: batch.logit_rows.len(),
        })
    }

    /// Waits for a queued step's sampled tokens and puts them in `out`.
    pub fn finish(&self, pending: Pending<B>, out: &mut StepOutput) -> Result<(), BackendError> {
        if let Some(fetch) = pending.fetch {
            out.token_ids = self.backend.fetched(fetch, pending.rows)?;
        }
        Ok(())
    }

    /// Whether this rank reports the step's tokens: the last stage's first
    /// TP rank (each of the stage's ranks picks them, the same ones, and
    /// keeps them for the next step's
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids).
    fn reports(&self) -> bool {
        self.shard.last_stage && self.shard.tp_rank == 0
    }

    /// The device's part of a forward, from its prepared `step` of `tokens`
    /// tokens: the layers, then on the last stage the final norm and the LM
    /// head of the step's logit rows, giving this rank's logits. An earlier
    /// stage sends its hidden states on and gives `None`.
    fn run_layers(
        &self,
        step: &B::Step<'_>,
        tokens: usize,
        kv_caches: &mut [B::KvCache],
        comms: Option<&Collectives<'_, B::Tensor>>,
    ) -> Result<Option<B::Tensor>, BackendError> {
        let b = &self.backend;
        let ctx = ForwardCtx {
            backend: b,
            step,
            rope_cos_sin: &self.rope_cos_sin,
            rms_norm_eps: self.config.rms_norm_eps as f32,
            tp: tp_group(comms),
        };
        let mut hidden = match (&self.embed_tokens, comms) {
            (Some(table), _) => {
                let vocab = self.shard.vocab(&self.config);
                let mut hidden = b.embedding(table, step, vocab.start as u32..vocab.end as u32)?;
                ctx.all_reduce(&mut hidden)?;
                hidden
            }
            (None, Some(c)) => {
                let mut hidden = b.zeros(tokens, self.config.hidden_size)?;
                c.pp.recv(&mut hidden, c.pp.rank() - 1)?;
                hidden
            }
            (None, None) => unreachable!("a later pipeline stage always has communicators"),
        };
        for (layer, cache) in self.layers.iter().zip(kv_caches.iter_mut()) {
            layer.forward(&mut hidden, cache, &ctx)?;
        }
        let (Some(norm), Some(head)) = (&self.norm, self.head()) else {
            let c = comms.expect("a split model has communicators");
            c.pp.send(&hidden, c.pp.rank() + 1)?;
            return Ok(None);
        };
        let normed = b.final_norm(&hidden, step, norm, ctx.rms_norm_eps)?;
        Ok(Some(b.linear(&normed, head, None)?))
    }

    /// Puts the logits the batch asks for from the last stage's `local`
    /// logits (this rank's vocabulary slice) into `out`, and starts
    /// fetching the tokens sampled from them. Split, every TP rank gathers
    /// the slices, lays them out side by side on its device and samples
    /// there (the same tokens on each, from the same logits); only the
    /// first, which reports the step, returns them.
    fn output(
        &self,
        batch: &ForwardBatch,
        local: B::Tensor,
        step: &mut B::Step<'_>,
        tp: Option<&dyn Communicator<B::Tensor>>,
        out: &mut StepOutput,
    ) -> Result<Option<B::Fetch>, BackendError> {
        let b = &self.backend;
        let mut logits = self.whole_logits(local, batch.logit_rows.len(), tp)?;
        if batch.returns_logits() && self.reports() {
            b.to_host(&logits, &mut out.logits)?;
        }
        if let Sampling::Model { .. } = &batch.sampling {
            b.sample(&mut logits, step)?;
            if self.reports() {
                return Ok(Some(b.fetch_sampled(step)?));
            }
        }
        Ok(None)
    }

    /// `[rows, vocab]` logits from this rank's `local` slice of `rows` rows:
    /// the slice itself when the vocabulary is whole; split, the slices
    /// gathered from every TP rank and laid out.
    fn whole_logits(&self, local: B::Tensor, rows: usize, tp: Option<&dyn Communicator<B::Tensor>>) -> Result<B::Tensor, BackendError> {
        let Some(tp) = tp else {
            return Ok(local);
        };
        let per = self.shard.vocab_per_rank(&self.config);
        let mut all = self.backend.zeros(tp.size() * rows, per + 1)?;
        tp.all_gather(&local, &mut all)?;
        self.backend.lay_out_vocab(&all, tp.size(), per, self.config.vocab_size)
    }

    /// Token ids as rows of this rank's embedding: ids of other ranks'
    /// vocabulary read the final zero row;
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids stay as they are (the
    /// embedding maps their tokens).
    fn local_ids<'a>(&self, ids: &'a [u32]) -> Cow<'a, [u32]> {
        if self.shard.tp == 1 {
            return Cow::Borrowed(ids);
        }
        let mine = self.shard.vocab(&self.config);
        let zero_row = self.shard.vocab_per_rank(&self.config) as u32;
        let local = ids
            .iter()
            .map(|&id| match (previous_row(id).is_some(), mine.contains(&(id as usize))) {
                // Mapped on the device, where the token is.
                (true, _) => id,
                (false, true) => id - mine.start as u32,
                (false, false) => zero_row,
            });
        Cow::Owned(local.collect())
    }
}
