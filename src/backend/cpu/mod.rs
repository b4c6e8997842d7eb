//! The CPU backend: the numerical reference for every other backend, and the
//! default where no GPU is present.
//!
//! Arithmetic is f32 throughout. Weight matrices stay in their checkpoint
//! dtype (bf16/f16 halve the bytes each decode step streams) and are widened
//! in registers; vectors (norms, biases) are widened once at load. Every
//! heavy op runs on all cores through rayon.

mod attention;
mod buffer;
mod matmul;
mod simd;

use super::{
    previous_row, AttentionSpec, Backend, BackendError, DType, HostStaging, HostTensor, KvCacheShape, Result, RmsNorm, StepCapacity,
    StepInputs,
};
use crate::sampling::choose_rows;
use buffer::WeightBuffer;
use half::{bf16, f16};
use rayon::prelude::*;
use std::convert::Infallible;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A row-major `[rows, cols]` f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "CpuTensor: {} values for [{rows}, {cols}]", data.len());
        CpuTensor { data, rows, cols }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

enum WeightData {
    F32(Vec<f32>),
    Bf16(WeightBuffer<bf16>),
    F16(WeightBuffer<f16>),
}

/// A parameter: a `[rows, cols]` matrix in its checkpoint dtype, or a vector
/// (`rows == 1`) widened to f32.
pub struct CpuWeight {
    data: WeightData,
    rows: usize,
    cols: usize,
}

impl CpuWeight {
    fn vector(&self) -> &[f32] {
        match &self.data {
            WeightData::F32(v) => v,
            _ => unreachable!("vectors are widened to f32 at load"),
        }
    }
}

/// One layer's paged KV cache: `[num_blocks · block_size, kv_heads, head_dim]` each.
pub struct CpuKvCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// A step's inputs, read where they are, and the tokens sampled from it.
pub struct CpuStep<'a> {
    inputs: StepInputs<'a>,
    sampled: Vec<u32>,
}

/// The CPU runs each op as it comes: there is nothing to record.
fn no_graphs() -> BackendError {
    BackendError::Device("the CPU backend records no graphs".into())
}

#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    /// The tokens the last [`Backend::sample`] picked, for the next step's
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids (shared by clones: one
    /// device).
    previous: Arc<Mutex<Vec<u32>>>,
}

/// A step's token id as a row of the embedding table: a
/// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) id is the token the previous
/// sample picked for its row, at its row of the `vocab` slice (or the last
/// row, outside it).
fn resolve(id: u32, previous: &[u32], vocab: &Range<u32>, rows: usize) -> Result<usize> {
    let row = match previous_row(id) {
        None => id as usize,
        Some(at) => {
            let at = at as usize;
            let token = *previous.get(at).ok_or_else(|| {
                BackendError::Device(format!(
                    "embedding: row {at} of the previous sample, which picked {}",
                    previous.len()
                ))
            })?;
            match vocab.contains(&token) {
                true => (token - vocab.start) as usize,
                false => rows.saturating_sub(1),
            }
        }
    };
    match row < rows {
        true => Ok(row),
        false => Err(BackendError::Device(format!(
            "embedding: a token id is outside the table's {rows} rows"
        ))),
    }
}

/// Bytes a cached key or value takes: the CPU caches f32.
pub const KV_CACHE_BYTES: usize = std::mem::size_of::<f32>();

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Step<'a> = CpuStep<'a>;
    type Graph = Infallible;
    type Fetch = Vec<u32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load_weight(&self, host: HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = host.matrix_dims();
        let data = match host.dtype {
            _ if rows == 1 => WeightData::F32(host.to_f32()),
            DType::F32 => WeightData::F32(host.to_f32()),
            DType::BF16 => WeightData::Bf16(WeightBuffer::from_le_bytes(&host.bytes).map_err(|e| alloc_error(&host, e))?),
            DType::F16 => WeightData::F16(WeightBuffer::from_le_bytes(&host.bytes).map_err(|e| alloc_error(&host, e))?),
        };
        Ok(CpuWeight { data, rows, cols })
    }

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        let elem = match w.data {
            WeightData::F32(_) => 4,
            WeightData::Bf16(_) | WeightData::F16(_) => 2,
        };
        w.rows * w.cols * elem
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache> {
        let n = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        Ok(CpuKvCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    fn embedding(&self, table: &CpuWeight, step: &CpuStep<'_>, vocab: Range<u32>) -> Result<CpuTensor> {
        let (cols, ids) = (table.cols, step.inputs.token_ids);
        let previous = self.previous.lock().expect("the previous sample is not poisoned");
        let mut out = vec![0.0f32; ids.len() * cols];
        for (dst, &id) in out.chunks_mut(cols).zip(ids) {
            let row = resolve(id, &previous, &vocab, table.rows)?;
            let span = row * cols..(row + 1) * cols;
            match &table.data {
                WeightData::F32(v) => dst.copy_from_slice(&v[span]),
                WeightData::Bf16(v) => dst.iter_mut().zip(&v.as_slice()[span]).for_each(|(d, s)| *d = s.to_f32()),
                WeightData::F16(v) => dst.iter_mut().zip(&v.as_slice()[span]).for_each(|(d, s)| *d = s.to_f32()),
            }
        }
        Ok(CpuTensor::new(out, ids.len(), cols))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        Ok(matmul::linear(x, w, bias.map(CpuWeight::vector)))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let mut out = x.clone();
        let w = weight.vector();
        out.data.par_chunks_mut(x.cols).for_each(|row| rms_norm_row(row, w, eps));
        Ok(out)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add_assign: shapes differ");
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn prepare_step<'a>(&self, inputs: StepInputs<'a>) -> Result<CpuStep<'a>> {
        Ok(CpuStep {
            inputs,
            sampled: Vec::new(),
        })
    }

    fn rope_write_kv(
        &self,
        qkv: &mut CpuTensor,
        cache: &mut CpuKvCache,
        step: &CpuStep<'_>,
        cos_sin: &CpuWeight,
        spec: &AttentionSpec,
    ) -> Result<()> {
        rope(qkv, step.inputs.positions, cos_sin.vector(), spec);
        attention::write_kv(qkv, cache, step.inputs.attn, spec);
        Ok(())
    }

    fn paged_attention(&self, qkv: &CpuTensor, cache: &CpuKvCache, step: &CpuStep<'_>, spec: &AttentionSpec) -> Result<CpuTensor> {
        Ok(attention::paged_attention(qkv, cache, step.inputs.attn, spec))
    }

    fn swiglu(&self, x: &CpuTensor, norm: RmsNorm<'_, CpuWeight>, gate_up: &CpuWeight) -> Result<CpuTensor> {
        let normed = self.rms_norm(x, norm.weight, norm.eps)?;
        Ok(silu_mul(&matmul::linear(&normed, gate_up, None)))
    }

    fn final_norm(&self, x: &CpuTensor, step: &CpuStep<'_>, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let rows = step.inputs.logit_rows;
        let data = rows.iter().flat_map(|&r| x.row(r as usize).iter().copied()).collect();
        let mut out = CpuTensor::new(data, rows.len(), x.cols);
        let w = weight.vector();
        out.data.par_chunks_mut(x.cols).for_each(|row| rms_norm_row(row, w, eps));
        Ok(out)
    }

    fn lay_out_vocab(&self, all: &CpuTensor, ranks: usize, per: usize, vocab: usize) -> Result<CpuTensor> {
        let rows = all.rows / ranks.max(1);
        if all.rows != rows * ranks || all.cols != per + 1 || vocab > ranks * per {
            return Err(BackendError::Device(format!(
                "lay_out_vocab: [{}, {}] from {ranks} ranks of {per} for {vocab}",
                all.rows, all.cols
            )));
        }
        let mut data = Vec::with_capacity(rows * vocab);
        for row in 0..rows {
            for rank in 0..ranks {
                let valid = vocab.saturating_sub(rank * per).min(per);
                data.extend_from_slice(&all.row(rank * rows + row)[..valid]);
            }
        }
        Ok(CpuTensor::new(data, rows, vocab))
    }

    fn sample(&self, logits: &mut CpuTensor, step: &mut CpuStep<'_>) -> Result<()> {
        let mut previous = self.previous.lock().expect("the previous sample is not poisoned");
        step.sampled = choose_rows(&mut logits.data, logits.cols, step.inputs.sampling, &previous)
            .map_err(|e| BackendError::Device(format!("sample: {e}")))?;
        previous.clone_from(&step.sampled);
        Ok(())
    }

    fn fetch_sampled(&self, step: &CpuStep<'_>) -> Result<Vec<u32>> {
        Ok(step.sampled.clone())
    }

    fn fetched(&self, mut fetch: Vec<u32>, n: usize) -> Result<Vec<u32>> {
        fetch.truncate(n);
        Ok(fetch)
    }

    fn static_step(&self, _capacity: StepCapacity) -> Result<Option<CpuStep<'static>>> {
        Ok(None)
    }

    fn update_step(&self, _step: &mut CpuStep<'static>, _inputs: StepInputs<'_>) -> Result<()> {
        Err(no_graphs())
    }

    fn capture(&self, _record: &mut dyn FnMut() -> Result<()>) -> Result<Infallible> {
        Err(no_graphs())
    }

    fn replay(&self, graph: &Infallible) -> Result<()> {
        match *graph {}
    }

    fn to_host(&self, x: &CpuTensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&x.data);
        Ok(())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::new(vec![0.0; rows * cols], rows, cols))
    }
}

impl HostStaging for CpuTensor {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn copy_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        self.data.copy_to_host(out)
    }

    fn copy_from_host(&mut self, values: &[f32]) -> Result<()> {
        self.data.copy_from_host(values)
    }
}

/// This machine's memory read bandwidth in bytes/s: the best of three
/// parallel passes over 1 GiB (far past every cache) held the way weights are.
pub fn measure_read_bandwidth() -> Result<f64> {
    let words = (1usize << 30) / 8;
    let bytes: Vec<u8> = (0..words as u64).flat_map(u64::to_le_bytes).collect();
    let host = HostTensor {
        dtype: DType::F32,
        shape: vec![bytes.len()],
        bytes,
    };
    let buffer = WeightBuffer::<u64>::from_le_bytes(&host.bytes).map_err(|e| alloc_error(&host, e))?;
    drop(host);
    let pass = || {
        let start = std::time::Instant::now();
        let sum = buffer
            .as_slice()
            .par_chunks(1 << 17)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        (words * 8) as f64 / start.elapsed().as_secs_f64()
    };
    Ok((0..3).map(|_| pass()).fold(0.0, f64::max))
}

fn alloc_error(host: &HostTensor, e: std::io::Error) -> BackendError {
    BackendError::OutOfMemory {
        what: format!("a {:?} weight ({e})", host.shape),
        bytes: host.bytes.len(),
    }
}

/// Rotates the q and k heads of each fused qkv row in place (neox layout)
/// by its token's position.
fn rope(qkv: &mut CpuTensor, positions: &[u32], table: &[f32], spec: &AttentionSpec) {
    let (hd, half) = (spec.head_dim, spec.head_dim / 2);
    let rotated_heads = spec.num_heads + spec.num_kv_heads;
    qkv.data.par_chunks_mut(qkv.cols).zip(positions).for_each(|(row, &pos)| {
        let cs = &table[pos as usize * hd..(pos as usize + 1) * hd];
        let (cos, sin) = cs.split_at(half);
        for head in row[..rotated_heads * hd].chunks_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    });
}

/// `gate_up [n, 2·i]` → `silu(gate) · up`, `[n, i]`.
fn silu_mul(gate_up: &CpuTensor) -> CpuTensor {
    let inter = gate_up.cols / 2;
    let mut out = vec![0.0f32; gate_up.rows * inter];
    out.par_chunks_mut(inter)
        .zip(gate_up.data.par_chunks(gate_up.cols))
        .for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(inter);
            for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
    CpuTensor::new(out, gate_up.rows, inter)
}

fn rms_norm_row(row: &mut [f32], w: &[f32], eps: f32) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(shape: Vec<usize>, values: &[f32], dtype: DType) -> CpuWeight {
        let mut host = HostTensor::from_f32(shape, values);
        if dtype == DType::BF16 {
            host.bytes = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
            host.dtype = DType::BF16;
        }
        CpuBackend::default().load_weight(host).unwrap()
    }

    #[test]
    fn linear_matches_naive_for_every_token_count() {
        let (out_f, in_f) = (37, 45);
        let w: Vec<f32> = (0..out_f * in_f).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
        let b: Vec<f32> = (0..out_f).map(|i| i as f32 * 0.01).collect();
        for dtype in [DType::F32, DType::BF16] {
            let wt = weight(vec![out_f, in_f], &w, dtype);
            let wide: Vec<f32> = match &wt.data {
                WeightData::Bf16(v) => v.as_slice().iter().map(|x| x.to_f32()).collect(),
                _ => w.clone(),
            };
            let bias = weight(vec![out_f], &b, DType::F32);
            for tokens in [1, 2, 5, 40] {
                let x: Vec<f32> = (0..tokens * in_f).map(|i| ((i * 31) % 53) as f32 / 53.0 - 0.3).collect();
                let y = CpuBackend::default()
                    .linear(&CpuTensor::new(x.clone(), tokens, in_f), &wt, Some(&bias))
                    .unwrap();
                for t in 0..tokens {
                    for o in 0..out_f {
                        let want: f32 = (0..in_f).map(|k| x[t * in_f + k] * wide[o * in_f + k]).sum::<f32>() + b[o];
                        assert!((y.row(t)[o] - want).abs() < 1e-4, "{dtype} tokens={tokens} t={t} o={o}");
                    }
                }
            }
        }
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let w = weight(vec![4], &[1.0, 2.0, 1.0, 1.0], DType::F32);
        let x = CpuTensor::new(vec![1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0], 2, 4);
        let y = CpuBackend::default().rms_norm(&x, &w, 0.0).unwrap();
        assert_eq!(y.data, vec![1.0, 2.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn final_norm_normalizes_the_rows_sampled_in_order() {
        let cpu = CpuBackend::default();
        let w = weight(vec![4], &[1.0, 2.0, 1.0, 1.0], DType::F32);
        let x = CpuTensor::new(vec![2.0, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0], 3, 4);
        let meta = crate::backend::PagedAttentionMeta::default();
        let inputs = StepInputs {
            token_ids: &[0; 3],
            positions: &[0, 1, 2],
            attn: &meta,
            logit_rows: &[2, 0],
            sampling: &[],
        };
        let step = cpu.prepare_step(inputs).unwrap();
        let y = cpu.final_norm(&x, &step, &w, 0.0).unwrap();
        assert_eq!((y.rows, y.data), (2, vec![1.0, 2.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]));
    }

    #[test]
    fn norms_before_the_mlp_and_adds_a_projection_into_the_residual() {
        let cpu = CpuBackend::default();
        let norm = weight(vec![2], &[1.0, 2.0], DType::F32);
        let x = CpuTensor::new(vec![3.0, 4.0], 1, 2);
        // gate = [1, 0], up = [0, 1]: silu(x̂₀) · x̂₁ for x̂ = x / rms(x) · [1, 2].
        let gate_up = weight(vec![2, 2], &[1.0, 0.0, 0.0, 1.0], DType::F32);
        let rms = (12.5f32).sqrt();
        let (g, u) = (3.0 / rms, 8.0 / rms);
        let norm = RmsNorm { weight: &norm, eps: 0.0 };
        let y = cpu.swiglu(&x, norm, &gate_up).unwrap();
        assert!((y.data[0] - g / (1.0 + (-g).exp()) * u).abs() < 1e-5, "{:?}", y.data);
        let mut residual = CpuTensor::new(vec![1.0, 1.0], 1, 2);
        let w = weight(vec![2, 2], &[1.0, 1.0, 0.0, 2.0], DType::F32);
        cpu.add_linear(&mut residual, &x, &w).unwrap();
        assert_eq!(residual.data, vec![8.0, 9.0]);
    }
}
