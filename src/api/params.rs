//! Validation at the boundary: OpenAI request fields become an engine
//! [`Request`] or a 400 naming the parameter and the allowed range. Fields a
//! client leaves unset take the model's `generation_config.json` defaults,
//! as in vLLM.

use super::error::ApiError;
use super::protocol::{CommonParams, Stop};
use crate::config::GenerationConfig;
use crate::engine::request::{Request, StopConditions};
use crate::sampling::SamplingParams;
use serde_json::{Map, Value};

/// Most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// Most alternatives per position (`top_logprobs`, completions' `logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// What bounds a request on this server.
#[derive(Clone, Debug)]
pub struct Limits {
    pub context_len: usize,
    pub kv_cache_tokens: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub defaults: GenerationConfig,
}

/// Refuses fields outside `allowed` (a typo must not be silently ignored).
pub fn reject_unknown_fields(body: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    match body.keys().find(|k| !allowed.iter().any(|list| list.contains(&k.as_str()))) {
        Some(field) => Err(ApiError::invalid_param(field, format!("unknown parameter `{field}`"))),
        None => Ok(()),
    }
}

fn in_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(value),
    }
}

/// The number of choices.
pub fn choices(common: &CommonParams) -> Result<usize, ApiError> {
    match common.n {
        None => Ok(1),
        Some(n) if (1..=MAX_N as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid_param("n", format!("`n` must be between 1 and {MAX_N}, got {n}"))),
    }
}

/// The number of alternatives per position, checked against the cap.
pub fn logprobs_count(param: &str, value: Option<i64>) -> Result<Option<usize>, ApiError> {
    match value {
        Some(k) if !(0..=MAX_LOGPROBS as i64).contains(&k) => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between 0 and {MAX_LOGPROBS}, got {k}"),
        )),
        v => Ok(v.map(|k| k as usize)),
    }
}

pub fn sampling(common: &CommonParams, logprobs: Option<usize>, limits: &Limits) -> Result<SamplingParams, ApiError> {
    let d = &limits.defaults;
    let default_temperature = if d.do_sample == Some(false) {
        0.0
    } else {
        d.temperature.unwrap_or(1.0)
    };
    let temperature = in_range("temperature", common.temperature, 0.0, 2.0)?.unwrap_or(default_temperature);
    let top_p = in_range("top_p", common.top_p, f32::MIN_POSITIVE, 1.0)?.or(d.top_p).unwrap_or(1.0);
    let top_k = match common.top_k {
        None => d.top_k.unwrap_or(0),
        Some(-1 | 0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let mut logit_bias = Vec::new();
    for (key, &bias) in common.logit_bias.iter().flatten() {
        let id = key
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < limits.vocab_size)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias key {key:?} is not a token id below {}", limits.vocab_size),
                )
            })?;
        in_range("logit_bias", Some(bias), -100.0, 100.0)?;
        logit_bias.push((id, bias));
    }
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p: in_range("min_p", common.min_p, 0.0, 1.0)?.unwrap_or(0.0),
        repetition_penalty: in_range("repetition_penalty", common.repetition_penalty, 0.01, 10.0)?
            .or(d.repetition_penalty)
            .unwrap_or(1.0),
        presence_penalty: in_range("presence_penalty", common.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: in_range("frequency_penalty", common.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0),
        logit_bias,
        seed: common.seed.map(|s| s as u64),
        logprobs,
    })
}

/// The engine request for one prompt, once its length is known.
pub fn request(
    common: &CommonParams,
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    prompt_ids: Vec<u32>,
    sampling: SamplingParams,
    limits: &Limits,
) -> Result<Request, ApiError> {
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("token id {id} is outside the vocabulary of {}", limits.vocab_size),
        ));
    }
    let room = limits.context_len.min(limits.kv_cache_tokens).saturating_sub(prompt_ids.len());
    let max_tokens = match max_tokens {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("`max_tokens` must be at least 1, got {m}"),
            ))
        }
        Some(m) => m as usize,
        None => default_max_tokens.unwrap_or(room).min(room.max(1)),
    };
    let total = prompt_ids.len() + max_tokens;
    if total > limits.context_len {
        return Err(ApiError::context_length_exceeded(format!(
            "max_tokens {max_tokens} + prompt {} tokens exceeds the model's {}-token context",
            prompt_ids.len(),
            limits.context_len
        )));
    }
    if total > limits.kv_cache_tokens {
        return Err(ApiError::context_length_exceeded(format!(
            "max_tokens {max_tokens} + prompt {} tokens exceeds the server's {}-token KV cache",
            prompt_ids.len(),
            limits.kv_cache_tokens
        )));
    }
    let stop_strings = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(list)) => list.clone(),
    };
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param("stop", "stop strings must not be empty"));
    }
    let stop = StopConditions {
        eos_token_ids: limits.eos_token_ids.clone(),
        ignore_eos: common.ignore_eos,
        stop_token_ids: common.stop_token_ids.clone().unwrap_or_default(),
        stop_strings,
    };
    Ok(Request {
        prompt_ids,
        sampling,
        max_tokens,
        stop,
    })
}

/// `n` copies of a request; a seeded one gets seeds `seed, seed+1, …` so
/// its choices differ but each is reproducible.
pub fn fan_out(request: Request, n: usize) -> Vec<Request> {
    (0..n as u64)
        .map(|i| {
            let mut r = request.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i));
            r
        })
        .collect()
}
