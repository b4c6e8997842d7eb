//! What the benchmarks share: their number options and the sampling that
//! Qwen2.5-Instruct's generation_config.json asks for.

use shardline::sampling::SamplingParams;

/// The number after `name` in `args`, or `default` where it is absent.
pub fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, got {v}")))
        .unwrap_or(default)
}

/// Temperature 0.7, top-k 20, top-p 0.8 and repetition penalty 1.05:
/// what `serve` applies to a request for Qwen2.5-Instruct that sets none.
pub fn qwen25_sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
        repetition_penalty: 1.05,
        ..SamplingParams::greedy()
    }
}
