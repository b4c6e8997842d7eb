//! `/metrics` in the Prometheus text format: the engine's gauges and
//! counters, request outcomes, and latency histograms (time to first token,
//! inter-token latency, end-to-end latency, queue time) observed here, where
//! the client's experience is.

use crate::engine::stats::EngineStats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) shared by every latency histogram.
const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Default)]
pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_rejected: AtomicU64,
    latencies: Mutex<Latencies>,
}

#[derive(Default)]
struct Latencies {
    time_to_first_token: Histogram,
    inter_token: Histogram,
    end_to_end: Histogram,
    queue: Histogram,
}

/// Which latency an observation is.
pub enum Latency {
    TimeToFirstToken,
    InterToken,
    EndToEnd,
    Queue,
}

impl Metrics {
    pub fn observe(&self, which: Latency, d: Duration) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let h = match which {
            Latency::TimeToFirstToken => &mut l.time_to_first_token,
            Latency::InterToken => &mut l.inter_token,
            Latency::EndToEnd => &mut l.end_to_end,
            Latency::Queue => &mut l.queue,
        };
        h.observe(d.as_secs_f64());
    }

    pub fn render(&self, engine: Option<&EngineStats>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP shardline_requests_total Finished requests by outcome.\n# TYPE shardline_requests_total counter"
        );
        for (outcome, n) in [
            ("ok", &self.requests_ok),
            ("failed", &self.requests_failed),
            ("rejected", &self.requests_rejected),
        ] {
            let _ = writeln!(
                out,
                "shardline_requests_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        if let Some(s) = engine {
            let total = s.total_blocks.load(Ordering::Relaxed).max(1);
            let used = total - s.free_blocks.load(Ordering::Relaxed).min(total);
            let count = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64;
            let seconds = |ns: &AtomicU64| ns.load(Ordering::Relaxed) as f64 / 1e9;
            let rows = [
                (
                    "shardline_requests_running",
                    "gauge",
                    "Requests in the running batch.",
                    s.running.load(Ordering::Relaxed) as f64,
                ),
                (
                    "shardline_requests_waiting",
                    "gauge",
                    "Requests waiting to be scheduled.",
                    s.waiting.load(Ordering::Relaxed) as f64,
                ),
                (
                    "shardline_kv_cache_blocks",
                    "gauge",
                    "KV-cache blocks the server holds (its capacity).",
                    s.total_blocks.load(Ordering::Relaxed) as f64,
                ),
                (
                    "shardline_kv_cache_usage_ratio",
                    "gauge",
                    "Fraction of KV-cache blocks held by requests.",
                    used as f64 / total as f64,
                ),
                (
                    "shardline_prompt_tokens_total",
                    "counter",
                    "Prompt tokens computed.",
                    count(&s.prompt_tokens),
                ),
                (
                    "shardline_generation_tokens_total",
                    "counter",
                    "Tokens generated.",
                    count(&s.generation_tokens),
                ),
                (
                    "shardline_preemptions_total",
                    "counter",
                    "Sequences preempted for KV-cache space.",
                    count(&s.preemptions),
                ),
                ("shardline_engine_steps_total", "counter", "Engine steps run.", count(&s.steps)),
                (
                    "shardline_engine_scheduled_seqs_total",
                    "counter",
                    "Sequences scheduled, summed over steps.",
                    count(&s.scheduled_seqs),
                ),
                (
                    "shardline_engine_forward_seconds_total",
                    "counter",
                    "Time in the model forward.",
                    seconds(&s.forward_ns),
                ),
                (
                    "shardline_engine_sampling_seconds_total",
                    "counter",
                    "Time sampling tokens from logits.",
                    seconds(&s.sampling_ns),
                ),
                (
                    "shardline_engine_overhead_seconds_total",
                    "counter",
                    "The engine's own time in steps: scheduling, batching, detokenizing, stop checks, events.",
                    seconds(&s.overhead_ns),
                ),
            ];
            for (name, kind, help, value) in rows {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
            }
        }
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        l.time_to_first_token.render(
            &mut out,
            "shardline_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        l.inter_token.render(
            &mut out,
            "shardline_inter_token_latency_seconds",
            "Time between consecutive tokens.",
        );
        l.end_to_end.render(
            &mut out,
            "shardline_e2e_request_latency_seconds",
            "Time from request to its last token.",
        );
        l.queue.render(
            &mut out,
            "shardline_request_queue_time_seconds",
            "Time from arrival to first scheduling.",
        );
        out
    }
}
