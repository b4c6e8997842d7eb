//! What runs the model forward for the engine and the generator: a model
//! on one device, driven from the caller's thread ([`LocalExecutor`]), or
//! one worker thread per rank of a split model ([`Workers`]).

mod codec;
mod nccl;
mod nodes;
mod peer;
mod rank;
mod workers;

pub use nccl::{nccl_ids, nccl_transport};
pub use nodes::{NodeError, NodeSpec};
pub use workers::{BusyTimes, Connect, Group, Membership, Transport, WorkerOptions, Workers, WorkersError};

use crate::backend::{Backend, BackendError};
use crate::config::ModelConfig;
use crate::model::{DecodeGraphs, ForwardBatch, Pending, Qwen2ForCausalLM, Sampling, StepOutput};
use std::collections::VecDeque;

pub trait Executor: Send {
    fn config(&self) -> &ModelConfig;

    /// Weight bytes one decode step streams, over all ranks.
    fn decode_weight_bytes(&self) -> usize;

    /// Steps that may be in flight at once: one per pipeline stage, so each
    /// stage works on its own micro-batch.
    fn depth(&self) -> usize {
        1
    }

    /// Whether a step may be submitted before the last one is collected,
    /// naming tokens that one samples as [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids (one
    /// step more than [`Executor::depth`] in flight): the device then goes
    /// from step to step while the host takes in the last one's tokens.
    fn lookahead(&self) -> bool {
        false
    }

    /// Starts a step (writing its KV cache); at most [`Executor::depth`]
    /// may be in flight, one more with [`Executor::lookahead`]. A failed
    /// step drops every step in flight after it.
    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError>;

    /// Waits for the oldest step in flight and puts what its batch asked
    /// for (logits, sampled tokens) into `out`.
    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError>;
}

/// Checks that `batch` takes tokens only from the rows the step before it
/// sampled on the device (`sampled` of them), and counts for its rows'
/// penalties only coming tokens it takes; returns how many `batch` samples
/// there, for the step after it.
fn rows_sampled_after(batch: &ForwardBatch, sampled: usize) -> Result<usize, BackendError> {
    let previous = batch.previous_sample_rows();
    if previous > sampled {
        return Err(BackendError::Device(format!(
            "a step takes row {} of the previous step's tokens, which sampled {sampled}",
            previous - 1
        )));
    }
    if let Some(at) = batch.inputs(&batch.token_ids, true).unresolved_coming() {
        return Err(BackendError::Device(format!(
            "a row counts row {at} of the previous step's tokens, which no token of its step takes"
        )));
    }
    Ok(match batch.sampling {
        Sampling::Model { .. } => batch.logit_rows.len(),
        Sampling::Caller => 0,
    })
}

/// The whole model on one device, with its KV cache; decode steps replay
/// recorded graphs where the backend records them.
pub struct LocalExecutor<B: Backend> {
    model: Qwen2ForCausalLM<B>,
    kv_caches: Vec<B::KvCache>,
    graphs: Option<DecodeGraphs<B>>,
    /// The submitted steps, oldest first: each one's output so far and its
    /// tokens on their way, until collected (the device runs them meanwhile).
    done: VecDeque<(StepOutput, Pending<B>)>,
    /// Rows the last submitted step samples on the device (what its
    /// successor's [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids may name).
    last_sampled_rows: usize,
    /// Buffers kept between steps so large logits are not reallocated.
    spare: Vec<StepOutput>,
}

impl<B: Backend> LocalExecutor<B> {
    /// `num_blocks` KV blocks of `block_size` tokens for the engine, and
    /// decode graphs.
    pub fn new(model: Qwen2ForCausalLM<B>, num_blocks: usize, block_size: usize) -> Result<Self, BackendError> {
        Self::with_graphs(model, num_blocks, block_size, true)
    }

    /// As [`LocalExecutor::new`]; without `graphs` every step runs op by op
    /// (`--enforce-eager`). With them the cache holds one block more, past
    /// the engine's, where the rows that pad a batch to its graph write.
    pub fn with_graphs(model: Qwen2ForCausalLM<B>, num_blocks: usize, block_size: usize, graphs: bool) -> Result<Self, BackendError> {
        let graphs = graphs.then(|| DecodeGraphs::new(num_blocks, block_size, model.config().max_position_embeddings));
        let cache_blocks = graphs.as_ref().map_or(num_blocks, DecodeGraphs::cache_blocks);
        let kv_caches = model.alloc_kv_caches(model.kv_cache_shape(cache_blocks, block_size))?;
        Ok(LocalExecutor {
            model,
            kv_caches,
            graphs,
            done: VecDeque::new(),
            last_sampled_rows: 0,
            spare: Vec::new(),
        })
    }
}

impl<B: Backend> Executor for LocalExecutor<B>
where
    B: Send,
    B::Weight: Send,
    B::KvCache: Send,
{
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn decode_weight_bytes(&self) -> usize {
        self.model.decode_weight_bytes()
    }

    fn lookahead(&self) -> bool {
        true
    }

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        assert!(self.done.len() < 2, "a local executor runs a step and the one after it");
        let sampled = rows_sampled_after(&batch, self.last_sampled_rows).inspect_err(|_| self.done.clear())?;
        let mut out = self.spare.pop().unwrap_or_default();
        let queued = self.model.queue(self.graphs.as_mut(), &batch, &mut self.kv_caches, None, &mut out);
        let pending = queued.inspect_err(|_| self.done.clear())?;
        self.last_sampled_rows = sampled;
        self.done.push_back((out, pending));
        Ok(())
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError> {
        let (mut done, pending) = self.done.pop_front().expect("collect follows submit");
        self.model.finish(pending, &mut done).inspect_err(|_| self.done.clear())?;
        self.spare.push(std::mem::replace(out, done));
        Ok(())
    }
}
