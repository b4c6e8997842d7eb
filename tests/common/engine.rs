//! tiny-chat behind the continuous-batching engine, on any executor: its
//! requests, their outputs, and the check that all 30 greedy answers of the
//! Hugging Face reference come out exact from one batch.

use serde_json::Value;
use shardline::backend::{BackendError, PREVIOUS_SAMPLE};
use shardline::config::ModelConfig;
use shardline::engine::request::{Event, FinishReason, Finished, Request, StopConditions};
use shardline::engine::{Engine, EngineConfig, EngineHandle};
use shardline::executor::Executor;
use shardline::model::{ForwardBatch, StepOutput};
use shardline::sampling::SamplingParams;
use shardline::tokenizer::Tokenizer;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;

/// The engine over `executor` (tiny-chat) with `num_kv_blocks` blocks of 16 tokens.
pub fn spawn(executor: Box<dyn Executor>, tokenizer: Option<Tokenizer>, num_kv_blocks: usize, max_num_seqs: usize) -> EngineHandle {
    let config = EngineConfig {
        max_num_seqs,
        max_num_batched_tokens: 256,
        num_kv_blocks,
        block_size: 16,
    };
    EngineHandle::spawn(Engine::new(executor, tokenizer.map(Arc::new), config))
}

pub fn cases() -> Vec<Value> {
    let path = super::repo().join("tests/fixtures/tiny-chat/reference.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["greedy_chat"].as_array().unwrap().clone()
}

pub fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

pub fn request(prompt_ids: Vec<u32>, sampling: SamplingParams, max_tokens: usize) -> Request {
    let stop = StopConditions {
        eos_token_ids: vec![151645, 151643],
        ..Default::default()
    };
    Request {
        prompt_ids,
        sampling,
        max_tokens,
        stop,
    }
}

pub struct Output {
    pub ids: Vec<u32>,
    pub text: String,
    pub finished: Finished,
}

pub fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Output, String> {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Token { token, text: piece } => {
                ids.push(token.token_id);
                text += &piece;
            }
            Event::Finished { text: rest, finished } => {
                return Ok(Output {
                    ids,
                    text: text + &rest,
                    finished,
                })
            }
            Event::Failed(message) => return Err(message),
        }
    }
    Err("the channel closed without an end".into())
}

pub fn assert_all_cases_exact(handle: &EngineHandle) {
    let cases = cases();
    let receivers: Vec<_> = cases
        .iter()
        .map(|c| handle.submit(request(ids(&c["prompt_ids"]), SamplingParams::greedy(), 96)).1)
        .collect();
    for (case, rx) in cases.iter().zip(receivers) {
        let out = collect(rx).unwrap();
        assert_eq!(out.ids, ids(&case["completion_ids"]), "{}", case["question"]);
        assert_eq!(out.text, case["completion_text"].as_str().unwrap());
        assert_eq!(out.finished.reason, FinishReason::Stop);
        assert_eq!(out.finished.completion_tokens, out.ids.len());
        assert_eq!(out.finished.prompt_tokens, case["prompt_ids"].as_array().unwrap().len());
    }
}

/// What an engine handed its executor: every batch, and the most steps it
/// had in flight at once.
#[derive(Default)]
pub struct Handed {
    pub batches: Vec<ForwardBatch>,
    pub in_flight: usize,
    pub most_in_flight: usize,
}

impl Handed {
    /// Batches with a token the step before had not returned yet.
    pub fn ahead(&self) -> usize {
        let ahead = |b: &&ForwardBatch| b.token_ids.iter().any(|&id| id & PREVIOUS_SAMPLE != 0);
        self.batches.iter().filter(ahead).count()
    }
}

/// An executor that notes what it is handed in [`Handed`], and passes it on.
pub struct Recording {
    inner: Box<dyn Executor>,
    pub handed: Arc<Mutex<Handed>>,
}

impl Recording {
    pub fn new(inner: Box<dyn Executor>) -> Self {
        Recording {
            inner,
            handed: Default::default(),
        }
    }
}

impl Executor for Recording {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn decode_weight_bytes(&self) -> usize {
        self.inner.decode_weight_bytes()
    }

    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn lookahead(&self) -> bool {
        self.inner.lookahead()
    }

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        let mut handed = self.handed.lock().unwrap();
        handed.batches.push(batch.clone());
        handed.in_flight += 1;
        handed.most_in_flight = handed.most_in_flight.max(handed.in_flight);
        self.inner.submit(batch)
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError> {
        self.handed.lock().unwrap().in_flight -= 1;
        self.inner.collect(out)
    }
}
