//! What runs the model forward for the engine and the generator: a model
//! on one device, driven from the caller's thread ([`LocalExecutor`]), or
//! one worker thread per rank of a split model ([`Workers`]).

mod workers;

pub use workers::{WorkerOptions, Workers, WorkersError};

use crate::backend::{Backend, BackendError};
use crate::config::ModelConfig;
use crate::model::{ForwardBatch, Qwen2ForCausalLM};

pub trait Executor: Send {
    fn config(&self) -> &ModelConfig;

    /// Weight bytes one decode step streams, over all ranks.
    fn decode_weight_bytes(&self) -> usize;

    /// Runs one step, writing its KV cache, and puts the logits of
    /// `batch.logit_rows` into `logits` as `[rows, vocab]`.
    fn forward(&mut self, batch: &ForwardBatch, logits: &mut Vec<f32>) -> Result<(), BackendError>;
}

/// The whole model on one device, with its KV cache.
pub struct LocalExecutor<B: Backend> {
    model: Qwen2ForCausalLM<B>,
    kv_caches: Vec<B::KvCache>,
}

impl<B: Backend> LocalExecutor<B> {
    pub fn new(model: Qwen2ForCausalLM<B>, num_blocks: usize, block_size: usize) -> Result<Self, BackendError> {
        let kv_caches = model.alloc_kv_caches(model.kv_cache_shape(num_blocks, block_size))?;
        Ok(LocalExecutor { model, kv_caches })
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

    fn forward(&mut self, batch: &ForwardBatch, logits: &mut Vec<f32>) -> Result<(), BackendError> {
        self.model.forward(batch, &mut self.kv_caches, logits)
    }
}
