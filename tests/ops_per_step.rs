//! How many device ops a decode step issues: on the CUDA backend each op
//! below is one kernel launch for batches of up to 8 tokens, so this counts
//! a step's launches without a GPU (what CUDA graphs would collapse, and
//! what each fusion saves). Counted through the CPU backend wrapped in a
//! counter, on a fixture model.

mod common;

use shardline::backend::cpu::CpuBackend;
use shardline::backend::{AttentionSpec, Backend, HostTensor, KvCacheShape, Result, RmsNorm, StepCapacity, StepInputs};
use shardline::config::ModelConfig;
use shardline::generation::Generator;
use shardline::loader::SafetensorsCheckpoint;
use shardline::model::Qwen2ForCausalLM;
use shardline::sampling::RowSampling;
use std::convert::Infallible;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The CPU backend, counting the ops that launch a kernel on a GPU.
#[derive(Clone, Default)]
struct Counting {
    ops: Arc<AtomicUsize>,
    cpu: CpuBackend,
}

impl Counting {
    fn op(&self) -> &CpuBackend {
        self.ops.fetch_add(1, Ordering::Relaxed);
        &self.cpu
    }
}

type T = <CpuBackend as Backend>::Tensor;
type W = <CpuBackend as Backend>::Weight;
type K = <CpuBackend as Backend>::KvCache;
type S<'a> = <CpuBackend as Backend>::Step<'a>;

impl Backend for Counting {
    type Tensor = T;
    type Weight = W;
    type KvCache = K;
    type Step<'a> = S<'a>;
    type Graph = Infallible;
    type Fetch = Vec<u32>;

    fn name(&self) -> &'static str {
        "counting"
    }
    fn load_weight(&self, host: HostTensor) -> Result<W> {
        self.cpu.load_weight(host)
    }
    fn weight_bytes(&self, w: &W) -> usize {
        self.cpu.weight_bytes(w)
    }
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<K> {
        self.cpu.alloc_kv_cache(shape)
    }
    fn embedding(&self, table: &W, step: &S<'_>, vocab: Range<u32>) -> Result<T> {
        self.op().embedding(table, step, vocab)
    }
    fn linear(&self, x: &T, w: &W, bias: Option<&W>) -> Result<T> {
        self.op().linear(x, w, bias)
    }
    fn rms_norm(&self, x: &T, weight: &W, eps: f32) -> Result<T> {
        self.op().rms_norm(x, weight, eps)
    }
    fn add_linear(&self, residual: &mut T, x: &T, w: &W) -> Result<()> {
        self.op().add_linear(residual, x, w)
    }
    fn add_assign(&self, x: &mut T, y: &T) -> Result<()> {
        self.op().add_assign(x, y)
    }
    fn prepare_step<'a>(&self, inputs: StepInputs<'a>) -> Result<S<'a>> {
        self.cpu.prepare_step(inputs)
    }
    fn rope_write_kv(&self, qkv: &mut T, cache: &mut K, step: &S<'_>, cos_sin: &W, spec: &AttentionSpec) -> Result<()> {
        self.op().rope_write_kv(qkv, cache, step, cos_sin, spec)
    }
    #[allow(clippy::too_many_arguments)]
    fn project_qkv(
        &self,
        x: &T,
        norm: RmsNorm<'_, W>,
        w: &W,
        bias: Option<&W>,
        cache: &mut K,
        step: &S<'_>,
        cos_sin: &W,
        spec: &AttentionSpec,
    ) -> Result<T> {
        self.op().project_qkv(x, norm, w, bias, cache, step, cos_sin, spec)
    }
    fn paged_attention(&self, qkv: &T, cache: &K, step: &S<'_>, spec: &AttentionSpec) -> Result<T> {
        self.op().paged_attention(qkv, cache, step, spec)
    }
    fn swiglu(&self, x: &T, norm: RmsNorm<'_, W>, gate_up: &W) -> Result<T> {
        self.op().swiglu(x, norm, gate_up)
    }
    fn final_norm(&self, x: &T, step: &S<'_>, weight: &W, eps: f32) -> Result<T> {
        self.op().final_norm(x, step, weight, eps)
    }
    fn lay_out_vocab(&self, all: &T, ranks: usize, per: usize, vocab: usize) -> Result<T> {
        self.op().lay_out_vocab(all, ranks, per, vocab)
    }
    fn sample(&self, logits: &mut T, step: &mut S<'_>) -> Result<()> {
        self.op().sample(logits, step)
    }
    fn fetch_sampled(&self, step: &S<'_>) -> Result<Vec<u32>> {
        self.cpu.fetch_sampled(step)
    }
    fn fetched(&self, fetch: Vec<u32>, n: usize) -> Result<Vec<u32>> {
        self.cpu.fetched(fetch, n)
    }
    fn static_step(&self, capacity: StepCapacity) -> Result<Option<S<'static>>> {
        self.cpu.static_step(capacity)
    }
    fn update_step(&self, step: &mut S<'static>, inputs: StepInputs<'_>) -> Result<()> {
        self.cpu.update_step(step, inputs)
    }
    fn capture(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<Infallible> {
        self.cpu.capture(record)
    }
    fn replay(&self, graph: &Infallible) -> Result<()> {
        match *graph {}
    }
    fn to_host(&self, x: &T, out: &mut Vec<f32>) -> Result<()> {
        self.cpu.to_host(x, out)
    }
    fn zeros(&self, rows: usize, cols: usize) -> Result<T> {
        self.cpu.zeros(rows, cols)
    }
}

#[test]
fn a_decode_step_issues_five_ops_a_layer_and_four_more() {
    let dir = common::model_dir("tiny-gqa");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let layers = config.num_hidden_layers;
    let backend = Counting::default();
    let ops = backend.ops.clone();
    let model = Qwen2ForCausalLM::load(backend, config, &SafetensorsCheckpoint::open(&dir).unwrap()).unwrap();
    let mut generator = Generator::new(model, 64).unwrap();
    let token = generator
        .extend_sampled(&[1, 2, 3], RowSampling::greedy(), false)
        .unwrap()
        .token_ids[0];
    let before = ops.load(Ordering::Relaxed);
    generator.extend_sampled(&[token], RowSampling::greedy(), false).unwrap();
    // Per layer: qkv of the input norm with RoPE and the KV write,
    // attention, o_proj added into the residual stream, gate/up of the
    // post-attention norm with SwiGLU, down_proj added into the stream.
    // Then the embedding, the final norm of the rows sampled, the LM head
    // and sampling.
    assert_eq!(ops.load(Ordering::Relaxed) - before, 5 * layers + 4);
}
