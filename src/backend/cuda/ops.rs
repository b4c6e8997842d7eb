//! The [`Backend`] ops as kernel launches and cuBLAS calls on the
//! backend's stream. Shapes are checked on the host before each launch.

use super::gemm::Operands;
use super::{
    alloc_error, driver_error, elementwise, grid, CudaBackend, CudaGraph, CudaKvCache, CudaStep, CudaTensor, CudaWeight, SampledFetch,
    WeightData, KV_CACHE_BYTES,
};
use crate::backend::{AttentionSpec, Backend, BackendError, HostTensor, KvCacheShape, Result, RmsNorm, StepCapacity, StepInputs};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::ops::Range;

/// Threads per block of the row kernels (norms, embedding, RoPE, KV writes, attention).
const ROW_THREADS: u32 = 256;

pub(super) fn check(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    match ok {
        true => Ok(()),
        false => Err(BackendError::Device(message())),
    }
}

pub(super) fn int(v: usize) -> i32 {
    v as i32
}

/// A norm as the kernels take it: its weight's f32 values on the device.
fn on_device(norm: RmsNorm<'_, CudaWeight>) -> Result<RmsNorm<'_, CudaSlice<f32>>> {
    Ok(RmsNorm {
        weight: norm.weight.f32("an RMSNorm weight")?,
        eps: norm.eps,
    })
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Step<'a> = CudaStep;
    type Graph = CudaGraph;
    type Fetch = SampledFetch;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weight(&self, host: HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = host.matrix_dims();
        Ok(CudaWeight {
            data: self.upload_weight(&host)?,
            rows,
            cols,
        })
    }

    fn weight_bytes(&self, w: &CudaWeight) -> usize {
        let elem = match w.data {
            WeightData::Bf16(_) => 2,
            WeightData::F32(_) => 4,
        };
        w.rows * w.cols * elem
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache> {
        let n = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        let zeros = || {
            self.stream
                .alloc_zeros::<bf16>(n)
                .map_err(alloc_error("the KV cache", n * KV_CACHE_BYTES))
        };
        Ok(CudaKvCache { k: zeros()?, v: zeros()? })
    }

    fn embedding(&self, table: &CudaWeight, step: &CudaStep, vocab: Range<u32>) -> Result<CudaTensor> {
        check((step.max_token() as usize) < table.rows, || {
            format!("embedding: a token id is outside the table's {} rows", table.rows)
        })?;
        let mut out = self.tensor(step.tokens(), table.cols, "embeddings")?;
        let ids = step.token_ids();
        let (hidden, rows) = (int(table.cols), int(table.rows));
        let config = grid(out.rows, ROW_THREADS, 0);
        let name = table.data.kernel("embedding_bf16", "embedding_f32");
        let mut args = self.kernel_args(name);
        args.out(out.data_mut());
        table.data.push_arg(&mut args);
        let (first, end) = (vocab.start, vocab.end);
        args.arg(&ids).arg(&self.previous).arg(&self.coming);
        args.arg(&first).arg(&end).arg(&rows).arg(&hidden);
        self.launch(name, args, config)?;
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) -> Result<CudaTensor> {
        check(x.cols == w.cols, || {
            format!("linear: input [{}, {}] against weight [{}, {}]", x.rows, x.cols, w.rows, w.cols)
        })?;
        let bias = bias.map(|b| b.f32("a bias")).transpose()?;
        if let Some(b) = bias {
            check(b.len() == w.rows, || format!("linear: bias of {} for {} outputs", b.len(), w.rows))?;
        }
        let mut out = self.tensor(x.rows, w.rows, "a linear output")?;
        self.product(x, w, bias, &mut out, false)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let norm = on_device(RmsNorm { weight, eps })?;
        check(norm.weight.len() == x.cols, || {
            format!("rms_norm: weight of {} for rows of {}", norm.weight.len(), x.cols)
        })?;
        let mut out = self.tensor(x.rows, x.cols, "normalized activations")?;
        self.normalize("rms_norm_f32", out.data_mut(), x, norm)?;
        Ok(out)
    }

    fn add_linear(&self, residual: &mut CudaTensor, x: &CudaTensor, w: &CudaWeight) -> Result<()> {
        check(x.cols == w.cols && (residual.rows, residual.cols) == (x.rows, w.rows), || {
            format!(
                "add_linear: input [{}, {}] against weight [{}, {}] into [{}, {}]",
                x.rows, x.cols, w.rows, w.cols, residual.rows, residual.cols
            )
        })?;
        self.product(x, w, None, residual, true)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        check((x.rows, x.cols) == (y.rows, y.cols), || "add_assign: shapes differ".into())?;
        let n = x.rows * x.cols;
        let mut args = self.kernel_args("add_f32");
        args.out(x.data_mut()).arg(&y.data).arg(&n);
        self.launch("add_f32", args, elementwise(n))
    }

    fn prepare_step<'a>(&self, inputs: StepInputs<'a>) -> Result<CudaStep> {
        self.prepare(inputs)
    }

    fn rope_write_kv(
        &self,
        qkv: &mut CudaTensor,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        cos_sin: &CudaWeight,
        spec: &AttentionSpec,
    ) -> Result<()> {
        let table = cos_sin.f32("the RoPE table")?;
        check(qkv.rows == step.tokens() && cos_sin.cols == spec.head_dim, || {
            "rope_write_kv: shapes differ from the step".into()
        })?;
        self.rope_write(qkv, None, cache, step, table, spec)
    }

    fn project_qkv(
        &self,
        x: &CudaTensor,
        norm: RmsNorm<'_, CudaWeight>,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        cos_sin: &CudaWeight,
        spec: &AttentionSpec,
    ) -> Result<CudaTensor> {
        let (heads, kv_heads, head_dim) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let table = cos_sin.f32("the RoPE table")?;
        let bias = bias.map(|b| b.f32("a bias")).transpose()?;
        let norm = on_device(norm)?;
        check(
            x.cols == w.cols
                && norm.weight.len() == x.cols
                && w.rows == (heads + 2 * kv_heads) * head_dim
                && head_dim % 2 == 0
                && x.rows == step.tokens()
                && cos_sin.cols == head_dim
                && bias.is_none_or(|b| b.len() == w.rows),
            || {
                format!(
                    "project_qkv: input [{}, {}] (norm weight {}) against weight [{}, {}] for {} tokens of {heads} heads, {kv_heads} KV heads of {head_dim}",
                    x.rows,
                    x.cols,
                    norm.weight.len(),
                    w.rows,
                    w.cols,
                    step.tokens()
                )
            },
        )?;
        let mut out = self.tensor(x.rows, w.rows, "qkv")?;
        if self.through_matvec(x.rows) {
            self.matvec_qkv_rope(x, norm, w, bias, cache, step, table, spec, &mut out)?;
        } else {
            self.normed_gemm(x, norm, w, &mut out)?;
            self.rope_write(&mut out, bias, cache, step, table, spec)?;
        }
        Ok(out)
    }

    fn paged_attention(&self, qkv: &CudaTensor, cache: &CudaKvCache, step: &CudaStep, spec: &AttentionSpec) -> Result<CudaTensor> {
        self.attention(qkv, cache, step, spec)
    }

    fn swiglu(&self, x: &CudaTensor, norm: RmsNorm<'_, CudaWeight>, gate_up: &CudaWeight) -> Result<CudaTensor> {
        let norm = on_device(norm)?;
        check(
            x.cols == gate_up.cols && gate_up.rows % 2 == 0 && norm.weight.len() == x.cols,
            || {
                format!(
                    "swiglu: input [{}, {}] (norm weight {}) against gate_up [{}, {}]",
                    x.rows,
                    x.cols,
                    norm.weight.len(),
                    gate_up.rows,
                    gate_up.cols
                )
            },
        )?;
        let inter = gate_up.rows / 2;
        let mut out = self.tensor(x.rows, inter, "SwiGLU output")?;
        if self.through_matvec(x.rows) {
            self.matvec_swiglu(x, norm, gate_up, &mut out)?;
            return Ok(out);
        }
        let mut products = self.tensor(x.rows, gate_up.rows, "gate and up products")?;
        self.normed_gemm(x, norm, gate_up, &mut products)?;
        // With bf16 weights the down projection multiplies the activations
        // in bf16: they are rounded here, so it casts nothing.
        let mut rounded = match gate_up.data {
            WeightData::Bf16(_) => Some(self.scratch::<bf16>(x.rows * inter, "bf16 SwiGLU output")?),
            WeightData::F32(_) => None,
        };
        let (inter_i, rows) = (int(inter), int(x.rows));
        let mut args = self.kernel_args("silu_mul_f32");
        args.out(out.data_mut()).out_or_null(rounded.as_mut());
        args.arg(&products.data).arg(&inter_i).arg(&rows);
        self.launch("silu_mul_f32", args, elementwise(x.rows * inter))?;
        out.rounded = rounded;
        Ok(out)
    }

    fn final_norm(&self, x: &CudaTensor, step: &CudaStep, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let w = weight.f32("an RMSNorm weight")?;
        check(x.rows == step.tokens() && w.len() == x.cols, || {
            format!(
                "final_norm: [{}, {}] for a step of {} tokens, with a weight of {}",
                x.rows,
                x.cols,
                step.tokens(),
                w.len()
            )
        })?;
        let mut out = self.tensor(step.rows(), x.cols, "output rows")?;
        let (rows_dev, cols) = (step.logit_rows(), int(x.cols));
        let mut args = self.kernel_args("rms_norm_rows_f32");
        args.out(out.data_mut()).arg(&x.data).arg(&rows_dev).arg(w).arg(&cols).arg(&eps);
        self.launch("rms_norm_rows_f32", args, grid(step.rows(), ROW_THREADS, 0))?;
        Ok(out)
    }

    fn lay_out_vocab(&self, all: &CudaTensor, ranks: usize, per: usize, vocab: usize) -> Result<CudaTensor> {
        let rows = all.rows / ranks.max(1);
        check(all.rows == rows * ranks && all.cols == per + 1 && vocab <= ranks * per, || {
            format!(
                "lay_out_vocab: [{}, {}] from {ranks} ranks of {per} for {vocab}",
                all.rows, all.cols
            )
        })?;
        let mut out = self.tensor(rows, vocab, "laid-out logits")?;
        let (rows_i, per_i, vocab_i, n) = (int(rows), int(per), int(vocab), rows * vocab);
        let mut args = self.kernel_args("lay_out_vocab_f32");
        args.out(out.data_mut())
            .arg(&all.data)
            .arg(&rows_i)
            .arg(&per_i)
            .arg(&vocab_i)
            .arg(&n);
        self.launch("lay_out_vocab_f32", args, elementwise(n))?;
        Ok(out)
    }

    fn sample(&self, logits: &mut CudaTensor, step: &mut CudaStep) -> Result<()> {
        self.sample_rows(logits, step)
    }

    fn fetch_sampled(&self, step: &CudaStep) -> Result<SampledFetch> {
        self.start_fetch(step)
    }

    fn fetched(&self, fetch: SampledFetch, n: usize) -> Result<Vec<u32>> {
        self.finish_fetch(fetch, n)
    }

    fn static_step(&self, capacity: StepCapacity) -> Result<Option<CudaStep>> {
        self.static_step_of(capacity).map(Some)
    }

    fn update_step(&self, step: &mut CudaStep, inputs: StepInputs<'_>) -> Result<()> {
        self.refill(step, inputs)
    }

    fn capture(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        self.capture_graph(record)
    }

    fn replay(&self, graph: &CudaGraph) -> Result<()> {
        self.replay_graph(graph)
    }

    fn to_host(&self, x: &CudaTensor, out: &mut Vec<f32>) -> Result<()> {
        crate::backend::HostStaging::copy_to_host(x, out)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let mut zeros = self.tensor(rows, cols, "a zero tensor")?;
        self.stream
            .memset_zeros(&mut **zeros.data_mut())
            .map_err(driver_error("zeroing a tensor"))?;
        Ok(zeros)
    }
}

impl CudaBackend {
    /// RMSNorm of `x`'s rows into `out`, in f32 or bf16 as the kernel
    /// `name` writes (`kernels/rms_norm.cu`). Shapes are the caller's to check.
    fn normalize<T>(&self, name: &'static str, out: &mut CudaSlice<T>, x: &CudaTensor, norm: RmsNorm<'_, CudaSlice<f32>>) -> Result<()> {
        let cols = int(x.cols);
        let mut args = self.kernel_args(name);
        args.out(out).arg(&x.data).arg(norm.weight).arg(&cols).arg(&norm.eps);
        self.launch(name, args, grid(x.rows, ROW_THREADS, 0))
    }

    /// `out = RMSNorm(x) · wᵀ` through cuBLAS. For bf16 weights the norm's
    /// kernel writes the GEMM's bf16 operand itself, so no cast follows it.
    fn normed_gemm(&self, x: &CudaTensor, norm: RmsNorm<'_, CudaSlice<f32>>, w: &CudaWeight, out: &mut CudaTensor) -> Result<()> {
        let WeightData::Bf16(weights) = &w.data else {
            let mut normed = self.tensor(x.rows, x.cols, "normalized activations")?;
            self.normalize("rms_norm_f32", normed.data_mut(), x, norm)?;
            return self.product(&normed, w, None, out, false);
        };
        let mut rounded = self.scratch::<bf16>(x.rows * x.cols, "normalized bf16 activations")?;
        self.normalize("rms_norm_bf16", &mut rounded, x, norm)?;
        let operands = Operands::Bf16 { w: weights, x: &rounded };
        self.blas.matmul(operands, out.data_mut(), x.rows, x.cols, w.rows, false)
    }

    /// [`Backend::rope_write_kv`], adding the projection's `bias` first.
    fn rope_write(
        &self,
        qkv: &mut CudaTensor,
        bias: Option<&CudaSlice<f32>>,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        cos_sin: &CudaSlice<f32>,
        spec: &AttentionSpec,
    ) -> Result<()> {
        let (positions, slots) = (step.positions(), step.slots());
        let (heads, kv_heads, head_dim) = (int(spec.num_heads), int(spec.num_kv_heads), int(spec.head_dim));
        let rows = qkv.rows;
        let mut args = self.kernel_args("rope_write_kv_bf16");
        args.out(qkv.data_mut()).arg_or_null(bias);
        args.out(&mut cache.k)
            .out(&mut cache.v)
            .arg(&positions)
            .arg(&slots)
            .arg(cos_sin)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&head_dim);
        self.launch("rope_write_kv_bf16", args, grid(rows, ROW_THREADS, 0))
    }

    /// `out = x · wᵀ + bias`, or `out +=` that with `accumulate`: through
    /// the mat-vec kernels where [`CudaBackend::through_matvec`], else cuBLAS
    /// (bf16 weights take the activations rounded to bf16: `x`'s own
    /// rounded copy where it has one, else a cast). Shapes are the caller's
    /// to check.
    fn product(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaSlice<f32>>, out: &mut CudaTensor, accumulate: bool) -> Result<()> {
        if self.through_matvec(x.rows) {
            return self.matvec(x, w, bias, out, accumulate);
        }
        match &w.data {
            WeightData::Bf16(weights) => {
                let cast;
                let rounded = match &x.rounded {
                    Some(rounded) => rounded,
                    None => {
                        let n = x.rows * x.cols;
                        let mut values = self.scratch::<bf16>(n, "bf16 activations")?;
                        let mut args = self.kernel_args("cast_f32_bf16");
                        args.out(&mut values).arg(&x.data).arg(&n);
                        self.launch("cast_f32_bf16", args, elementwise(n))?;
                        cast = values;
                        &cast
                    }
                };
                let operands = Operands::Bf16 { w: weights, x: rounded };
                self.blas.matmul(operands, out.data_mut(), x.rows, x.cols, w.rows, accumulate)?;
            }
            WeightData::F32(weights) => {
                let operands = Operands::F32 { w: weights, x: &x.data };
                self.blas.matmul(operands, out.data_mut(), x.rows, x.cols, w.rows, accumulate)?;
            }
        }
        if let Some(b) = bias {
            let (n, cols) = (out.rows * out.cols, int(out.cols));
            let mut args = self.kernel_args("add_bias_f32");
            args.out(out.data_mut()).arg(b).arg(&cols).arg(&n);
            self.launch("add_bias_f32", args, elementwise(n))?;
        }
        Ok(())
    }
}
