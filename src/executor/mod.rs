//! What runs the model forward for the engine and the generator: a model
//! on one device, driven from the caller's thread ([`LocalExecutor`]), or
//! one worker thread per rank of a split model ([`Workers`]).

mod codec;
mod nccl;
mod nodes;
mod workers;

pub use nccl::{nccl_ids, nccl_transport};
pub use nodes::{NodeError, NodeSpec};
pub use workers::{BusyTimes, Connect, Group, Membership, Transport, WorkerOptions, Workers, WorkersError};

use crate::backend::{Backend, BackendError};
use crate::config::ModelConfig;
use crate::model::{DecodeGraphs, ForwardBatch, Pending, Qwen2ForCausalLM, StepOutput};

pub trait Executor: Send {
    fn config(&self) -> &ModelConfig;

    /// Weight bytes one decode step streams, over all ranks.
    fn decode_weight_bytes(&self) -> usize;

    /// Steps that may be in flight at once: one per pipeline stage, so each
    /// stage works on its own micro-batch.
    fn depth(&self) -> usize {
        1
    }

    /// Starts a step (writing its KV cache); at most [`Executor::depth`]
    /// may be in flight.
    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError>;

    /// Waits for the oldest step in flight and puts what its batch asked
    /// for (logits, sampled tokens) into `out`.
    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError>;

    /// One step, start to finish.
    fn forward(&mut self, batch: ForwardBatch, out: &mut StepOutput) -> Result<(), BackendError> {
        self.submit(batch)?;
        self.collect(out)
    }
}

/// The whole model on one device, with its KV cache; decode steps replay
/// recorded graphs where the backend records them.
pub struct LocalExecutor<B: Backend> {
    model: Qwen2ForCausalLM<B>,
    kv_caches: Vec<B::KvCache>,
    graphs: Option<DecodeGraphs<B>>,
    /// The submitted step: its output so far and its tokens on their way,
    /// until collected (the device runs it meanwhile).
    done: Option<(StepOutput, Pending<B>)>,
    /// Buffers kept between steps so large logits are not reallocated.
    spare: StepOutput,
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
            done: None,
            spare: StepOutput::default(),
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

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        assert!(self.done.is_none(), "a local executor runs one step at a time");
        let mut out = std::mem::take(&mut self.spare);
        let pending = self
            .model
            .queue(self.graphs.as_mut(), &batch, &mut self.kv_caches, None, &mut out)?;
        self.done = Some((out, pending));
        Ok(())
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError> {
        let (mut done, pending) = self.done.take().expect("collect follows submit");
        self.model.finish(pending, &mut done)?;
        self.spare = std::mem::replace(out, done);
        Ok(())
    }
}
