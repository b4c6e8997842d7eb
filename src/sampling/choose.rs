//! One row of logits to one token, with everything request-specific
//! resolved beforehand into a [`RowSampling`]: the form a device sampler
//! takes (`kernels/sampling.cu`), and the host reference it is held to.
//!
//! The kept set is defined by value, not by a sort's order, so a kernel that
//! finds thresholds and a host that sorts agree on it: scaled logits within
//! [`NEGLIGIBLE`] of the best; then the `top_k` best (ties to the lower id);
//! then those at least `min_p` times as likely as the best; then the most
//! likely (ties to the lower id) until their mass reaches `top_p`. The
//! uniform draw then walks the kept tokens in id order.

use rayon::prelude::*;

/// How one row's token is picked; built per step by the request's sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSampling {
    /// Below [`GREEDY_BELOW`] the row takes the argmax.
    pub temperature: f32,
    /// Keep this many most likely tokens; 0 keeps all.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// OpenAI's penalties, by which each adjustment's `generated` count
    /// lowers its logit ([`LogitAdjustment::shift`]).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Logit changes for the tokens the request biases or has seen, one per
    /// id, in id order; ids outside the vocabulary are ignored.
    pub adjustments: Vec<LogitAdjustment>,
    /// The row of the previous step's sample whose token joins the
    /// sequence just before this row: a step planned before that token
    /// reached the host. The backend that holds it counts it as generated
    /// once more (and as repeated), as the host would have.
    pub coming: Option<u32>,
    /// The draw in `[0, 1)` that picks among the kept tokens.
    pub uniform: f32,
}

/// `logit += shift`, then, if `repeated`, HF's repetition penalty: the
/// logit is divided by the penalty when positive, multiplied when not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitAdjustment {
    pub token: u32,
    /// The sum of the request's biases for it.
    pub bias: f32,
    /// Times it was generated (counted where a presence or frequency penalty applies).
    pub generated: u32,
    /// In the sequence (marked where a repetition penalty applies).
    pub repeated: bool,
}

impl LogitAdjustment {
    pub fn new(token: u32) -> Self {
        Self::from_parts(token, 0.0, 0, false)
    }

    /// An adjustment with every field given.
    pub fn from_parts(token: u32, bias: f32, generated: u32, repeated: bool) -> Self {
        LogitAdjustment {
            token,
            bias,
            generated,
            repeated,
        }
    }

    /// This token's adjustment once it joins the sequence as the coming
    /// token: generated once more, and repeated.
    pub fn joined(self) -> Self {
        LogitAdjustment {
            generated: self.generated + 1,
            repeated: true,
            ..self
        }
    }

    /// Bias, then OpenAI's presence and frequency penalties, as one shift
    /// (`kernels/sampling.cu` rounds each operation alike).
    pub fn shift(&self, presence: f32, frequency: f32) -> f32 {
        match self.generated {
            0 => self.bias,
            n => self.bias - (presence + frequency * n as f32),
        }
    }
}

/// Temperatures below this are greedy.
pub const GREEDY_BELOW: f32 = 1e-5;

/// Scaled logits this far below the best have probability under e^-40
/// relative to it: 150k of them weigh ~1e-12, far below 2^-24.
pub const NEGLIGIBLE: f32 = 40.0;

impl RowSampling {
    pub fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            adjustments: Vec::new(),
            coming: None,
            uniform: 0.0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// Applies the row's adjustments to `scores` in place and picks its token;
/// `coming` is the token the row's [`RowSampling::coming`] names.
pub fn choose(scores: &mut [f32], row: &RowSampling, coming: Option<u32>) -> u32 {
    let mut listed = false;
    for &a in &row.adjustments {
        let now = Some(a.token) == coming;
        listed |= now;
        adjust(scores, row, &if now { a.joined() } else { a });
    }
    if let Some(token) = coming.filter(|_| !listed) {
        adjust(scores, row, &LogitAdjustment::new(token).joined());
    }
    match row.is_greedy() {
        true => argmax(scores),
        false => draw(scores, row),
    }
}

/// One adjustment to its token's score (a penalty of 1 changes nothing,
/// so a coming token is marked repeated whatever the request's).
fn adjust(scores: &mut [f32], row: &RowSampling, a: &LogitAdjustment) {
    if let Some(s) = scores.get_mut(a.token as usize) {
        *s += a.shift(row.presence_penalty, row.frequency_penalty);
        if a.repeated {
            *s = if *s > 0.0 {
                *s / row.repetition_penalty
            } else {
                *s * row.repetition_penalty
            };
        }
    }
}

/// [`choose`] for each row of `scores [rows.len(), vocab]`, on all cores,
/// with the tokens of `previous` (the last step's sample) for rows whose
/// [`RowSampling::coming`] names one.
pub fn choose_rows(scores: &mut [f32], vocab: usize, rows: &[RowSampling], previous: &[u32]) -> Result<Vec<u32>, String> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if vocab == 0 || scores.len() != rows.len() * vocab {
        return Err(format!(
            "{} rows of sampling for {} logits of a {vocab}-token vocabulary",
            rows.len(),
            scores.len()
        ));
    }
    let coming: Vec<Option<u32>> = rows
        .iter()
        .map(|r| match r.coming {
            None => Ok(None),
            Some(at) => previous
                .get(at as usize)
                .map(|&t| Some(t))
                .ok_or_else(|| format!("a row counts row {at} of the previous sample, which picked {}", previous.len())),
        })
        .collect::<Result<_, _>>()?;
    Ok(scores
        .par_chunks_mut(vocab)
        .zip(rows)
        .zip(coming)
        .map(|((s, row), coming)| choose(s, row, coming))
        .collect())
}

/// Draws from `softmax(scores / temperature)` over the kept set. Skipping
/// the negligible tokens first spares an `exp` and a sort for most of them.
fn draw(scores: &[f32], row: &RowSampling) -> u32 {
    let t = row.temperature;
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
    let floor = max - NEGLIGIBLE;
    let mut candidates: Vec<(u32, f32)> = scores
        .iter()
        .enumerate()
        .filter(|(_, &s)| s / t >= floor)
        .map(|(i, &s)| (i as u32, s / t))
        .collect();
    // Top-k and top-p leave the candidates out of id order.
    let mut reordered = false;
    let k = row.top_k as usize;
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, by_score_desc);
        candidates.truncate(k);
        reordered = true;
    }
    // From here on the second field is the unnormalised probability
    // exp(score - max): the best token's is 1, so min-p compares directly.
    candidates.iter_mut().for_each(|c| c.1 = (c.1 - max).exp());
    if row.min_p > 0.0 {
        candidates.retain(|c| c.1 >= row.min_p);
    }
    if row.top_p < 1.0 {
        let total: f64 = candidates.iter().map(|c| c.1 as f64).sum();
        keep_nucleus(&mut candidates, row.top_p as f64 * total);
        reordered = true;
    }
    if reordered {
        candidates.sort_unstable_by_key(|c| c.0);
    }
    let kept: f64 = candidates.iter().map(|c| c.1 as f64).sum();
    let mut target = row.uniform as f64 * kept;
    for c in &candidates {
        target -= c.1 as f64;
        if target < 0.0 {
            return c.0;
        }
    }
    candidates.last().expect("the best token always survives").0
}

pub(super) fn by_score_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the most likely candidates until their mass reaches `mass`; only
/// as many as needed are sorted, as the nucleus is usually small.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn row(temperature: f32, top_k: u32, top_p: f32, min_p: f32, uniform: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            uniform,
            ..RowSampling::greedy()
        }
    }

    /// The definition the fast path must meet: sort everything by (score
    /// desc, id asc), cut by each rule in turn, then walk in id order.
    fn by_definition(scores: &[f32], r: &RowSampling) -> u32 {
        let t = r.temperature;
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
        let mut all: Vec<(u32, f32)> = scores.iter().enumerate().map(|(i, &s)| (i as u32, s / t)).collect();
        all.sort_by(by_score_desc);
        all.retain(|c| c.1 >= max - NEGLIGIBLE);
        if r.top_k > 0 {
            all.truncate(r.top_k as usize);
        }
        all.iter_mut().for_each(|c| c.1 = (c.1 - max).exp());
        all.retain(|c| c.1 >= r.min_p);
        let total: f64 = all.iter().map(|c| c.1 as f64).sum();
        let mut cumulative = 0.0;
        if r.top_p < 1.0 {
            if let Some(i) = all.iter().position(|c| {
                cumulative += c.1 as f64;
                cumulative >= r.top_p as f64 * total
            }) {
                all.truncate(i + 1);
            }
        }
        all.sort_by_key(|c| c.0);
        let mut target = r.uniform as f64 * all.iter().map(|c| c.1 as f64).sum::<f64>();
        all.iter()
            .find(|c| {
                target -= c.1 as f64;
                target < 0.0
            })
            .unwrap_or(all.last().unwrap())
            .0
    }

    #[test]
    fn the_fast_path_picks_what_the_definition_picks() {
        let mut rng = Rng::seeded(11);
        for case in 0..400 {
            let vocab = [7, 100, 1000, 5000][case % 4];
            // Coarse values make ties at every threshold common.
            let scores: Vec<f32> = (0..vocab).map(|_| (rng.next_f32() * 24.0).floor() * 0.5).collect();
            let r = row(
                [0.3, 1.0, 2.5][case % 3],
                [0, 1, 5, 64, 3000][case % 5],
                [1.0, 0.9, 0.5, 0.05][case % 4],
                [0.0, 0.01, 0.3][case % 3],
                rng.next_f32(),
            );
            let expected = by_definition(&scores, &r);
            assert_eq!(choose(&mut scores.clone(), &r, None), expected, "case {case}: {r:?}");
        }
    }

    #[test]
    fn adjustments_apply_the_shift_then_the_repetition_penalty() {
        let mut scores = vec![2.0, -2.0, 1.0, 1.5, 0.5];
        let r = RowSampling {
            repetition_penalty: 2.0,
            presence_penalty: 0.25,
            frequency_penalty: 0.5,
            adjustments: vec![
                LogitAdjustment::from_parts(0, 0.0, 0, true),
                LogitAdjustment::from_parts(1, 0.0, 0, true),
                LogitAdjustment::from_parts(2, -1.5, 0, true),
                LogitAdjustment::from_parts(4, 1.0, 2, false),
                LogitAdjustment::from_parts(9, 5.0, 0, false),
            ],
            ..RowSampling::greedy()
        };
        assert_eq!(choose(&mut scores, &r, None), 3);
        // Token 4: 0.5 + 1.0 - (0.25 + 2 × 0.5).
        assert_eq!(scores, vec![1.0, -4.0, -1.0, 1.5, 0.25]);
    }

    #[test]
    fn a_coming_token_counts_as_generated_once_more_and_repeated() {
        let r = RowSampling {
            repetition_penalty: 2.0,
            presence_penalty: 0.25,
            frequency_penalty: 0.5,
            adjustments: vec![
                LogitAdjustment::from_parts(1, 0.5, 1, false),
                LogitAdjustment::from_parts(2, 0.0, 0, true),
            ],
            coming: Some(0),
            ..RowSampling::greedy()
        };
        let scores = [3.0, 3.0, 3.0, 0.0];
        // Listed, and generated once before: 3 + 0.5 - (0.25 + 2 × 0.5), halved.
        let mut listed = scores.to_vec();
        choose(&mut listed, &r, Some(1));
        assert_eq!(listed, [3.0, 1.125, 1.5, 0.0]);
        // Not listed: 3 - (0.25 + 0.5), halved; the list applies as it is.
        let mut new = scores.to_vec();
        choose(&mut new, &r, Some(3));
        assert_eq!(new, [3.0, 2.75, 1.5, -1.5]);
        // The same as the host's row once the token is known.
        let known = RowSampling {
            adjustments: vec![
                LogitAdjustment::from_parts(1, 0.5, 1, false),
                LogitAdjustment::from_parts(2, 0.0, 0, true),
                LogitAdjustment::from_parts(3, 0.0, 1, true),
            ],
            coming: None,
            ..r.clone()
        };
        let mut after = scores.to_vec();
        choose(&mut after, &known, None);
        assert_eq!(after, new);
    }

    #[test]
    fn rows_are_chosen_each_by_its_own_rule_and_a_miscount_is_an_error() {
        let mut scores = vec![0.0, 5.0, 1.0, 3.0, 2.0, 0.0];
        let banned = RowSampling {
            adjustments: vec![LogitAdjustment::from_parts(0, -10.0, 0, false)],
            ..RowSampling::greedy()
        };
        assert_eq!(
            choose_rows(&mut scores, 3, &[RowSampling::greedy(), banned], &[]).unwrap(),
            vec![1, 1]
        );
        let err = choose_rows(&mut scores, 3, &[RowSampling::greedy()], &[]).unwrap_err();
        assert!(err.contains("1 rows of sampling for 6 logits of a 3-token vocabulary"), "{err}");
    }

    #[test]
    fn a_row_takes_its_coming_token_from_the_previous_sample() {
        // Row 1 is greedy with a repetition penalty; the previous sample's
        // row 0 picked token 1, which the penalty then makes lose to token 2.
        let penalized = RowSampling {
            repetition_penalty: 2.0,
            coming: Some(0),
            ..RowSampling::greedy()
        };
        let scores = [0.0, 4.0, 3.0];
        let rows = [RowSampling::greedy(), penalized];
        assert_eq!(choose_rows(&mut [scores, scores].concat(), 3, &rows, &[1]).unwrap(), vec![1, 2]);
        let err = choose_rows(&mut [scores, scores].concat(), 3, &rows, &[]).unwrap_err();
        assert!(err.contains("counts row 0 of the previous sample, which picked 0"), "{err}");
    }

    #[test]
    fn argmax_agrees_with_a_plain_scan_on_ties_and_odd_lengths() {
        for len in [1, 15, 16, 17, 1003] {
            let scores: Vec<f32> = (0..len).map(|i| ((i * 7919) % 97) as f32).collect();
            let plain = (0..len).fold(0, |best, i| if scores[i] > scores[best] { i } else { best });
            assert_eq!(argmax(&scores) as usize, plain, "length {len}");
        }
    }
}
