//! The wrappers of `kernels/linear.cu`: products of up to
//! [`MATVEC_MAX_TOKENS`] tokens with a weight matrix that read each weight
//! once: plain (or added into the output), or of the input's RMSNorm with
//! the SwiGLU in the epilogue (gate/up), or with RoPE and the KV-cache
//! write in it (qkv). Eight warps a block (the norm's sums need one per
//! token); the callers (`ops.rs`) check the shapes.

use super::launch::KernelArgs;
use super::ops::int;
use super::{grid, CudaBackend, CudaKvCache, CudaStep, CudaTensor, CudaWeight};
use crate::backend::{AttentionSpec, Result, RmsNorm};
use cudarc::driver::CudaSlice;

/// Batches up to this many tokens multiply through the mat-vec kernels
/// (`MAX_TOKENS` in `kernels/linear.cu`); larger ones through cuBLAS.
pub(super) const MATVEC_MAX_TOKENS: usize = 8;

impl CudaBackend {
    /// `out = x · wᵀ + bias`, or `out +=` that with `accumulate`: a warp per
    /// output feature, or per two from 3 tokens on, where a warp's
    /// activation loads from L1 would otherwise outpace its weight loads
    /// (`kernels/linear.cu`).
    pub(super) fn matvec(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        let rows_per_warp = if x.rows >= 3 { 2 } else { 1 };
        let (inner, outs, tokens, per_warp) = (int(x.cols), int(w.rows), int(x.rows), int(rows_per_warp));
        let name = w.data.kernel("matvec_bf16", "matvec_f32");
        let mut args = self.matvec_args(name, out, x, w, bias);
        let accumulate = i32::from(accumulate);
        args.arg(&inner).arg(&outs).arg(&tokens).arg(&per_warp).arg(&accumulate);
        self.launch(name, args, grid(w.rows.div_ceil(rows_per_warp).div_ceil(8), 256, 0))
    }

    /// `out = silu(x̂ · gateᵀ) · (x̂ · upᵀ)` for `x̂ = RMSNorm(x)` and
    /// `gate_up = [gate | up]`: a warp per gate/up pair of rows.
    pub(super) fn matvec_swiglu(
        &self,
        x: &CudaTensor,
        norm: RmsNorm<'_, CudaSlice<f32>>,
        gate_up: &CudaWeight,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let inter = gate_up.rows / 2;
        let (inner, inter_i, tokens) = (int(x.cols), int(inter), int(x.rows));
        let name = gate_up.data.kernel("matvec_swiglu_bf16", "matvec_swiglu_f32");
        let mut args = self.kernel_args(name);
        args.out(out.data_mut()).arg(&x.data);
        gate_up.data.push_arg(&mut args);
        args.arg(norm.weight).arg(&inner).arg(&inter_i).arg(&tokens).arg(&norm.eps);
        self.launch(name, args, grid(inter.div_ceil(8), 256, 0))
    }

    /// `out = RMSNorm(x) · wᵀ + bias`, its q and k heads turned by each
    /// token's position (`cos_sin`), its k and v heads written to the cache
    /// at the step's slots: a warp per pair of rows RoPE turns together.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matvec_qkv_rope(
        &self,
        x: &CudaTensor,
        norm: RmsNorm<'_, CudaSlice<f32>>,
        w: &CudaWeight,
        bias: Option<&CudaSlice<f32>>,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        cos_sin: &CudaSlice<f32>,
        spec: &AttentionSpec,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (positions, slots) = (step.positions(), step.slots());
        let (inner, tokens) = (int(x.cols), int(x.rows));
        let (heads, kv_heads, head_dim) = (int(spec.num_heads), int(spec.num_kv_heads), int(spec.head_dim));
        let name = w.data.kernel("matvec_qkv_rope_bf16", "matvec_qkv_rope_f32");
        let mut args = self.matvec_args(name, out, x, w, bias);
        args.arg(norm.weight).out(&mut cache.k).out(&mut cache.v);
        args.arg(&positions).arg(&slots).arg(cos_sin);
        args.arg(&inner)
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&head_dim)
            .arg(&tokens)
            .arg(&norm.eps);
        self.launch(name, args, grid((w.rows / 2).div_ceil(8), 256, 0))
    }

    /// A mat-vec kernel's launch with its first arguments: the output, the
    /// activations, the weight and the bias (or null).
    fn matvec_args<'a>(
        &'a self,
        name: &'static str,
        out: &'a mut CudaTensor,
        x: &'a CudaTensor,
        w: &'a CudaWeight,
        bias: Option<&'a CudaSlice<f32>>,
    ) -> KernelArgs<'a> {
        let mut args = self.kernel_args(name);
        args.out(out.data_mut()).arg(&x.data);
        w.data.push_arg(&mut args);
        args.arg_or_null(bias);
        args
    }
}
