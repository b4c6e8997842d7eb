//! What the engine is asked to do and what it answers, per request. Requests
//! arrive validated (the API layer checked every field); the answer flows
//! back on the request's own channel as a stream of [`Event`]s.

use crate::sampling::{SampledToken, SamplingParams};
use std::time::Duration;

/// When a sequence ends, besides `max_tokens`.
#[derive(Clone, Debug, Default)]
pub struct StopConditions {
    /// End-of-sequence ids (generation_config.json's), unless `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// More ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; never part of the output text.
    pub stop_strings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: StopConditions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS or stop token, or a stop string.
    Stop,
    /// `max_tokens`, or the model's context is full.
    Length,
}

/// What ended a sequence that finished with [`FinishReason::Stop`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Token(u32),
    String(String),
}

#[derive(Clone, Debug)]
pub struct Finished {
    pub reason: FinishReason,
    pub stop_reason: Option<StopReason>,
    pub prompt_tokens: usize,
    /// Generated tokens, a final EOS or stop token included.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    /// From arrival to first being scheduled.
    pub queue_time: Duration,
}

#[derive(Clone, Debug)]
pub enum Event {
    /// One generated token and the text it releases (possibly empty: a
    /// partial character, or text that may begin a stop string).
    Token { token: SampledToken, text: String },
    /// Text held back until the end (no token of its own), then the end.
    Finished { text: String, finished: Finished },
    /// The request failed inside the engine; nothing more follows.
    Failed(String),
}
