//! One prompt generated to the end (on one device, or split over ranks by
//! an executor): the prompt in one step, then one token a step until EOS
//! or `max_tokens`, each token picked by the model where its logits are.
//! Where the executor looks ahead and the sampling reads no history, each
//! step is submitted before the last one's token is back, naming it as the
//! device's [`PREVIOUS_SAMPLE`]: an EOS then costs one wasted step.
//! This is the path of `shardline generate` and `shardline bench`; the
//! serving engine batches many sequences through the same model forward
//! instead.

use crate::backend::{Backend, BackendError, PREVIOUS_SAMPLE};
use crate::executor::{Executor, LocalExecutor};
use crate::model::{ForwardBatch, Qwen2ForCausalLM, Sampling, StepOutput};
use crate::sampling::{RowSampling, SampledToken, Sampler, SamplingParams};
use std::time::{Duration, Instant};

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty; give at least one token")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("max_tokens {max_tokens} + prompt {prompt} tokens exceeds the model's {context}-token context")]
    ContextLengthExceeded { max_tokens: usize, prompt: usize, context: usize },
    #[error("the sequence would hold {tokens} tokens, over the {context}-token context")]
    SequenceTooLong { tokens: usize, context: usize },
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// KV blocks that hold `capacity` tokens.
pub fn blocks_for(capacity: usize) -> usize {
    capacity.div_ceil(BLOCK_SIZE).max(1)
}

/// A model (on one device or split over ranks) with the KV cache of one
/// sequence.
pub struct Generator {
    executor: Box<dyn Executor>,
    block_table: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
}

impl Generator {
    /// A model on one device, with a KV cache for `capacity` tokens.
    pub fn new<B>(model: Qwen2ForCausalLM<B>, capacity: usize) -> Result<Self, BackendError>
    where
        B: Backend + Send + 'static,
        B::Weight: Send,
        B::KvCache: Send,
    {
        let num_blocks = blocks_for(capacity);
        Ok(Self::with_executor(
            Box::new(LocalExecutor::new(model, num_blocks, BLOCK_SIZE)?),
            num_blocks,
        ))
    }

    /// Runs on `executor`, whose KV cache holds `num_blocks` blocks (see [`blocks_for`]).
    pub fn with_executor(executor: Box<dyn Executor>, num_blocks: usize) -> Self {
        Generator {
            executor,
            block_table: (0..num_blocks as u32).collect(),
            cached: 0,
        }
    }

    pub fn executor(&self) -> &dyn Executor {
        self.executor.as_ref()
    }

    /// Tokens the KV cache can hold.
    pub fn capacity(&self) -> usize {
        self.block_table.len() * BLOCK_SIZE
    }

    /// Forgets the cached sequence.
    pub fn reset(&mut self) {
        self.cached = 0;
    }

    /// Appends `ids` to the sequence and returns logits `[rows, vocab]`: of
    /// every new token when `all_logits`, else of the last one.
    pub fn extend(&mut self, ids: &[u32], all_logits: bool) -> Result<Vec<f32>, GenerateError> {
        self.check_vocabulary(ids)?;
        self.submit(ids, all_logits, Sampling::Caller)?;
        Ok(self.collect()?.logits)
    }

    /// Appends `ids` and has the model pick the next token as `row` says,
    /// where the logits are (only the id leaves a GPU); the last position's
    /// logits come back too when `logits` is set.
    pub fn extend_sampled(&mut self, ids: &[u32], row: RowSampling, logits: bool) -> Result<StepOutput, GenerateError> {
        self.check_vocabulary(ids)?;
        let rows = vec![row];
        self.submit(ids, false, Sampling::Model { rows, logits })?;
        self.collect()
    }

    /// Every id of `ids` is one of the model's vocabulary.
    fn check_vocabulary(&self, ids: &[u32]) -> Result<(), GenerateError> {
        let vocab = self.executor.config().vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(GenerateError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// Starts the step that appends `ids` (ids of the vocabulary, or a
    /// [`PREVIOUS_SAMPLE`]).
    fn submit(&mut self, ids: &[u32], all_logits: bool, sampling: Sampling) -> Result<(), GenerateError> {
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let context = self.capacity().min(self.executor.config().max_position_embeddings);
        if self.cached + ids.len() > context {
            return Err(GenerateError::SequenceTooLong {
                tokens: self.cached + ids.len(),
                context,
            });
        }
        let batch = ForwardBatch {
            sampling,
            ..ForwardBatch::single(ids, self.cached, &self.block_table, BLOCK_SIZE, all_logits)
        };
        self.executor.submit(batch)?;
        self.cached += ids.len();
        Ok(())
    }

    /// What the oldest step in flight returns.
    fn collect(&mut self) -> Result<StepOutput, GenerateError> {
        let mut out = StepOutput::default();
        self.executor.collect(&mut out)?;
        Ok(out)
    }

    /// Appends one token; returns its logits.
    pub fn decode_one_token(&mut self, id: u32) -> Result<Vec<f32>, GenerateError> {
        self.extend(&[id], false)
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids, the final EOS included when generation stopped on one.
    pub tokens: Vec<SampledToken>,
    pub finish_reason: FinishReason,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

impl Generation {
    pub fn completion_ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.token_id).collect()
    }

    /// Decode speed after the first token (which includes the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let decode = self.total_time.saturating_sub(self.time_to_first_token).as_secs_f64();
        if self.tokens.len() < 2 || decode == 0.0 {
            return 0.0;
        }
        (self.tokens.len() - 1) as f64 / decode
    }
}

impl Generator {
    /// Generates until an EOS id (unless `ignore_eos`) or `max_tokens`,
    /// calling `on_token` with each token as it is sampled.
    pub fn generate(&mut self, req: &GenerateRequest, mut on_token: impl FnMut(&SampledToken)) -> Result<Generation, GenerateError> {
        if req.max_tokens == 0 {
            return Err(GenerateError::ZeroMaxTokens);
        }
        let context = self.capacity().min(self.executor.config().max_position_embeddings);
        if req.prompt_ids.len() + req.max_tokens > context {
            return Err(GenerateError::ContextLengthExceeded {
                max_tokens: req.max_tokens,
                prompt: req.prompt_ids.len(),
                context,
            });
        }
        self.check_vocabulary(&req.prompt_ids)?;
        let vocab = self.executor.config().vocab_size;
        let start = Instant::now();
        let mut sampler = Sampler::new(req.sampling.clone());
        let ahead = self.executor.lookahead();
        let mut history = req.prompt_ids.clone();
        let mut tokens = Vec::new();
        let mut time_to_first_token = Duration::ZERO;
        self.reset();
        // A step planned ahead takes row 0 of its predecessor's sample,
        // which its row's penalties count as coming.
        let step = |generator: &mut Self, sampler: &mut Sampler, ids: &[u32], history: &[u32]| {
            let coming = (ids == [PREVIOUS_SAMPLE]).then_some(0);
            let rows = vec![sampler.next_row(history, req.prompt_ids.len(), coming)];
            let logits = sampler.wants_logits();
            generator.submit(ids, false, Sampling::Model { rows, logits })
        };
        step(self, &mut sampler, &req.prompt_ids, &history)?;
        let finish_reason = loop {
            // The step after this one goes first, unless this one's token is the last.
            let looked_ahead = ahead && tokens.len() + 1 < req.max_tokens;
            if looked_ahead {
                step(self, &mut sampler, &[PREVIOUS_SAMPLE], &history)?;
            }
            let out = self.collect()?;
            let token = sampler.finish(out.token_ids[0], out.row_logits(0, vocab));
            if tokens.is_empty() {
                time_to_first_token = start.elapsed();
            }
            on_token(&token);
            let id = token.token_id;
            tokens.push(token);
            history.push(id);
            if !req.ignore_eos && req.eos_token_ids.contains(&id) {
                if looked_ahead {
                    // The step past the EOS: its token and cache slot are dropped.
                    self.collect()?;
                    self.cached -= 1;
                }
                break FinishReason::Stop;
            }
            if tokens.len() >= req.max_tokens {
                break FinishReason::Length;
            }
            if !looked_ahead {
                step(self, &mut sampler, &[id], &history)?;
            }
        };
        Ok(Generation {
            tokens,
            finish_reason,
            time_to_first_token,
            total_time: start.elapsed(),
        })
    }
}
