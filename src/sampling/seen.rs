//! A request's logit bias and penalties over the tokens its sequence holds,
//! kept as the sequence grows: a step's row takes in only the tokens added
//! since the last one. Built afresh each step, a repetition penalty (1.05
//! in Qwen2.5-Instruct's generation_config.json) cost a pass over the whole
//! sequence into a map per row: ≈ 150 µs a row for a 2,048-token prompt,
//! ≈ 9 ms a step of 64 such sequences on the engine's one thread
//! (`cargo bench --bench sampling_rows`).

use super::{LogitAdjustment, SamplingParams};

/// New tokens up to this many go into the entries one at a time.
const FEW: usize = 8;

/// What the tokens taken in so far make of the request's adjustments.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    /// Tokens of the sequence taken in, the prompt's length, and the last
    /// token: a sequence that these show is not this one grown (shorter, or
    /// another token at the last one's place, or another prompt length)
    /// starts the count over.
    len: usize,
    prompt_len: usize,
    last: Option<u32>,
    /// In id order, one per token.
    entries: Vec<LogitAdjustment>,
}

impl Seen {
    /// The request's biases alone (duplicates summed in order).
    pub(super) fn new(p: &SamplingParams) -> Self {
        let mut entries: Vec<LogitAdjustment> = Vec::new();
        for &(token, bias) in &p.logit_bias {
            match entries.binary_search_by_key(&token, |e| e.token) {
                Ok(i) => entries[i].bias += bias,
                Err(i) => entries.insert(
                    i,
                    LogitAdjustment {
                        bias,
                        ..LogitAdjustment::new(token)
                    },
                ),
            }
        }
        Seen {
            len: 0,
            prompt_len: 0,
            last: None,
            entries,
        }
    }

    /// One adjustment per token the request biases or whose logit a
    /// penalty changes, in id order, for a sequence whose `tokens` hold the
    /// prompt and then the `tokens.len() - prompt_len` generated so far:
    /// its logit biases summed, the times it was generated (where a
    /// presence or frequency penalty counts them), and whether it is in the
    /// prompt or the output (where HF's repetition penalty marks them).
    pub(super) fn adjustments(&mut self, p: &SamplingParams, tokens: &[u32], prompt_len: usize) -> Vec<LogitAdjustment> {
        let counts = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let repeats = p.repetition_penalty != 1.0;
        // Without a penalty the tokens change nothing.
        if counts || repeats {
            let grown =
                tokens.len() >= self.len && prompt_len == self.prompt_len && self.len.checked_sub(1).map(|i| tokens[i]) == self.last;
            if !grown {
                *self = Seen::new(p);
                self.prompt_len = prompt_len;
            }
            self.take_in(tokens, counts, repeats);
        }
        self.entries.clone()
    }

    /// Merges `tokens[self.len..]` into the entries, counting generated
    /// ones where `counts` and marking all where `repeats`: a step's few
    /// one by one in place, a prompt's many by sorting them and merging the
    /// two lists (one at a time, each would move the entries after it).
    fn take_in(&mut self, tokens: &[u32], counts: bool, repeats: bool) {
        let mut fresh: Vec<(u32, bool)> = (self.len..tokens.len())
            .map(|i| (tokens[i], counts && i >= self.prompt_len))
            .filter(|&(_, generated)| generated || repeats)
            .collect();
        (self.len, self.last) = (tokens.len(), tokens.last().copied());
        if fresh.is_empty() {
            return;
        }
        if fresh.len() <= FEW {
            for (token, generated) in fresh {
                let i = match self.entries.binary_search_by_key(&token, |e| e.token) {
                    Ok(i) => i,
                    Err(i) => {
                        self.entries.insert(i, LogitAdjustment::new(token));
                        i
                    }
                };
                self.entries[i].generated += generated as u32;
                self.entries[i].repeated |= repeats;
            }
            return;
        }
        fresh.sort_unstable_by_key(|&(token, _)| token);
        let mut old = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut merged = Vec::with_capacity(old.len() + fresh.len());
        for (token, generated) in fresh {
            merged.extend(std::iter::from_fn(|| old.next_if(|e| e.token < token)));
            if merged.last().is_none_or(|e: &LogitAdjustment| e.token != token) {
                merged.push(old.next_if(|e| e.token == token).unwrap_or(LogitAdjustment::new(token)));
            }
            let entry = merged.last_mut().expect("pushed above");
            entry.generated += generated as u32;
            entry.repeated |= repeats;
        }
        merged.extend(old);
        self.entries = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use std::collections::BTreeMap;

    /// The adjustments from scratch: every bias, then the counts of the
    /// generated tokens, then the whole sequence's repetition flags.
    fn from_scratch(p: &SamplingParams, tokens: &[u32], prompt_len: usize) -> Vec<LogitAdjustment> {
        let mut by_token: BTreeMap<u32, (f32, u32, bool)> = BTreeMap::new();
        for &(id, bias) in &p.logit_bias {
            by_token.entry(id).or_default().0 += bias;
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for &id in &tokens[prompt_len..] {
                by_token.entry(id).or_default().1 += 1;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &id in tokens {
                by_token.entry(id).or_default().2 = true;
            }
        }
        by_token
            .into_iter()
            .map(|(token, (bias, generated, repeated))| LogitAdjustment::from_parts(token, bias, generated, repeated))
            .collect()
    }

    fn params(repetition: f32, presence: f32, frequency: f32, logit_bias: Vec<(u32, f32)>) -> SamplingParams {
        SamplingParams {
            repetition_penalty: repetition,
            presence_penalty: presence,
            frequency_penalty: frequency,
            logit_bias,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn a_growing_sequence_gets_the_adjustments_built_from_scratch() {
        let mut rng = Rng::seeded(5);
        let kinds = [
            params(1.3, 0.0, 0.0, vec![]),
            params(1.0, 0.4, 0.1, vec![]),
            params(1.05, 0.2, 0.3, vec![(7, 1.5), (3, -2.0), (7, 0.25)]),
            params(1.0, 0.0, 0.0, vec![(40, 3.0)]),
            params(1.0, 0.0, 0.0, vec![]),
        ];
        for p in &kinds {
            let prompt_len = 30;
            let mut tokens: Vec<u32> = (0..prompt_len).map(|_| (rng.next_u64() % 50) as u32).collect();
            let mut seen = Seen::new(p);
            for step in 0..60 {
                let (want, got) = (from_scratch(p, &tokens, prompt_len), seen.adjustments(p, &tokens, prompt_len));
                assert_eq!(got, want, "{p:?}, {} tokens", tokens.len());
                // Mostly one token a step; now and then a few, or more than FEW.
                let added = [1, 1, 3, 1, FEW + 4, 1, FEW][step % 7];
                tokens.extend((0..added).map(|_| (rng.next_u64() % 60) as u32));
            }
        }
    }

    #[test]
    fn a_sequence_that_is_not_the_last_one_grown_starts_over() {
        let p = params(1.2, 0.5, 0.5, vec![(2, 1.0)]);
        let mut seen = Seen::new(&p);
        seen.adjustments(&p, &[1, 2, 3, 4], 2);
        // Shorter, a different last token at the old length, a moved prompt end.
        for (tokens, prompt_len) in [(&[1, 2, 3][..], 2), (&[1, 2, 3, 9, 4][..], 2), (&[1, 2, 3, 9, 4, 5][..], 3)] {
            assert_eq!(
                seen.adjustments(&p, tokens, prompt_len),
                from_scratch(&p, tokens, prompt_len),
                "{tokens:?} from {prompt_len}"
            );
        }
    }
}
