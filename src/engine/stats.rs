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
    /// False after a step whose forward failed.
    pub last_step_ok: AtomicBool,
}
