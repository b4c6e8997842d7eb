//! Decode steps as recorded graphs. A batch-1 decode of a small model is
//! bound by the host queueing ~250 kernels, not by the GPU running them;
//! replaying the step as one recorded graph removes that. A graph replays
//! fixed shapes at fixed addresses, so each batch size is padded up to a
//! bucket, and each bucket has its own graph reading a static step buffer
//! that every step refills in place. Padded rows decode token 0 at
//! position 0 in a KV-cache block of their own that the engine never hands
//! out, and pick greedily; their outputs are dropped.
//!
//! A model records when it is not split into pipeline stages and its
//! tensor-parallel ranks, if any, talk through a communicator a graph can
//! hold (NCCL): every TP rank records its shard's graph, the all-reduces
//! and the logits' gather in it, and lays out and samples the tokens in
//! it too (each keeps them for the next step; the first reports them). Only pure decode steps record, whose tokens the model
//! picks without returning logits; anything else, and any backend that
//! records no graphs, runs as usual.

use super::{tp_group, Collectives, ForwardBatch, Pending, Qwen2ForCausalLM, Sampling, StepOutput};
use crate::backend::{Backend, BackendError, PagedAttentionMeta, StepCapacity, StepInputs};
use crate::sampling::RowSampling;

/// Batch sizes with a graph of their own; a batch runs in the smallest
/// that holds it. Past the last, decode steps run as usual.
pub const BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];

/// The smallest bucket that holds a batch of `n`, if one does.
fn bucket_holding(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= n)
}

/// Rows of the largest decode graph batches of up to `max_num_seqs`
/// sequences record: what the graphs' activations are sized by.
pub fn largest_graph(max_num_seqs: usize) -> usize {
    bucket_holding(max_num_seqs).unwrap_or(*BUCKETS.last().expect("buckets"))
}

/// Logit adjustments (penalized and biased tokens) a row's first capture
/// makes room for; a step that needs more records its bucket again, larger.
const ADJUSTMENTS_PER_ROW: usize = 64;

struct Captured<B: Backend> {
    step: B::Step<'static>,
    graph: B::Graph,
    capacity: StepCapacity,
}

/// The recorded decode graphs of one model, by bucket.
pub struct DecodeGraphs<B: Backend> {
    captured: Vec<(usize, Captured<B>)>,
    padding_block: u32,
    max_blocks: usize,
    /// Set when the backend records no graphs, or a capture failed.
    off: bool,
}

impl<B: Backend> DecodeGraphs<B> {
    /// Graphs for an engine's KV cache of `num_blocks` blocks of
    /// `block_size` tokens, for a model of `max_positions`: the cache must
    /// hold [`DecodeGraphs::cache_blocks`] blocks, the last never handed
    /// out (the padding rows write there).
    pub fn new(num_blocks: usize, block_size: usize, max_positions: usize) -> Self {
        DecodeGraphs {
            captured: Vec::new(),
            padding_block: num_blocks as u32,
            max_blocks: max_positions.min(num_blocks * block_size).div_ceil(block_size),
            off: false,
        }
    }

    /// The blocks the KV cache must hold: the engine's, then the padding block.
    pub fn cache_blocks(&self) -> usize {
        self.padding_block as usize + 1
    }

    fn bucket_for(&self, batch: &ForwardBatch) -> Option<usize> {
        let n = batch.token_ids.len();
        let attn = &batch.attn;
        let decode = n > 0 && attn.query_lens.iter().all(|&q| q == 1) && attn.query_lens.len() == n;
        let rows_are_tokens = batch.logit_rows.iter().copied().eq(0..n as u32);
        let sampled_only = matches!(&batch.sampling, Sampling::Model { logits: false, .. });
        let fits = attn.max_blocks() <= self.max_blocks;
        (!self.off && decode && rows_are_tokens && sampled_only && fits)
            .then(|| bucket_holding(n))
            .flatten()
    }
}

/// A decode batch padded to `bucket` rows: the inputs a graph of that
/// bucket replays.
struct Padded {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    attn: PagedAttentionMeta,
    logit_rows: Vec<u32>,
    sampling: Vec<RowSampling>,
}

impl Padded {
    /// `batch` padded to `bucket` rows, its tokens as `local_ids` maps them
    /// to this rank's embedding rows.
    fn new(batch: &ForwardBatch, bucket: usize, padding_block: u32, local_ids: impl Fn(&[u32]) -> Vec<u32>) -> Padded {
        let pad = bucket - batch.token_ids.len();
        let mut attn = batch.attn.clone();
        attn.slot_mapping
            .extend(std::iter::repeat_n(padding_block * attn.block_size as u32, pad));
        attn.query_lens.extend(std::iter::repeat_n(1, pad));
        attn.context_lens.extend(std::iter::repeat_n(1, pad));
        attn.block_tables.extend(std::iter::repeat_n(vec![padding_block], pad));
        let rows = match &batch.sampling {
            Sampling::Model { rows, .. } => rows.clone(),
            Sampling::Caller => unreachable!("only batches the model samples are padded"),
        };
        Padded {
            token_ids: local_ids(&[batch.token_ids.as_slice(), &vec![0; pad]].concat()),
            positions: [batch.positions.as_slice(), &vec![0; pad]].concat(),
            attn,
            logit_rows: (0..bucket as u32).collect(),
            sampling: rows.into_iter().chain(std::iter::repeat_n(RowSampling::greedy(), pad)).collect(),
        }
    }

    fn inputs(&self) -> StepInputs<'_> {
        StepInputs {
            token_ids: &self.token_ids,
            positions: &self.positions,
            attn: &self.attn,
            logit_rows: &self.logit_rows,
            sampling: &self.sampling,
        }
    }

    fn adjustments(&self) -> usize {
        self.sampling.iter().map(|r| r.adjustments.len()).sum()
    }
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// Queues `batch` as a replay of its bucket's graph (recording it
    /// first if need be); `None` where the batch or the backend allows no
    /// graph, leaving the step to [`Qwen2ForCausalLM::queue_shard`].
    pub(super) fn queue_graphed(
        &self,
        graphs: &mut DecodeGraphs<B>,
        batch: &ForwardBatch,
        kv_caches: &mut [B::KvCache],
        comms: Option<&Collectives<'_, B::Tensor>>,
        out: &mut StepOutput,
    ) -> Result<Option<Pending<B>>, BackendError> {
        let one_stage = self.shard.first_stage && self.shard.last_stage;
        let recordable = tp_group(comms).is_none_or(|tp| tp.records_in_graphs());
        let Some(bucket) = graphs.bucket_for(batch).filter(|_| one_stage && recordable) else {
            return Ok(None);
        };
        let padded = Padded::new(batch, bucket, graphs.padding_block, |ids| self.local_ids(ids).into_owned());
        let at = graphs.captured.iter().position(|(b, _)| *b == bucket);
        let roomy = at.is_some_and(|i| graphs.captured[i].1.capacity.adjustments >= padded.adjustments());
        let at = match (at, roomy) {
            (Some(i), true) => i,
            (found, _) => {
                if let Some(i) = found {
                    graphs.captured.swap_remove(i);
                }
                let Some(captured) = self.record(bucket, graphs.max_blocks, &padded, kv_caches, comms)? else {
                    graphs.off = true;
                    return Ok(None);
                };
                graphs.captured.push((bucket, captured));
                graphs.captured.len() - 1
            }
        };
        let Captured { step, graph, .. } = &mut graphs.captured[at].1;
        let b = &self.backend;
        b.update_step(step, padded.inputs())?;
        b.replay(graph)?;
        out.logits.clear();
        out.token_ids.clear();
        let fetch = match self.reports() {
            true => Some(b.fetch_sampled(step)?),
            false => None,
        };
        Ok(Some(Pending {
            fetch,
            rows: batch.token_ids.len(),
        }))
    }

    /// Records the decode graph of `bucket` rows, with a static step filled
    /// with `padded` (so capture-time checks see real inputs). `None` where
    /// the backend records no graphs, or could not record this one (said
    /// once on stderr: the steps then run as usual).
    fn record(
        &self,
        bucket: usize,
        max_blocks: usize,
        padded: &Padded,
        kv_caches: &mut [B::KvCache],
        comms: Option<&Collectives<'_, B::Tensor>>,
    ) -> Result<Option<Captured<B>>, BackendError> {
        let b = &self.backend;
        let adjustments = (bucket * ADJUSTMENTS_PER_ROW).max(padded.adjustments().next_power_of_two());
        let capacity = StepCapacity {
            tokens: bucket,
            seqs: bucket,
            max_blocks,
            rows: bucket,
            adjustments,
        };
        let Some(mut step) = b.static_step(capacity)? else {
            return Ok(None);
        };
        b.update_step(&mut step, padded.inputs())?;
        let recorded = b.capture(&mut || {
            let local = self
                .run_layers(&step, bucket, kv_caches, comms)?
                .expect("one stage's forward ends in logits");
            let mut logits = self.whole_logits(local, bucket, tp_group(comms))?;
            b.sample(&mut logits, &mut step)
        });
        match recorded {
            Ok(graph) => Ok(Some(Captured { step, graph, capacity })),
            Err(e) => {
                eprintln!("shardline: decode steps run without graphs: recording one of {bucket} rows failed: {e}");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::largest_graph;

    #[test]
    fn the_largest_graph_is_the_bucket_holding_every_sequence_up_to_the_last() {
        assert_eq!(largest_graph(1), 1);
        assert_eq!(largest_graph(100), 128);
        assert_eq!(largest_graph(256), 256);
        assert_eq!(largest_graph(1000), 256);
    }
}
