//! Choosing the next token from a row of logits.
//!
//! The order follows vLLM (and, for what it shares, Hugging Face's
//! `generate`): logit bias; presence, frequency and repetition penalties;
//! then temperature, min-p, top-k and top-p. Penalties and bias apply to
//! greedy decoding too. Temperature 0 is greedy (argmax, lowest id on ties,
//! as `torch.argmax`). Logprobs are those of the model's own
//! distribution (log-softmax of the raw logits), as vLLM reports by default.

use crate::rng::Rng;
use std::borrow::Cow;

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
        self.temperature < 1e-5
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
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::seeded);
        Sampler { params, rng }
    }

    /// Picks a token from `logits [vocab]`; `tokens` holds the prompt and then
    /// the `tokens.len() - prompt_len` tokens generated so far.
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32], prompt_len: usize) -> SampledToken {
        let p = &self.params;
        let adjusts = !p.logit_bias.is_empty() || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0;
        let scores: Cow<[f32]> = match adjusts {
            false => Cow::Borrowed(logits),
            true => {
                let mut scores = logits.to_vec();
                for &(id, bias) in &p.logit_bias {
                    if let Some(s) = scores.get_mut(id as usize) {
                        *s += bias;
                    }
                }
                apply_output_penalties(&mut scores, &tokens[prompt_len..], p.presence_penalty, p.frequency_penalty);
                apply_repetition_penalty(&mut scores, tokens, p.repetition_penalty);
                Cow::Owned(scores)
            }
        };
        let token_id = if p.is_greedy() { argmax(&scores) } else { self.draw(&scores) };
        let logprobs = self.params.logprobs.map(|k| log_probs(logits, token_id, k));
        SampledToken { token_id, logprobs }
    }

    /// Draws from `softmax(scores / temperature)` restricted by top-k, min-p
    /// and top-p. Tokens more than [`NEGLIGIBLE`] below the best scaled score
    /// are left out first: together they weigh less than the generator's
    /// resolution, and skipping them spares an `exp` and a sort per token.
    fn draw(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) / p.temperature;
        let floor = max - NEGLIGIBLE;
        let mut candidates: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(_, &s)| s / p.temperature >= floor)
            .map(|(i, &s)| (i as u32, s / p.temperature))
            .collect();
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_score_desc);
            candidates.truncate(p.top_k);
        }
        // From here on the second field is the unnormalised probability
        // exp(score - max): the best token's is 1, so min-p compares directly.
        candidates.iter_mut().for_each(|c| c.1 = (c.1 - max).exp());
        if p.min_p > 0.0 {
            candidates.retain(|c| c.1 >= p.min_p);
        }
        if p.top_p < 1.0 {
            let total: f64 = candidates.iter().map(|c| c.1 as f64).sum();
            keep_nucleus(&mut candidates, p.top_p as f64 * total);
        }
        let kept: f64 = candidates.iter().map(|c| c.1 as f64).sum();
        let mut target = self.rng.next_f32() as f64 * kept;
        for c in &candidates {
            target -= c.1 as f64;
            if target < 0.0 {
                return c.0;
            }
        }
        candidates.last().expect("the best token always survives").0
    }
}

/// Scaled logits this far below the best have probability under e^-40
/// relative to it: 150k of them weigh ~1e-12, far below 2^-24.
const NEGLIGIBLE: f32 = 40.0;

fn by_score_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the most likely candidates, best first, until their mass reaches
/// `mass`. Only as many as needed are sorted: the nucleus is usually small.
fn keep_nucleus(candidates: &mut Vec<(u32, f32)>, mass: f64) {
    let mut k = 64;
    loop {
        let k_now = k.min(candidates.len());
        if k_now < candidates.len() {
            candidates.select_nth_unstable_by(k_now - 1, by_score_desc);
        }
        candidates[..k_now].sort_unstable_by(by_score_desc);
        let mut cumulative = 0.0;
        if let Some(i) = candidates[..k_now].iter().position(|c| {
            cumulative += c.1 as f64;
            cumulative >= mass
        }) {
            candidates.truncate(i + 1);
            return;
        }
        if k_now == candidates.len() {
            return;
        }
        k *= 8;
    }
}

/// OpenAI's rule, over generated tokens only: `logit -= presence if seen,
/// and frequency × count`.
fn apply_output_penalties(scores: &mut [f32], output: &[u32], presence: f32, frequency: f32) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    let mut counts = std::collections::HashMap::new();
    for &id in output {
        *counts.entry(id).or_insert(0u32) += 1;
    }
    for (id, count) in counts {
        if let Some(s) = scores.get_mut(id as usize) {
            *s -= presence + frequency * count as f32;
        }
    }
}

/// HF's rule: a seen token's logit is divided by the penalty if positive,
/// multiplied by it if negative.
fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in context {
        let Some(flag) = seen.get_mut(id as usize) else {
            continue;
        };
        if !std::mem::replace(flag, true) {
            let s = &mut scores[id as usize];
            *s = if *s > 0.0 { *s / penalty } else { *s * penalty };
        }
    }
}

/// The first index of the largest score. Two passes that vectorise (a max,
/// then a search for it) beat one branchy pass over a 150k vocabulary.
pub fn argmax(scores: &[f32]) -> u32 {
    let lanes = scores.chunks_exact(16).fold([f32::NEG_INFINITY; 16], |mut m, c| {
        m.iter_mut().zip(c).for_each(|(m, &s)| *m = m.max(s));
        m
    });
    let max = scores
        .chunks_exact(16)
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    scores.iter().position(|&s| s == max).unwrap_or(0) as u32
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
    fn repetition_penalty_follows_hf() {
        let mut scores = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut scores, &[0, 1, 1], 2.0);
        assert_eq!(scores, vec![1.0, -4.0, 1.0]);
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
    fn argmax_agrees_with_a_plain_scan_on_ties_and_odd_lengths() {
        for len in [1, 15, 16, 17, 1003] {
            let scores: Vec<f32> = (0..len).map(|i| ((i * 7919) % 97) as f32).collect();
            let plain = (0..len).fold(0, |best, i| if scores[i] > scores[best] { i } else { best });
            assert_eq!(argmax(&scores) as usize, plain, "length {len}");
        }
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
