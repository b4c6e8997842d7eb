//! Choosing the next token from a row of logits.
//!
//! The order follows vLLM (and, for what it shares, Hugging Face's
//! `generate`): logit bias; presence, frequency and repetition penalties;
//! then temperature, top-k, min-p and top-p. Penalties and bias apply to
//! greedy decoding too. Temperature 0 is greedy (argmax, lowest id on ties,
//! as `torch.argmax`). Logprobs are those of the model's own
//! distribution (log-softmax of the raw logits), as vLLM reports by default.
//!
//! Each step, a request's [`Sampler`] turns its parameters, its history and
//! one draw of its generator into a [`RowSampling`]; the backend that holds
//! the logits picks the token from it (a GPU without copying them out).

mod choose;
mod seen;

pub use choose::{argmax, choose, choose_rows, LogitAdjustment, RowSampling, GREEDY_BELOW};

use choose::by_score_desc;
use seen::Seen;

use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    /// > 1 discourages tokens already in the prompt or output (HF's rule).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Return this many most likely tokens with each sampled one.
    pub logprobs: Option<usize>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    /// Present when the request asked for logprobs (computing them costs a
    /// pass over the whole vocabulary).
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token under the model's distribution.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// The bias and penalties over the sequence's tokens so far.
    seen: Seen,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::seeded);
        let seen = Seen::new(&params);
        Sampler { params, rng, seen }
    }

    /// Whether [`Sampler::finish`] needs the step's logits (for logprobs).
    pub fn wants_logits(&self) -> bool {
        self.params.logprobs.is_some()
    }

    /// Whether a row depends on the tokens so far (the penalties), so a row
    /// planned before the last token reached the host names it as coming.
    fn reads_history(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// How the next token is picked, for a sequence whose `tokens` hold the
    /// prompt and then the `tokens.len() - prompt_len` generated so far,
    /// followed by the token the previous step's sample picks at its row
    /// `coming`, if any (a step planned before that token reached the host).
    /// Each call for a non-greedy request takes one draw from its generator.
    pub fn next_row(&mut self, tokens: &[u32], prompt_len: usize, coming: Option<u32>) -> RowSampling {
        let p = &self.params;
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            adjustments: self.seen.adjustments(p, tokens, prompt_len),
            coming: coming.filter(|_| self.reads_history()),
            uniform: if p.is_greedy() { 0.0 } else { self.rng.next_f32() },
        }
    }

    /// The picked token, with its logprobs from the raw `logits` of its row
    /// when the request asked for them.
    pub fn finish(&self, token_id: u32, logits: Option<&[f32]>) -> SampledToken {
        let logprobs = self.params.logprobs.zip(logits).map(|(k, l)| log_probs(l, token_id, k));
        SampledToken { token_id, logprobs }
    }

    /// Picks a token from `logits [vocab]` on the host.
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32], prompt_len: usize) -> SampledToken {
        let row = self.next_row(tokens, prompt_len, None);
        let token_id = choose(&mut logits.to_vec(), &row, None);
        self.finish(token_id, Some(logits))
    }
}

/// The log-probability of `token` and the `k` most likely tokens under
/// `log_softmax(logits)`.
fn log_probs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = (logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>()).ln() as f32 + max;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let k = k.min(all.len());
        all.select_nth_unstable_by(k - 1, by_score_desc);
        all.truncate(k);
        all.sort_unstable_by(by_score_desc);
        top = all.into_iter().map(|(i, l)| (i, l - log_total)).collect();
    }
    TokenLogprobs {
        logprob: logits[token as usize] - log_total,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` tokens drawn one after another by one sampler with `params`.
    fn draws(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params.clone());
        (0..n).map(|_| s.sample(logits, &[], 0).token_id).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[], 0).token_id, 1);
    }

    #[test]
    fn repetition_penalty_follows_hf_over_prompt_and_output() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let row = Sampler::new(params).next_row(&[0, 1, 1], 1, None);
        let mut scores = vec![2.0, -2.0, 1.5];
        assert_eq!(choose(&mut scores, &row, None), 2);
        assert_eq!(scores, vec![1.0, -4.0, 1.5]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(params).sample(&logits, &[], 0).token_id, argmax(&logits));
        let seeded = SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..SamplingParams::greedy()
        };
        assert_eq!(draws(&seeded, &logits, 20), draws(&seeded, &logits, 20));
        assert!(draws(&seeded, &logits, 20).iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ≈ [0.665, 0.245, 0.090]: top_p 0.7 keeps the first two.
        let logits = [2.0, 1.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            seed: Some(1),
            ..SamplingParams::greedy()
        };
        let drawn: std::collections::HashSet<u32> = draws(&params, &logits, 500).into_iter().collect();
        assert_eq!(drawn, [0, 1].into_iter().collect());
    }

    #[test]
    fn a_wide_nucleus_is_found_past_the_first_partial_sort() {
        // 1000 nearly flat tokens, best first: the 0.5 nucleus is ids 0..=k.
        let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 1e-3).collect();
        let weights: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        let k = weights.iter().position(|w| {
            cumulative += w;
            cumulative >= 0.5 * total
        });
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(4),
            ..SamplingParams::greedy()
        };
        let drawn = draws(&params, &logits, 2000);
        assert!(drawn.iter().all(|&id| id as usize <= k.unwrap()));
        assert!(drawn.iter().any(|&id| id > 300));
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // Probabilities ∝ [1, 0.6, 0.1]: min_p 0.5 keeps the first two.
        let logits = [0.0, 0.6f32.ln(), 0.1f32.ln()];
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(2),
            ..SamplingParams::greedy()
        };
        let drawn: std::collections::HashSet<u32> = draws(&params, &logits, 500).into_iter().collect();
        assert_eq!(drawn, [0, 1].into_iter().collect());
    }

    #[test]
    fn presence_frequency_and_bias_shift_greedy_choices() {
        let logits = [1.0, 0.9, 0.0];
        // Token 0 was generated twice: 1.0 - 0.05 - 2 × 0.05 = 0.85 < 0.9.
        let params = SamplingParams {
            presence_penalty: 0.05,
            frequency_penalty: 0.05,
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(params.clone()).sample(&logits, &[0, 0, 0], 1).token_id, 1);
        // The prompt's occurrence does not count.
        assert_eq!(Sampler::new(params).sample(&logits, &[0, 0], 2).token_id, 0);
        let biased = SamplingParams {
            logit_bias: vec![(2, 5.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(biased).sample(&logits, &[], 0).token_id, 2);
    }

    #[test]
    fn logprobs_are_log_softmax_of_the_raw_logits() {
        let params = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let t = Sampler::new(params).sample(&[0.0, (3.0f32).ln()], &[], 0);
        assert_eq!(t.token_id, 1);
        let l = t.logprobs.unwrap();
        assert!((l.logprob - 0.75f32.ln()).abs() < 1e-6);
        assert_eq!(l.top.len(), 2);
        assert!((l.top[1].1 - 0.25f32.ln()).abs() < 1e-6);
        let none = Sampler::new(SamplingParams::greedy()).sample(&[0.0, 1.0], &[], 0);
        assert_eq!(none.logprobs, None);
    }
}
