//! A `tp × pp` layout for a model: the checks that make it valid, the
//! contiguous layer range of each pipeline stage, and the slice of every
//! weight one tensor-parallel rank holds.

use crate::config::ModelConfig;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("--tp and --pp must be at least 1 (got tp={tp}, pp={pp})")]
    Zero { tp: usize, pp: usize },
    #[error("tp={tp} does not divide {dimension}={value}; tp may be one of {valid:?}")]
    Indivisible {
        tp: usize,
        dimension: &'static str,
        value: usize,
        valid: Vec<usize>,
    },
    #[error("tp={tp} and num_key_value_heads={kv_heads}: one must divide the other; tp may be one of {valid:?}")]
    KvHeads { tp: usize, kv_heads: usize, valid: Vec<usize> },
    #[error("pp={pp} exceeds num_hidden_layers={layers}: every stage needs a layer")]
    TooManyStages { pp: usize, layers: usize },
    #[error("--pp-layers {given:?} must give {pp} positive counts summing to num_hidden_layers={layers}")]
    BadStageSplit { given: Vec<usize>, pp: usize, layers: usize },
}

impl Layout {
    pub fn world_size(&self) -> usize {
        self.tp * self.pp
    }

    /// Checks that the model splits this way.
    pub fn validate(&self, config: &ModelConfig) -> Result<(), LayoutError> {
        let Layout { tp, pp } = *self;
        if tp == 0 || pp == 0 {
            return Err(LayoutError::Zero { tp, pp });
        }
        let valid = || valid_tp(config, 64);
        for (dimension, value) in [
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
        ] {
            if value % tp != 0 {
                return Err(LayoutError::Indivisible {
                    tp,
                    dimension,
                    value,
                    valid: valid(),
                });
            }
        }
        let kv_heads = config.num_kv_heads();
        if kv_heads % tp != 0 && tp % kv_heads != 0 {
            return Err(LayoutError::KvHeads {
                tp,
                kv_heads,
                valid: valid(),
            });
        }
        if pp > config.num_hidden_layers {
            return Err(LayoutError::TooManyStages {
                pp,
                layers: config.num_hidden_layers,
            });
        }
        Ok(())
    }

    /// Each stage's layers: `explicit` counts (`--pp-layers 13,11`), or a
    /// split that balances weight bytes, the embedding counting on the
    /// first stage and the final norm and LM head on the last.
    pub fn stage_layers(&self, config: &ModelConfig, explicit: Option<&[usize]>) -> Result<Vec<Range<usize>>, LayoutError> {
        let layers = config.num_hidden_layers;
        let counts = match explicit {
            Some(given) => {
                if given.len() != self.pp || given.contains(&0) || given.iter().sum::<usize>() != layers {
                    return Err(LayoutError::BadStageSplit {
                        given: given.to_vec(),
                        pp: self.pp,
                        layers,
                    });
                }
                given.to_vec()
            }
            None => {
                let shard = ShardSizes::new(config, self.tp);
                balanced_counts(layers, self.pp, shard.layer, shard.embedding, shard.embedding + shard.norm)
            }
        };
        let mut start = 0;
        Ok(counts
            .into_iter()
            .map(|n| {
                start += n;
                start - n..start
            })
            .collect())
    }
}

/// Tensor-parallel sizes up to `max` that the model allows.
pub fn valid_tp(config: &ModelConfig, max: usize) -> Vec<usize> {
    let kv = config.num_kv_heads();
    (1..=max)
        .filter(|&tp| config.num_attention_heads % tp == 0 && config.intermediate_size % tp == 0 && (kv % tp == 0 || tp % kv == 0))
        .collect()
}

/// What one tensor-parallel rank holds of each part of the model, in
/// parameters.
#[derive(Clone, Copy, Debug)]
pub struct ShardSizes {
    /// One decoder layer: its slices of q/k/v (with biases), o_proj, gate/up
    /// and down_proj, and both norms (replicated).
    pub layer: usize,
    /// The vocabulary slice of the embedding (and, alike, of the LM head).
    pub embedding: usize,
    /// The final norm (replicated).
    pub norm: usize,
    /// KV heads this rank caches: its share, or one replicated head when tp
    /// exceeds the model's KV heads.
    pub kv_heads: usize,
}

impl ShardSizes {
    pub fn new(config: &ModelConfig, tp: usize) -> Self {
        let (h, hd) = (config.hidden_size, config.head_dim());
        let heads = config.num_attention_heads / tp;
        let kv_heads = (config.num_kv_heads() / tp).max(1);
        let qkv_rows = (heads + 2 * kv_heads) * hd;
        let inter = config.intermediate_size / tp;
        ShardSizes {
            layer: qkv_rows * h + qkv_rows + h * heads * hd + 3 * inter * h + 2 * h,
            embedding: config.vocab_size.div_ceil(tp) * h,
            norm: h,
            kv_heads,
        }
    }
}

/// Splits `layers` equal layers into `stages` contiguous counts, minimising
/// the largest stage's bytes when the first stage also holds `first` and
/// the last `last` (a DP over split points; models have ≤ a few hundred
/// layers).
fn balanced_counts(layers: usize, stages: usize, layer: usize, first: usize, last: usize) -> Vec<usize> {
    let cost = |stage: usize, n: usize| n * layer + if stage == 0 { first } else { 0 } + if stage == stages - 1 { last } else { 0 };
    // best[s][l]: the smallest possible largest stage when stages s.. hold the last l layers.
    let mut best = vec![vec![usize::MAX; layers + 1]; stages + 1];
    let mut choice = vec![vec![0; layers + 1]; stages + 1];
    best[stages][0] = 0;
    for s in (0..stages).rev() {
        let remaining_stages = stages - s;
        for l in remaining_stages..=layers {
            for n in 1..=l - (remaining_stages - 1) {
                let rest = best[s + 1][l - n];
                if rest == usize::MAX {
                    continue;
                }
                let worst = cost(s, n).max(rest);
                // Ties go to the earlier stage taking more layers.
                if worst < best[s][l] || (worst == best[s][l] && n > choice[s][l]) {
                    best[s][l] = worst;
                    choice[s][l] = n;
                }
            }
        }
    }
    let mut counts = Vec::with_capacity(stages);
    let mut l = layers;
    for stage_choice in choice.iter().take(stages) {
        counts.push(stage_choice[l]);
        l -= stage_choice[l];
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize, inter: usize, layers: usize) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000,
            "hidden_size": heads * 16, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256, "tie_word_embeddings": false
        }))
        .unwrap()
    }

    #[test]
    fn an_indivisible_tp_names_the_dimension_and_what_would_work() {
        let c = config(14, 2, 4864, 24);
        let err = Layout { tp: 4, pp: 1 }.validate(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tp=4 does not divide num_attention_heads=14; tp may be one of [1, 2]"
        );
        assert!(Layout { tp: 2, pp: 1 }.validate(&c).is_ok());
        let err = Layout { tp: 1, pp: 25 }.validate(&c).unwrap_err();
        assert!(matches!(err, LayoutError::TooManyStages { pp: 25, layers: 24 }));
        assert!(matches!(Layout { tp: 0, pp: 1 }.validate(&c), Err(LayoutError::Zero { .. })));
    }

    #[test]
    fn kv_heads_split_or_replicate_but_never_unevenly() {
        let c = config(12, 4, 96, 6);
        assert!(Layout { tp: 2, pp: 1 }.validate(&c).is_ok());
        assert!(Layout { tp: 12, pp: 1 }.validate(&c).is_ok());
        let err = Layout { tp: 6, pp: 1 }.validate(&c).unwrap_err();
        assert!(matches!(err, LayoutError::KvHeads { tp: 6, kv_heads: 4, .. }), "{err}");
        assert_eq!(ShardSizes::new(&c, 12).kv_heads, 1);
        assert_eq!(ShardSizes::new(&c, 2).kv_heads, 2);
    }

    #[test]
    fn stages_balance_bytes_and_explicit_splits_are_checked() {
        let c = config(4, 2, 64, 6);
        let layout = Layout { tp: 1, pp: 4 };
        let stages = layout.stage_layers(&c, None).unwrap();
        assert_eq!(stages.len(), 4);
        assert_eq!(stages.first().unwrap().start, 0);
        assert_eq!(stages.last().unwrap().end, 6);
        assert!(stages.windows(2).all(|w| w[0].end == w[1].start && !w[1].is_empty()));
        // No other split has a smaller largest stage.
        let s = ShardSizes::new(&c, 1);
        let worst = |counts: &[usize]| {
            let n = counts.len();
            counts
                .iter()
                .enumerate()
                .map(|(i, &k)| k * s.layer + if i == 0 { s.embedding } else { 0 } + if i == n - 1 { s.embedding + s.norm } else { 0 })
                .max()
                .unwrap()
        };
        let ours: Vec<usize> = stages.iter().map(|r| r.len()).collect();
        for a in 1..=3 {
            for b in 1..=3 {
                for d in 1..=3 {
                    if a + b + d < 6 {
                        assert!(worst(&ours) <= worst(&[a, b, d, 6 - a - b - d]));
                    }
                }
            }
        }
        assert_eq!(Layout { tp: 1, pp: 2 }.stage_layers(&c, Some(&[4, 2])).unwrap(), vec![0..4, 4..6]);
        let err = Layout { tp: 1, pp: 2 }.stage_layers(&c, Some(&[4, 1])).unwrap_err();
        assert!(matches!(err, LayoutError::BadStageSplit { .. }));
    }
}
