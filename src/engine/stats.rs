//! Counters and gauges the engine thread publishes after every step, for
//! `/metrics` and `/ready`. Plain atomics: the engine writes, anyone reads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub free_blocks: AtomicUsize,
    pub total_blocks: AtomicUsize,
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences scheduled, summed over steps (÷ steps = mean batch size).
    pub scheduled_seqs: AtomicU64,
    /// Time in the model forward.
    pub forward_ns: AtomicU64,
    /// Time choosing tokens from logits (on a GPU this moves to the device).
    pub sampling_ns: AtomicU64,
    /// The engine's own time in steps: scheduling, batch building,
    /// detokenizing, stop checks and sending events.
    pub overhead_ns: AtomicU64,
    /// False after a step whose forward failed.
    pub last_step_ok: AtomicBool,
}
