//! `--load-format dummy`: random weights with the shapes a config implies,
//! for benchmarks and memory planning without a download. Values depend only
//! on the seed and the tensor's name, so every rank of a split model and
//! every run with the same seed see the same model.

use super::{LoadError, WeightSource};
use crate::backend::{DType, HostTensor};
use crate::rng::{fnv1a, Rng};
use rayon::prelude::*;

/// Elements generated per independently seeded chunk (lets generation use every core).
const CHUNK: usize = 1 << 16;

pub struct DummyWeights {
    pub seed: u64,
    pub dtype: DType,
}

impl DummyWeights {
    fn value_range(name: &str) -> (f32, f32) {
        if name.ends_with("norm.weight") {
            (0.9, 1.1)
        } else {
            // Small enough that activations stay finite through any depth.
            (-0.02, 0.02)
        }
    }
}

impl WeightSource for DummyWeights {
    fn dtype(&self, _name: &str) -> Result<DType, LoadError> {
        Ok(self.dtype)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let numel: usize = shape.iter().product();
        let (lo, hi) = Self::value_range(name);
        let base = fnv1a(name.as_bytes()) ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let elem = self.dtype.size_in_bytes();
        let mut bytes = vec![0u8; numel * elem];
        bytes.par_chunks_mut(CHUNK * elem).enumerate().for_each(|(chunk, out)| {
            let mut rng = Rng::seeded(base.wrapping_add(chunk as u64));
            for b in out.chunks_exact_mut(elem) {
                let v = lo + (hi - lo) * rng.next_f32();
                match self.dtype {
                    DType::F32 => b.copy_from_slice(&v.to_le_bytes()),
                    DType::BF16 => b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    DType::F16 => b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
        Ok(HostTensor {
            dtype: self.dtype,
            shape: shape.to_vec(),
            bytes,
        })
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
