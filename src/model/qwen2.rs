//! The Qwen2 decoder, layer by layer as in Hugging Face's `modeling_qwen2.py`:
//! RMSNorm → attention (GQA, q/k/v bias, neox RoPE, paged KV cache) →
//! residual → RMSNorm → SwiGLU MLP → residual. Struct fields mirror the
//! checkpoint keys (`self_attn.q_proj` …); q/k/v and gate/up are fused into
//! one matrix each at load so a step makes fewer, larger matmuls. Each
//! sublayer's norm is part of its first op and its residual add part of
//! its last, so a backend may run each sublayer in as few passes as it can.

use super::Shard;
use crate::backend::{AttentionSpec, Backend, HostTensor, Result, RmsNorm};
use crate::config::ModelConfig;
use crate::loader::{LoadError, WeightSource};
use crate::parallel::Communicator;
use std::ops::Range;

/// What every layer's forward needs besides its input.
pub struct ForwardCtx<'a, 's, B: Backend> {
    pub backend: &'a B,
    pub step: &'a B::Step<'s>,
    /// `[max_positions, head_dim]`: cos then sin of each position's rotary angles.
    pub rope_cos_sin: &'a B::Weight,
    pub rms_norm_eps: f32,
    /// The tensor-parallel group, when the layers are split across ranks.
    pub tp: Option<&'a dyn Communicator<B::Tensor>>,
}

impl<B: Backend> ForwardCtx<'_, '_, B> {
    /// Sums a row-parallel layer's partial outputs over the TP ranks.
    pub fn all_reduce(&self, x: &mut B::Tensor) -> Result<()> {
        match self.tp {
            Some(comm) => comm.all_reduce_sum(x),
            None => Ok(()),
        }
    }

    /// `hidden += x · wᵀ` for a row-parallel weight `w`, in one op on one
    /// rank. Split, the first rank adds its partial product into the
    /// stream and the others put theirs in its place, so the all-reduce
    /// that sums the partials sums the new stream (no add of its own).
    fn add_row_parallel(&self, hidden: &mut B::Tensor, x: &B::Tensor, w: &B::Weight) -> Result<()> {
        let b = self.backend;
        match self.tp {
            None => b.add_linear(hidden, x, w),
            Some(comm) => {
                if comm.rank() == 0 {
                    b.add_linear(hidden, x, w)?;
                } else {
                    *hidden = b.linear(x, w, None)?;
                }
                comm.all_reduce_sum(hidden)
            }
        }
    }

    fn norm<'w>(&self, weight: &'w B::Weight) -> RmsNorm<'w, B::Weight> {
        RmsNorm {
            weight,
            eps: self.rms_norm_eps,
        }
    }
}

/// Which dimension of a weight a tensor-parallel rank keeps.
#[derive(Clone, Copy)]
enum Split {
    /// Output rows: a column-parallel weight (q/k/v, gate/up).
    Rows,
    /// Input columns: a row-parallel weight (o_proj, down_proj), all-reduced after.
    Cols,
}

/// This rank's `range × unit` rows or columns of tensor `name`, read alone;
/// the whole tensor when unsplit.
fn split_of(
    source: &dyn WeightSource,
    shard: &Shard,
    name: &str,
    shape: &[usize],
    split: Split,
    range: Range<usize>,
    unit: usize,
) -> std::result::Result<HostTensor, LoadError> {
    if shard.tp == 1 {
        return source.tensor(name, shape);
    }
    let mine = range.start * unit..range.end * unit;
    match split {
        Split::Rows => source.tensor_slice(name, shape, mine, None),
        Split::Cols => source.tensor_slice(name, shape, 0..shape[0], Some(mine)),
    }
}

pub struct Qwen2Attention<B: Backend> {
    /// `[(heads + 2·kv_heads)·head_dim, hidden]`: q_proj, k_proj, v_proj stacked.
    qkv_proj: B::Weight,
    qkv_bias: B::Weight,
    /// `[hidden, heads·head_dim]`
    o_proj: B::Weight,
    pub spec: AttentionSpec,
}

impl<B: Backend> Qwen2Attention<B> {
    fn load(
        backend: &B,
        config: &ModelConfig,
        source: &dyn WeightSource,
        prefix: &str,
        shard: &Shard,
    ) -> std::result::Result<Self, LoadError> {
        let (h, hd) = (config.hidden_size, config.head_dim());
        let (q, kv) = (config.num_attention_heads * hd, config.num_kv_heads() * hd);
        let (heads, kv_heads) = (shard.heads(config), shard.kv_heads(config));
        let name = |n: &str| format!("{prefix}.{n}");
        let q_rows = |n: &str, shape: &[usize]| split_of(source, shard, &name(n), shape, Split::Rows, heads.clone(), hd);
        let kv_rows = |n: &str, shape: &[usize]| split_of(source, shard, &name(n), shape, Split::Rows, kv_heads.clone(), hd);
        let qkv = HostTensor::concat_rows(&[
            q_rows("q_proj.weight", &[q, h])?,
            kv_rows("k_proj.weight", &[kv, h])?,
            kv_rows("v_proj.weight", &[kv, h])?,
        ]);
        let qkv_bias = HostTensor::concat_rows(&[
            q_rows("q_proj.bias", &[q])?,
            kv_rows("k_proj.bias", &[kv])?,
            kv_rows("v_proj.bias", &[kv])?,
        ]);
        let o_proj = split_of(source, shard, &name("o_proj.weight"), &[h, q], Split::Cols, heads.clone(), hd)?;
        Ok(Qwen2Attention {
            qkv_proj: backend.load_weight(qkv)?,
            qkv_bias: backend.load_weight(qkv_bias)?,
            o_proj: backend.load_weight(o_proj)?,
            spec: AttentionSpec {
                num_heads: heads.len(),
                num_kv_heads: kv_heads.len(),
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            },
        })
    }

    /// `hidden += attention(norm(hidden))`.
    fn forward(
        &self,
        hidden: &mut B::Tensor,
        norm: RmsNorm<'_, B::Weight>,
        cache: &mut B::KvCache,
        ctx: &ForwardCtx<'_, '_, B>,
    ) -> Result<()> {
        let b = ctx.backend;
        let qkv = b.project_qkv(
            hidden,
            norm,
            &self.qkv_proj,
            Some(&self.qkv_bias),
            cache,
            ctx.step,
            ctx.rope_cos_sin,
            &self.spec,
        )?;
        let attn = b.paged_attention(&qkv, cache, ctx.step, &self.spec)?;
        ctx.add_row_parallel(hidden, &attn, &self.o_proj)
    }
}

pub struct Qwen2Mlp<B: Backend> {
    /// `[2·intermediate, hidden]`: gate_proj then up_proj.
    gate_up_proj: B::Weight,
    /// `[hidden, intermediate]`
    down_proj: B::Weight,
}

impl<B: Backend> Qwen2Mlp<B> {
    fn load(
        backend: &B,
        config: &ModelConfig,
        source: &dyn WeightSource,
        prefix: &str,
        shard: &Shard,
    ) -> std::result::Result<Self, LoadError> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let name = |n: &str| format!("{prefix}.{n}");
        let mine = shard.intermediate(config);
        let gate_up = HostTensor::concat_rows(&[
            split_of(source, shard, &name("gate_proj.weight"), &[i, h], Split::Rows, mine.clone(), 1)?,
            split_of(source, shard, &name("up_proj.weight"), &[i, h], Split::Rows, mine.clone(), 1)?,
        ]);
        Ok(Qwen2Mlp {
            gate_up_proj: backend.load_weight(gate_up)?,
            down_proj: backend.load_weight(split_of(source, shard, &name("down_proj.weight"), &[h, i], Split::Cols, mine, 1)?)?,
        })
    }

    /// `hidden += mlp(norm(hidden))`.
    fn forward(&self, hidden: &mut B::Tensor, norm: RmsNorm<'_, B::Weight>, ctx: &ForwardCtx<'_, '_, B>) -> Result<()> {
        let activations = ctx.backend.swiglu(hidden, norm, &self.gate_up_proj)?;
        ctx.add_row_parallel(hidden, &activations, &self.down_proj)
    }
}

pub struct Qwen2DecoderLayer<B: Backend> {
    self_attn: Qwen2Attention<B>,
    mlp: Qwen2Mlp<B>,
    input_layernorm: B::Weight,
    post_attention_layernorm: B::Weight,
}

impl<B: Backend> Qwen2DecoderLayer<B> {
    pub fn load(
        backend: &B,
        config: &ModelConfig,
        source: &dyn WeightSource,
        index: usize,
        shard: &Shard,
    ) -> std::result::Result<Self, LoadError> {
        let prefix = format!("model.layers.{index}");
        let norm = |name: &str| source.tensor(&format!("{prefix}.{name}.weight"), &[config.hidden_size]);
        Ok(Qwen2DecoderLayer {
            self_attn: Qwen2Attention::load(backend, config, source, &format!("{prefix}.self_attn"), shard)?,
            mlp: Qwen2Mlp::load(backend, config, source, &format!("{prefix}.mlp"), shard)?,
            input_layernorm: backend.load_weight(norm("input_layernorm")?)?,
            post_attention_layernorm: backend.load_weight(norm("post_attention_layernorm")?)?,
        })
    }

    /// Bytes of every parameter of the layer (all are read once per step).
    pub fn weight_bytes(&self, b: &B) -> usize {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.qkv_proj,
            &a.qkv_bias,
            &a.o_proj,
            &m.gate_up_proj,
            &m.down_proj,
            &self.input_layernorm,
            &self.post_attention_layernorm,
        ]
        .into_iter()
        .map(|w| b.weight_bytes(w))
        .sum()
    }

    /// Runs the layer on the residual stream `hidden [n, hidden_size]`, in place.
    pub fn forward(&self, hidden: &mut B::Tensor, cache: &mut B::KvCache, ctx: &ForwardCtx<'_, '_, B>) -> Result<()> {
        self.self_attn.forward(hidden, ctx.norm(&self.input_layernorm), cache, ctx)?;
        self.mlp.forward(hidden, ctx.norm(&self.post_attention_layernorm), ctx)
    }
}

/// `[max_positions, head_dim]`: per position, `cos(p·θᵢ)` for the head_dim/2
/// frequencies, then `sin(p·θᵢ)`; `θᵢ = rope_theta^(−2i/head_dim)`.
pub fn rope_cos_sin_table(config: &ModelConfig) -> HostTensor {
    let (hd, theta) = (config.head_dim(), config.rope_theta());
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64)).collect();
    let mut values = Vec::with_capacity(config.max_position_embeddings * hd);
    for pos in 0..config.max_position_embeddings {
        values.extend(inv_freq.iter().map(|f| (pos as f64 * f).cos() as f32));
        values.extend(inv_freq.iter().map(|f| (pos as f64 * f).sin() as f32));
    }
    HostTensor::from_f32(vec![config.max_position_embeddings, hd], &values)
}
