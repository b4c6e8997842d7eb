//! How long a GPU would sit idle between steps because of the engine's
//! own work (scheduling, building the batch, each row's sampling, the
//! detokenizer, stop strings, the events), without a GPU: the real engine
//! and tiny-chat's real tokenizer drive a simulated device that takes a
//! fixed time per step and runs steps back to back as they are queued.
//! Its tokens come from a cheap rule; no model runs. Each setting runs
//! twice: with the engine planning each step before the last one's tokens
//! are back (the device takes a step more, as a GPU's executor does), and
//! without (each step waits for the tokens of the one before).
//!
//! ```sh
//! cargo bench --bench engine_overlap -- [--requests 64] [--step-ms 6] [--prompt 128] [--tokens 256] [--qwen-sampling]
//! ```
//!
//! `--qwen-sampling` gives every request Qwen2.5-Instruct's generation
//! defaults (temperature 0.7, top-k 20, top-p 0.8, repetition penalty
//! 1.05) instead of greedy decoding.
//!
//! Prints each setting's idle share: idle ÷ (idle + busy) of the device.

mod common;

use common::{arg, qwen25_sampling};
use shardline::backend::BackendError;
use shardline::config::ModelConfig;
use shardline::engine::request::{Event, Request, StopConditions};
use shardline::engine::{Engine, EngineConfig, EngineHandle};
use shardline::executor::Executor;
use shardline::model::{ForwardBatch, StepOutput};
use shardline::sampling::SamplingParams;
use shardline::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The device's timeline: when its last step ends, and how long it has
/// been busy and idle since its first.
#[derive(Default)]
struct Timeline {
    end: Option<Instant>,
    busy: Duration,
    idle: Duration,
}

/// A device that takes `step` per step, one after another in the order
/// queued: a step starts when it is submitted or when the one before ends.
struct SimulatedDevice {
    config: ModelConfig,
    step: Duration,
    timeline: Arc<Mutex<Timeline>>,
    /// Whether it takes a step while one is queued.
    lookahead: bool,
    /// The submitted steps: when each ends, and its tokens.
    queued: VecDeque<(Instant, Vec<u32>)>,
}

impl Executor for SimulatedDevice {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn decode_weight_bytes(&self) -> usize {
        0
    }

    fn lookahead(&self) -> bool {
        self.lookahead
    }

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        let now = Instant::now();
        let mut t = self.timeline.lock().unwrap();
        let start = match t.end {
            Some(end) if end > now => end,
            Some(end) => {
                t.idle += now - end;
                now
            }
            None => now,
        };
        let end = start + self.step;
        t.busy += self.step;
        t.end = Some(end);
        // Plain words of the vocabulary, so the detokenizer has text to make.
        let tokens = batch
            .logit_rows
            .iter()
            .map(|&r| 1000 + (batch.positions[r as usize] * 37) % 20_000)
            .collect();
        self.queued.push_back((end, tokens));
        Ok(())
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError> {
        let (end, tokens) = self.queued.pop_front().expect("collect follows submit");
        while Instant::now() < end {
            std::hint::spin_loop();
        }
        out.logits.clear();
        out.token_ids = tokens;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (requests, tokens, prompt) = (
        arg(&args, "--requests", 64),
        arg(&args, "--tokens", 256),
        arg(&args, "--prompt", 128),
    );
    // Qwen2.5-Instruct's generation_config.json, which serve applies to a
    // request that sets none: its repetition penalty makes every row carry
    // the sequence's distinct tokens, and each step wait for the last one's.
    let sampling = match args.iter().any(|a| a == "--qwen-sampling") {
        true => qwen25_sampling(),
        false => SamplingParams::greedy(),
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-chat");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).unwrap());
    let step_ms: Vec<usize> = match args.iter().any(|a| a == "--step-ms") {
        true => vec![arg(&args, "--step-ms", 6)],
        false => vec![1, 6],
    };
    for (ms, lookahead) in step_ms.into_iter().flat_map(|ms| [(ms, true), (ms, false)]) {
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let device = SimulatedDevice {
            config: config.clone(),
            step: Duration::from_millis(ms as u64),
            timeline: timeline.clone(),
            lookahead,
            queued: VecDeque::new(),
        };
        let engine_config = EngineConfig {
            max_num_seqs: requests,
            max_num_batched_tokens: 2048,
            num_kv_blocks: requests * (prompt + tokens).div_ceil(16) + 1,
            block_size: 16,
        };
        let engine = EngineHandle::spawn(Engine::new(Box::new(device), Some(tokenizer.clone()), engine_config));
        let receivers: Vec<_> = (0..requests)
            .map(|i| {
                let request = Request {
                    prompt_ids: (0..prompt).map(|j| 1000 + ((i * 131 + j * 7) % 20_000) as u32).collect(),
                    sampling: sampling.clone(),
                    max_tokens: tokens,
                    stop: StopConditions {
                        ignore_eos: true,
                        stop_strings: vec!["never appears in this text".into()],
                        ..Default::default()
                    },
                };
                engine.submit(request).1
            })
            .collect();
        for mut events in receivers {
            while let Some(event) = events.blocking_recv() {
                if matches!(event, Event::Finished { .. } | Event::Failed(_)) {
                    break;
                }
            }
        }
        let t = timeline.lock().unwrap();
        let share = t.idle.as_secs_f64() / (t.idle + t.busy).as_secs_f64();
        println!(
            "{requests} requests × {prompt} + {tokens} tokens, {ms} ms a step, {}: device idle {:.2}% ({:.1} µs a step)",
            match lookahead {
                true => "planned ahead",
                false => "each step after the last one's tokens",
            },
            100.0 * share,
            t.idle.as_secs_f64() * 1e6 / (t.busy.as_secs_f64() / (ms as f64 / 1e3)),
        );
    }
}
