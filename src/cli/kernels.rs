//! `shardline bench --kernels`: the two kernels decode streams memory
//! through, timed alone on the GPU at a model's shapes (back to back in a
//! graph, as decode runs them) and put against the device's copy
//! bandwidth: the batch-1 mat-vec of each weight matrix of a layer and of
//! the LM head, the MLP's through the mat-vec and cuBLAS both, down_proj's
//! for 1 to 8 tokens and at 9 through cuBLAS, gate/up's for 1 and 8 (bytes:
//! the weights); and decode attention over `--context` cached tokens at batch 1
//! and 64, and over 256 and 1,024 at batch 1 (bytes: the keys and values);
//! and the sampling kernel on 1 and 64 rows of the vocabulary, greedy,
//! drawn at temperature 1, with top-p alone and with Qwen2.5's cuts (bytes:
//! the logits, once).
//! Also the attention of a `--context`-token prompt's prefill, which
//! computes more than it reads: its multiply-adds a second.

use anyhow::Context;
use serde_json::json;
use shardline::backend::cuda::{self, CudaBackend, CudaStep};
use shardline::backend::{AttentionSpec, Backend, DType, HostStaging, HostTensor, KvCacheShape, PagedAttentionMeta, RmsNorm, StepInputs};
use shardline::config::ModelConfig;
use shardline::generation::BLOCK_SIZE;
use shardline::rng::Rng;
use shardline::sampling::{LogitAdjustment, RowSampling};
use std::time::Instant;

/// Calls of each kernel per timing, after as many untimed.
const CALLS: usize = 20;

/// Replays of a graph of `CALLS` calls per timing, queued back to back.
const REPLAYS: usize = 10;

/// One timed kernel: what it streams, the arithmetic it does (floating-point
/// operations, a multiply-add two), and how long a call takes: recorded
/// into a graph as decode runs it (`graphed`, unless recording it failed),
/// and launched one by one from the host.
struct Timing {
    what: String,
    bytes: usize,
    flops: f64,
    seconds: f64,
    graphed: bool,
    launched_seconds: f64,
}

/// Times `op`: `CALLS` back-to-back launches (queued, then waited for once;
/// what each call returns is dropped as it comes), then `REPLAYS` replays
/// of a graph recorded from `CALLS` calls. A kernel of a few µs (a layer's
/// decode attention, a small mat-vec) takes about as long as its launch
/// costs the host, so only the graph's figure is the kernel's own, and it
/// is the one put against the bandwidth. A kernel that cannot be recorded
/// is reported as launched, saying so, and the other rows still come.
fn time<T>(
    gpu: &CudaBackend,
    what: String,
    (bytes, flops): (usize, f64),
    mut op: impl FnMut() -> shardline::backend::Result<T>,
) -> anyhow::Result<Timing> {
    let run = |times: usize, call: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        call()?;
        gpu.synchronize()?;
        let start = Instant::now();
        for _ in 0..times {
            call()?;
        }
        gpu.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let launched = run(1, &mut || {
        for _ in 0..CALLS {
            op()?;
        }
        Ok(())
    })? / CALLS as f64;
    let replayed = match gpu.capture(&mut || (0..CALLS).try_for_each(|_| op().map(drop))) {
        Ok(graph) => Some(run(REPLAYS, &mut || Ok(gpu.replay(&graph)?))? / (REPLAYS * CALLS) as f64),
        Err(e) => {
            eprintln!("{what}: recording it into a graph failed ({e}); timed as launched one by one");
            None
        }
    };
    Ok(Timing {
        what,
        bytes,
        flops,
        seconds: replayed.unwrap_or(launched),
        graphed: replayed.is_some(),
        launched_seconds: launched,
    })
}

/// Uniform in [0, 1).
fn random_f32(shape: Vec<usize>, rng: &mut Rng) -> HostTensor {
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next_f32()).collect();
    HostTensor::from_f32(shape, &values)
}

/// Uniform in ±0.5, in bf16.
fn random_bf16(shape: Vec<usize>, rng: &mut Rng) -> HostTensor {
    let n: usize = shape.iter().product();
    let bytes = (0..n)
        .flat_map(|_| half::bf16::from_f32(rng.next_f32() - 0.5).to_le_bytes())
        .collect();
    HostTensor {
        dtype: DType::BF16,
        shape,
        bytes,
    }
}

/// A step of `batch` sequences of `cached` tokens and `new` more each,
/// with a KV cache that holds them, and the model's attention shape.
struct Step {
    cache: <CudaBackend as Backend>::KvCache,
    step: CudaStep,
    spec: AttentionSpec,
    tokens: usize,
}

/// A [`Step`] of `batch` sequences of `cached` tokens and `new` more each,
/// the last token of each sampled as `sampling` says (one a sequence), or
/// none where it is empty.
fn step_of(
    gpu: &CudaBackend,
    config: &ModelConfig,
    (batch, cached, new): (usize, usize, usize),
    sampling: &[RowSampling],
) -> anyhow::Result<Step> {
    let (heads, kv_heads, head_dim) = (config.num_attention_heads, config.num_kv_heads(), config.head_dim());
    let context = cached + new;
    let blocks_each = context.div_ceil(BLOCK_SIZE);
    let cache = gpu.alloc_kv_cache(KvCacheShape {
        num_blocks: batch * blocks_each,
        block_size: BLOCK_SIZE,
        num_kv_heads: kv_heads,
        head_dim,
    })?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| (0..blocks_each as u32).map(|b| (s * blocks_each) as u32 + b).collect())
        .collect();
    let news = cached..context;
    let meta = PagedAttentionMeta {
        block_size: BLOCK_SIZE,
        slot_mapping: tables
            .iter()
            .flat_map(|t| {
                news.clone()
                    .map(|p| t[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
            })
            .collect(),
        query_lens: vec![new; batch],
        context_lens: vec![context; batch],
        block_tables: tables,
    };
    let positions: Vec<u32> = (0..batch).flat_map(|_| news.clone().map(|p| p as u32)).collect();
    let ids = vec![0; positions.len()];
    let logit_rows: Vec<u32> = (0..sampling.len()).map(|s| ((s + 1) * new - 1) as u32).collect();
    let step = gpu.prepare_step(StepInputs {
        token_ids: &ids,
        positions: &positions,
        attn: &meta,
        logit_rows: &logit_rows,
        sampling,
    })?;
    let spec = AttentionSpec {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    Ok(Step {
        cache,
        step,
        spec,
        tokens: positions.len(),
    })
}

/// `tokens` rows of `cols` random activations on the GPU.
fn activations(gpu: &CudaBackend, tokens: usize, cols: usize, rng: &mut Rng) -> anyhow::Result<<CudaBackend as Backend>::Tensor> {
    let mut x = gpu.zeros(tokens, cols)?;
    x.copy_from_host(&(0..tokens * cols).map(|_| rng.next_f32()).collect::<Vec<_>>())?;
    Ok(x)
}

/// A product's work: the bf16 weights' bytes, and a multiply-add a weight
/// and token.
fn work(outs: usize, ins: usize, tokens: usize) -> (usize, f64) {
    (outs * ins * 2, 2.0 * (outs * ins * tokens) as f64)
}

/// The batch-1 mat-vec of the attention's matrices and the LM head, each
/// as the model runs it: qkv of the residual stream's RMSNorm, with RoPE
/// and the KV write; o_proj added into the stream.
fn matvecs(gpu: &CudaBackend, config: &ModelConfig, rng: &mut Rng) -> anyhow::Result<Vec<Timing>> {
    let (h, hd, vocab) = (config.hidden_size, config.head_dim(), config.vocab_size);
    let (q, kv) = (config.num_attention_heads * hd, config.num_kv_heads() * hd);
    let mut timings = Vec::new();
    let norm = gpu.load_weight(random_f32(vec![h], rng))?;
    let (w, x) = (
        gpu.load_weight(random_bf16(vec![q + 2 * kv, h], rng))?,
        activations(gpu, 1, h, rng)?,
    );
    let table = gpu.load_weight(random_f32(vec![1, hd], rng))?;
    let Step { mut cache, step, spec, .. } = step_of(gpu, config, (1, 0, 1), &[])?;
    let what = format!("mat-vec qkv_proj + RoPE + KV write [{}, {h}]", q + 2 * kv);
    timings.push(time(gpu, what, work(q + 2 * kv, h, 1), || {
        let norm = RmsNorm { weight: &norm, eps: 1e-6 };
        gpu.project_qkv(&x, norm, &w, None, &mut cache, &step, &table, &spec)
    })?);

    let (w, x, mut residual) = (
        gpu.load_weight(random_bf16(vec![h, q], rng))?,
        activations(gpu, 1, q, rng)?,
        activations(gpu, 1, h, rng)?,
    );
    let what = format!("mat-vec o_proj + residual [{h}, {q}]");
    timings.push(time(gpu, what, work(h, q, 1), || gpu.add_linear(&mut residual, &x, &w))?);

    let (w, x) = (gpu.load_weight(random_bf16(vec![vocab, h], rng))?, activations(gpu, 1, h, rng)?);
    timings.push(time(gpu, format!("mat-vec lm_head [{vocab}, {h}]"), work(vocab, h, 1), || {
        gpu.linear(&x, &w, None)
    })?);
    Ok(timings)
}

/// The MLP's products as the model runs them (gate/up of the residual
/// stream's RMSNorm with the SwiGLU, down_proj added into the stream),
/// each through the mat-vec and through cuBLAS: down_proj at powers of two
/// up to the mat-vec's most tokens and at one more, gate/up at 1 token and
/// the most. Batch 1 of both, and where the hand-over should be.
fn mlp(gpu: &mut CudaBackend, config: &ModelConfig, rng: &mut Rng) -> anyhow::Result<Vec<Timing>> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let down = gpu.load_weight(random_bf16(vec![h, i], rng))?;
    let most = (1..).take_while(|&n| gpu.through_matvec(n)).count();
    let counts: Vec<usize> = (0..).map(|k| 1 << k).take_while(|&n| n <= most).chain([most + 1]).collect();
    let mut timings = Vec::new();
    let what = format!("down_proj + residual [{h}, {i}]");
    for tokens in counts {
        let x = activations(gpu, tokens, i, rng)?;
        let mut residual = activations(gpu, tokens, h, rng)?;
        timings.extend(both_ways(gpu, &what, tokens, work(h, i, tokens), |gpu| {
            gpu.add_linear(&mut residual, &x, &down)
        })?);
    }
    let gate_up = gpu.load_weight(random_bf16(vec![2 * i, h], rng))?;
    let norm = gpu.load_weight(random_f32(vec![h], rng))?;
    let what = format!("gate_up_proj + SwiGLU [{}, {h}]", 2 * i);
    for tokens in [1, most] {
        let x = activations(gpu, tokens, h, rng)?;
        timings.extend(both_ways(gpu, &what, tokens, work(2 * i, h, tokens), |gpu| {
            gpu.swiglu(&x, RmsNorm { weight: &norm, eps: 1e-6 }, &gate_up)
        })?);
    }
    Ok(timings)
}

/// `op` on `tokens` tokens timed through the mat-vec, where it reaches
/// that many, and through cuBLAS.
fn both_ways<T>(
    gpu: &mut CudaBackend,
    what: &str,
    tokens: usize,
    work: (usize, f64),
    mut op: impl FnMut(&CudaBackend) -> shardline::backend::Result<T>,
) -> anyhow::Result<Vec<Timing>> {
    let plural = if tokens == 1 { "" } else { "s" };
    let name = |how| format!("{how} {what}, {tokens} token{plural}");
    let mut timings = Vec::new();
    if gpu.through_matvec(tokens) {
        timings.push(time(gpu, name("mat-vec"), work, || op(gpu))?);
    }
    timings.push(gpu.through_cublas(|gpu| time(gpu, name("cuBLAS"), work, || op(gpu)))?);
    Ok(timings)
}

/// Attention of `batch` sequences of `cached` tokens and `new` more each:
/// decode with `new` 1, a prompt's prefill with `cached` 0.
fn attention(gpu: &CudaBackend, config: &ModelConfig, batch: usize, cached: usize, new: usize) -> anyhow::Result<Timing> {
    let Step { cache, step, spec, tokens } = step_of(gpu, config, (batch, cached, new), &[])?;
    let (heads, kv_heads, head_dim) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
    let qkv = gpu.zeros(tokens, (heads + 2 * kv_heads) * head_dim)?;
    let context = cached + new;
    let bytes = batch * context * kv_heads * head_dim * 2 * 2;
    // Each new token's query heads against the keys up to its own, twice (scores, then values).
    let pairs: usize = (cached..context).map(|p| p + 1).sum();
    let flops = 4.0 * (batch * pairs * heads * head_dim) as f64;
    let what = match cached {
        0 => format!("prefill attention, {new}-token prompt"),
        _ => format!("decode attention, batch {batch}, {cached} tokens"),
    };
    time(gpu, what, (bytes, flops), || gpu.paged_attention(&qkv, &cache, &step, &spec))
}

/// The rows `bench --kernels` samples: greedy; drawn at temperature 1 with
/// no cut (the OpenAI API's default) and with a top-p of 0.9 alone (what an
/// OpenAI client often sets, for a model whose generation_config.json sets
/// no top-k), also with the API's presence penalty over a 2,048-token
/// sequence's distinct ids; and Qwen2.5-Instruct's generation_config.json
/// (what serve applies to a request that sets none), without and with its
/// repetition penalty over those ids (sent a word each), spread evenly
/// over a vocabulary of `vocab` ids.
fn sampling_kinds(vocab: usize) -> [(&'static str, RowSampling); 6] {
    let drawn = |temperature, top_k, top_p| RowSampling {
        temperature,
        top_k,
        top_p,
        uniform: 0.5,
        ..RowSampling::greedy()
    };
    // The sequence's distinct ids, each repeated (prompt or output) or
    // generated once.
    let ids = vocab.min(2048);
    let seen = |generated, repeated| {
        (0..ids)
            .map(|i| LogitAdjustment::from_parts((i * vocab / ids) as u32, 0.0, generated, repeated))
            .collect()
    };
    let penalized = RowSampling {
        repetition_penalty: 1.05,
        adjustments: seen(0, true),
        ..drawn(0.7, 20, 0.8)
    };
    let present = RowSampling {
        presence_penalty: 0.5,
        adjustments: seen(1, false),
        ..drawn(1.0, 0, 0.9)
    };
    [
        ("greedy", RowSampling::greedy()),
        ("temperature 1", drawn(1.0, 0, 1.0)),
        ("top-p 0.9", drawn(1.0, 0, 0.9)),
        ("top-p 0.9, presence penalty over 2,048 ids", present),
        ("top-k 20, top-p 0.8", drawn(0.7, 20, 0.8)),
        ("top-k 20, top-p 0.8, 2,048 penalized ids", penalized),
    ]
}

/// The sampling kernel on `rows` rows of random logits, each sampled as `row` says.
fn sampling(
    gpu: &CudaBackend,
    config: &ModelConfig,
    rows: usize,
    (how, row): &(&str, RowSampling),
    rng: &mut Rng,
) -> anyhow::Result<Timing> {
    let vocab = config.vocab_size;
    let Step { mut step, .. } = step_of(gpu, config, (rows, 0, 1), &vec![row.clone(); rows])?;
    let mut logits = gpu.zeros(rows, vocab)?;
    // Gumbel-distributed, a tail like a language model's: top-k 20's band
    // holds a few dozen ids, and top-p 0.9's at temperature 1 about as
    // many, so the cuts take the gathered path.
    let values: Vec<f32> = (0..rows * vocab).map(|_| -2.0 * (-rng.next_f32().max(1e-9).ln()).ln()).collect();
    logits.copy_from_host(&values)?;
    let what = format!("sampling {how}, {rows} row{} of {vocab}", if rows == 1 { "" } else { "s" });
    time(gpu, what, (rows * vocab * 4, 0.0), || gpu.sample(&mut logits, &mut step))
}

pub fn run(config: &ModelConfig, name: &str, context: usize, as_json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(cuda::gpu_count() > 0, "--kernels times CUDA kernels: no CUDA GPU found");
    let mut gpu = CudaBackend::new(0).context("opening GPU 0")?;
    let bandwidth = cuda::measure_copy_bandwidth(0)?;
    let mut rng = Rng::seeded(0);
    let mut timings = matvecs(&gpu, config, &mut rng)?;
    timings.extend(mlp(&mut gpu, config, &mut rng)?);
    // Batch-1 decode's attention at the shorter contexts of the decode
    // targets too, where its merge of split keys weighs most.
    let shorter = [256, 1024].into_iter().filter(|&c| c < context);
    for (batch, cached) in shorter.map(|c| (1, c)).chain([(1, context), (64, context)]) {
        timings.push(attention(&gpu, config, batch, cached, 1)?);
    }
    timings.push(attention(&gpu, config, 1, 0, context)?);
    for rows in [1, 64] {
        for kind in &sampling_kinds(config.vocab_size) {
            timings.push(sampling(&gpu, config, rows, kind, &mut rng)?);
        }
    }
    let rate = |t: &Timing| t.bytes as f64 / t.seconds;
    if as_json {
        let rows: Vec<_> = timings
            .iter()
            .map(|t| {
                json!({"kernel": t.what, "bytes": t.bytes, "us": t.seconds * 1e6, "graphed": t.graphed, "us_launched": t.launched_seconds * 1e6, "gb_per_s": rate(t) / 1e9,
                       "fraction_of_copy_bandwidth": rate(t) / bandwidth, "tflop_per_s": t.flops / t.seconds / 1e12})
            })
            .collect();
        println!(
            "{}",
            json!({"model": name, "copy_bandwidth_gb_per_s": bandwidth / 1e9, "kernels": rows})
        );
        return Ok(());
    }
    println!("{name}: copy bandwidth {:.0} GB/s (read + write)", bandwidth / 1e9);
    let width = timings.iter().map(|t| t.what.chars().count()).max().unwrap_or(0);
    for t in &timings {
        println!(
            "{:<width$} {:>9.1} µs {:>8.0} GB/s  {:>4.0}% of copy bandwidth {:>8.1} TFLOP/s  ({})",
            t.what,
            t.seconds * 1e6,
            rate(t) / 1e9,
            100.0 * rate(t) / bandwidth,
            t.flops / t.seconds / 1e12,
            match t.graphed {
                true => format!("launched one by one: {:.1} µs", t.launched_seconds * 1e6),
                false => "launched one by one: not recorded into a graph".to_string(),
            }
        );
    }
    Ok(())
}
