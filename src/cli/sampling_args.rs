//! The sampling flags `generate` and `bench` share.

use anyhow::bail;
use clap::Args;
use shardline::config::GenerationConfig;
use shardline::sampling::SamplingParams;

/// How tokens are picked: each flag not given takes the command's default
/// (`generate`: the model's generation_config.json, as `serve` does;
/// `bench`: greedy decoding).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 is greedy. Default: generation_config.json's, else 1.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Default: generation_config.json's, else 1.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// 0 keeps every token. Default: generation_config.json's, else 0.
    #[arg(long)]
    top_k: Option<usize>,
    /// Default: generation_config.json's, else 1.
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
}

impl SamplingArgs {
    /// The flags given over `defaults`, seeded by `seed`.
    pub fn params(&self, defaults: &GenerationConfig, seed: u64) -> anyhow::Result<SamplingParams> {
        let default_temperature = match defaults.do_sample {
            Some(false) => 0.0,
            _ => defaults.temperature.unwrap_or(1.0),
        };
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty).unwrap_or(1.0),
            seed: Some(seed),
            ..SamplingParams::greedy()
        };
        if params.temperature < 0.0 || !params.temperature.is_finite() {
            bail!("--temperature must be 0 (greedy) or positive, got {}", params.temperature);
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", params.top_p);
        }
        if !(params.repetition_penalty > 0.0 && params.repetition_penalty.is_finite()) {
            bail!("--repetition-penalty must be positive, got {}", params.repetition_penalty);
        }
        Ok(params)
    }
}
