//! The host's time to build each step's sampling row, with
//! Qwen2.5-Instruct's generation defaults (temperature 0.7, top-k 20,
//! top-p 0.8, repetition penalty 1.05), which `serve` applies to every
//! request that sets none: the penalty gives a row an adjustment for every
//! distinct token of its sequence, prompt and output. The engine builds
//! these rows for every sequence of every step, on its one thread.
//!
//! ```sh
//! cargo bench --bench sampling_rows -- [--prompt 2048] [--tokens 256] [--sequences 64]
//! ```
//!
//! Token ids are drawn from the first 8,192 ids (so a 2,048-token prompt
//! holds ≈ 1,800 distinct ones). Prints the time a row takes, and a step
//! of `--sequences` rows.

mod common;

use common::{arg, qwen25_sampling};
use shardline::rng::Rng;
use shardline::sampling::{Sampler, SamplingParams};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (prompt, tokens, sequences) = (
        arg(&args, "--prompt", 2048),
        arg(&args, "--tokens", 256),
        arg(&args, "--sequences", 64),
    );
    let params = SamplingParams {
        seed: Some(0),
        ..qwen25_sampling()
    };
    let mut rng = Rng::seeded(1);
    let mut id = move || (rng.next_u64() % 8192) as u32;
    let mut seconds = 0.0;
    let mut adjustments = 0;
    for _ in 0..sequences {
        let mut sequence: Vec<u32> = (0..prompt).map(|_| id()).collect();
        let mut sampler = Sampler::new(params.clone());
        for _ in 0..tokens {
            let start = Instant::now();
            let row = sampler.next_row(&sequence, prompt, None);
            seconds += start.elapsed().as_secs_f64();
            adjustments += row.adjustments.len();
            sequence.push(id());
        }
    }
    let rows = (sequences * tokens) as f64;
    println!(
        "{prompt}-token prompts, {tokens} tokens each: {:.1} µs a row ({:.0} adjustments), {:.2} ms a step of {sequences}",
        1e6 * seconds / rows,
        adjustments as f64 / rows,
        1e3 * seconds / tokens as f64
    );
}
