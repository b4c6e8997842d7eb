//! Which part of the model one rank holds, and the slice of each
//! checkpoint tensor that part needs. Tensor parallelism splits attention
//! by heads (q/k/v rows, o_proj columns), the MLP by intermediate features
//! (gate/up rows, down_proj columns) and the vocabulary (embedding and LM
//! head rows); pipeline parallelism gives each stage a contiguous range of
//! layers.

use crate::backend::HostTensor;
use crate::config::ModelConfig;
use crate::loader::{LoadError, WeightSource};
use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub tp_rank: usize,
    pub tp: usize,
    /// This stage's decoder layers.
    pub layers: Range<usize>,
    /// Holds the embedding (the first pipeline stage).
    pub first_stage: bool,
    /// Holds the final norm and the LM head (the last pipeline stage).
    pub last_stage: bool,
}

impl Shard {
    /// The whole model on one device.
    pub fn whole(config: &ModelConfig) -> Self {
        Shard {
            tp_rank: 0,
            tp: 1,
            layers: 0..config.num_hidden_layers,
            first_stage: true,
            last_stage: true,
        }
    }

    /// This rank's attention heads.
    pub fn heads(&self, config: &ModelConfig) -> Range<usize> {
        let per = config.num_attention_heads / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// This rank's KV heads: its share, or, when tp exceeds the model's KV
    /// heads, the one head its query heads read (replicated across ranks).
    pub fn kv_heads(&self, config: &ModelConfig) -> Range<usize> {
        let kv = config.num_kv_heads();
        match kv >= self.tp {
            true => {
                let per = kv / self.tp;
                self.tp_rank * per..(self.tp_rank + 1) * per
            }
            false => {
                let head = self.tp_rank / (self.tp / kv);
                head..head + 1
            }
        }
    }

    /// This rank's intermediate (MLP) features.
    pub fn intermediate(&self, config: &ModelConfig) -> Range<usize> {
        let per = config.intermediate_size / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// Vocabulary rows per rank: `ceil(vocab / tp)`.
    pub fn vocab_per_rank(&self, config: &ModelConfig) -> usize {
        config.vocab_size.div_ceil(self.tp)
    }

    /// The token ids this rank's embedding and LM head rows stand for.
    pub fn vocab(&self, config: &ModelConfig) -> Range<usize> {
        let per = self.vocab_per_rank(config);
        (self.tp_rank * per).min(config.vocab_size)..((self.tp_rank + 1) * per).min(config.vocab_size)
    }

    /// The embedding or LM head `name` as this rank holds it: `[vocab,
    /// hidden]` → `[vocab_per_rank + 1, hidden]`, the rank's rows, zero rows
    /// padding every rank to the same height, and a final zero row that
    /// tokens of other ranks look up (so a lookup plus all-reduce is the
    /// full lookup). The whole table when the vocabulary is not split.
    pub fn vocab_rows(&self, config: &ModelConfig, source: &dyn WeightSource, name: &str) -> Result<HostTensor, LoadError> {
        let shape = [config.vocab_size, config.hidden_size];
        if self.tp == 1 {
            return source.tensor(name, &shape);
        }
        let rows = source.tensor_slice(name, &shape, self.vocab(config), None)?;
        Ok(rows.pad_rows(self.vocab_per_rank(config) + 1))
    }
}

impl HostTensor {
    /// Rows `range` of a tensor (its first dimension).
    pub fn slice_rows(&self, range: Range<usize>) -> HostTensor {
        let row_bytes = self.bytes.len() / self.shape[0].max(1);
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        HostTensor {
            dtype: self.dtype,
            shape,
            bytes: self.bytes[range.start * row_bytes..range.end * row_bytes].to_vec(),
        }
    }

    /// Columns `range` of a matrix.
    pub fn slice_cols(&self, range: Range<usize>) -> HostTensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let size = self.dtype.size_in_bytes();
        let bytes = (0..rows)
            .flat_map(|r| &self.bytes[(r * cols + range.start) * size..(r * cols + range.end) * size])
            .copied()
            .collect();
        HostTensor {
            dtype: self.dtype,
            shape: vec![rows, range.len()],
            bytes,
        }
    }

    /// Appends zero rows up to `rows` rows.
    pub fn pad_rows(mut self, rows: usize) -> HostTensor {
        let row_bytes = self.shape[1..].iter().product::<usize>() * self.dtype.size_in_bytes();
        self.bytes.resize(rows * row_bytes, 0);
        self.shape[0] = rows;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DType;

    /// One tensor, served whatever its name.
    struct Table(HostTensor);

    impl WeightSource for Table {
        fn tensor(&self, _name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
            assert_eq!(shape, self.0.shape);
            Ok(self.0.clone())
        }

        fn contains(&self, _name: &str) -> bool {
            true
        }

        fn dtype(&self, _name: &str) -> Result<DType, LoadError> {
            Ok(self.0.dtype)
        }
    }

    fn config(heads: usize, kv: usize, vocab: usize, hidden: usize) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64, "tie_word_embeddings": true
        }))
        .unwrap()
    }

    fn shard(tp_rank: usize, tp: usize) -> Shard {
        Shard {
            tp_rank,
            tp,
            layers: 0..4,
            first_stage: true,
            last_stage: true,
        }
    }

    #[test]
    fn query_heads_of_a_rank_read_the_kv_head_it_holds() {
        let c = config(8, 2, 10, 64);
        for tp in [1, 2, 4, 8] {
            for r in 0..tp {
                let s = shard(r, tp);
                let kv = s.kv_heads(&c);
                // Every query head's GQA group is among this rank's KV heads.
                for h in s.heads(&c) {
                    assert!(kv.contains(&(h / 4)), "tp {tp} rank {r} head {h} kv {kv:?}");
                }
            }
        }
    }

    #[test]
    fn vocab_rows_pad_every_rank_to_one_height_plus_a_zero_row() {
        let c = config(2, 2, 10, 2);
        let source = Table(HostTensor::from_f32(vec![10, 2], &(0..20).map(|v| v as f32).collect::<Vec<_>>()));
        let rows = |r| shard(r, 3).vocab_rows(&c, &source, "t").unwrap().to_f32();
        assert_eq!(rows(0), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0, 0.0]);
        assert_eq!(rows(2), vec![16.0, 17.0, 18.0, 19.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(shard(0, 1).vocab_rows(&c, &source, "t").unwrap().shape, vec![10, 2]);
        let m = HostTensor::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(m.slice_cols(1..3).to_f32(), vec![2.0, 3.0, 5.0, 6.0]);
    }
}
