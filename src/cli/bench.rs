//! `shardline bench`: prefill and batch-1 decode speed of one model on this
//! machine, with decode put against its ceiling. Batch-1 decode must stream
//! every weight once per token, so the limit is
//! `measured memory bandwidth ÷ weight bytes per token`.

use super::gpu_memory::MemoryHeld;
use super::kernels;
use super::sampling_args::SamplingArgs;
use super::throughput::{self, LenRange};
use super::{follow, start_executor, Device, ModelArgs, ParallelArgs};
use anyhow::Context;
use clap::Args;
use serde_json::json;
use shardline::backend::cpu;
use shardline::backend::cuda;
use shardline::config::{GenerationConfig, ModelConfig};
use shardline::engine::request::{Event, Request, StopConditions};
use shardline::engine::{Engine, EngineConfig, EngineHandle};
use shardline::executor::BusyTimes;
use shardline::generation::{blocks_for, GenerateRequest, Generator, BLOCK_SIZE};
use shardline::model_dir;
use shardline::model_dir::ModelOptions;
use shardline::parallel::plan::Workload;
use shardline::rng::Rng;
use shardline::sampling::SamplingParams;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Prompt tokens for the prefill measurement (random ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens decoded after the prompt in each run.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seeds dummy weights, the prompts and `--requests`' lengths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Instead of batch 1: this many requests at once through the serving
    /// engine (each a `--prompt-len` prompt and `--decode-tokens` outputs),
    /// reporting output tokens/s and, for split models, each stage's idle share.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Throughput instead: this many requests at once through the serving
    /// engine, lengths drawn from `--prompt-lens` and `--output-lens`
    /// (seeded by `--seed`), reporting output tokens/s.
    #[arg(long, conflicts_with = "concurrency")]
    pub requests: Option<usize>,
    /// Prompt lengths for `--requests`: `N`, or `MIN-MAX` drawn uniformly.
    #[arg(long, default_value = "128-1024")]
    pub prompt_lens: LenRange,
    /// Output lengths for `--requests` (EOS ignored), as `--prompt-lens`.
    #[arg(long, default_value = "128-1024")]
    pub output_lens: LenRange,
    /// Time the kernels decode streams memory through instead (the GPU's
    /// mat-vec of each weight matrix, decode attention), and prefill
    /// attention, at the model's shapes.
    #[arg(long, conflicts_with_all = ["concurrency", "requests"])]
    kernels: bool,
    /// Cached tokens per sequence for `--kernels`' decode attention, and the
    /// prompt its prefill attention takes.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Greedy unless these say otherwise (Qwen2.5-Instruct's defaults:
    /// `--temperature 0.7 --top-k 20 --top-p 0.8 --repetition-penalty 1.05`).
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl BenchArgs {
    /// Every request's sampling: greedy where no flag says otherwise.
    pub fn sampling(&self) -> anyhow::Result<SamplingParams> {
        let greedy = GenerationConfig {
            do_sample: Some(false),
            ..Default::default()
        };
        self.sampling.params(&greedy, self.seed)
    }
}

/// The sampling a report ran with.
pub(super) fn sampling_json(p: &SamplingParams) -> serde_json::Value {
    json!({
        "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
        "repetition_penalty": p.repetition_penalty,
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.parallel.follower() {
        return follow(&args.model.options(args.seed), &args.parallel);
    }
    anyhow::ensure!(
        args.prompt_len > 0 && args.decode_tokens > 0 && args.repeats > 0 && args.context > 0,
        "--prompt-len, --decode-tokens, --repeats and --context must be positive"
    );
    let load_start = Instant::now();
    let options = args.model.options(args.seed);
    let info = model_dir::describe(&options).context("loading the model")?;
    let (name, config) = (info.name, info.config);
    if let Some(concurrency) = args.concurrency {
        return engine_load(&args, &options, &config, concurrency);
    }
    if let Some(requests) = args.requests {
        return throughput::run(&args, &options, &config, requests);
    }
    if args.kernels {
        return kernels::run(&config, &name, args.context, args.json);
    }
    let sampling = args.sampling()?;
    let num_blocks = blocks_for(args.prompt_len + args.decode_tokens + 1);
    let (executor, _) = start_executor(&options, &config, &args.parallel, num_blocks)?;
    let mut generator = Generator::with_executor(executor, num_blocks);
    let load_seconds = load_start.elapsed().as_secs_f64();
    let weight_bytes = generator.executor().decode_weight_bytes();

    let mut rng = Rng::seeded(args.seed);
    let prompt: Vec<u32> = (0..args.prompt_len)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut gpu_work = None;
    // Sampled where the logits are, as a server decodes: the prompt, then
    // `decode_tokens` more, each step planned ahead where the executor allows.
    let request = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: args.decode_tokens + 1,
        sampling: sampling.clone(),
        eos_token_ids: Vec::new(),
        ignore_eos: true,
    };
    // Planned ahead, the second token's step is queued before the first token is back.
    let steps_after_first = args.decode_tokens - generator.executor().lookahead() as usize;
    // One untimed run first: kernel loading, handles and allocator pools.
    for run in 0..=args.repeats {
        let mut first = None;
        let generation = generator.generate(&request, |_| {
            first.get_or_insert_with(|| (Instant::now(), cuda::activity()));
        })?;
        let (start, before) = first.expect("a generation has a first token");
        let wall = start.elapsed();
        if run > 0 {
            prefill.push(args.prompt_len as f64 / generation.time_to_first_token.as_secs_f64());
            decode.push(args.decode_tokens as f64 / wall.as_secs_f64());
            gpu_work = Some(GpuWork::per_step(before, cuda::activity(), wall, steps_after_first));
        }
    }
    let device = args.parallel.device()?;
    // Waits happen on the ranks' threads when the model is split.
    let one_rank = args.parallel.layout().world_size() == 1;
    let gpu_work = gpu_work.filter(|_| device == Device::Cuda);
    let device_name = format!("{device:?}").to_lowercase();
    let (bandwidth, bandwidth_kind) = match device {
        Device::Cuda => (cuda::measure_copy_bandwidth(0)?, "device-to-device copy, read + write".to_string()),
        _ => (
            cpu::measure_read_bandwidth()?,
            format!("read, {} threads", rayon::current_num_threads()),
        ),
    };
    let (prefill, decode) = (median(prefill), median(decode));
    let limit = bandwidth / weight_bytes as f64;
    let graphs = decode_graphs();
    let layout = args.parallel.layout();
    let report = json!({
        "model": name,
        "device": device_name,
        "parameters": config.num_parameters(),
        "threads": rayon::current_num_threads(),
        "tp": layout.tp,
        "pp": layout.pp,
        "load_seconds": load_seconds,
        "weight_bytes_per_token": weight_bytes,
        "memory_bandwidth_gb_per_s": bandwidth / 1e9,
        "prompt_len": args.prompt_len,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "decode_bandwidth_limit_tokens_per_s": limit,
        "decode_fraction_of_limit": decode / limit,
        "kernel_launches_per_decode_step": gpu_work.map(|w| w.launches),
        "host_us_per_decode_step": gpu_work.filter(|_| one_rank).map(|w| w.host_us),
        "decode_graphs": graphs.map(graphs_json),
        "sampling": sampling_json(&sampling),
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "model              {name}: {:.1}M parameters on {device_name}, tp={} pp={}, loaded in {load_seconds:.1} s",
        config.num_parameters() as f64 / 1e6,
        layout.tp,
        layout.pp
    );
    println!("weights per token  {:.1} MB streamed per decode step", weight_bytes as f64 / 1e6);
    println!("memory bandwidth   {:.1} GB/s ({bandwidth_kind})", bandwidth / 1e9);
    println!("prefill            {prefill:.1} tokens/s ({}-token prompt)", args.prompt_len);
    println!(
        "decode (batch 1)   {decode:.2} tokens/s = {:.0}% of the {limit:.2} tokens/s bandwidth limit",
        100.0 * decode / limit
    );
    if let Some(w) = gpu_work {
        let host = match one_rank {
            true => format!(", {:.0} µs of host time each (wall less waits for the GPU)", w.host_us),
            false => String::new(),
        };
        println!("per decode step    {:.0} kernels queued{host}", w.launches);
    }
    if let Some(g) = graphs {
        println!("decode graphs      {}", graphs_line(&g));
    }
    Ok(())
}

/// The census of the decode graphs recorded so far (kept graphs only: a
/// recording that overflowed the arena is made again); none off a GPU.
fn decode_graphs() -> Option<cuda::GraphCensus> {
    Some(cuda::recorded_graphs()).filter(|g| g.graphs > 0)
}

fn graphs_json(g: cuda::GraphCensus) -> serde_json::Value {
    json!({
        "recorded": g.graphs,
        "kernel_nodes": g.kernels,
        "memory_nodes": g.memory,
        "kernel_to_kernel_edges": g.kernel_edges,
        "programmatic_edges": g.programmatic_edges,
    })
}

fn graphs_line(g: &cuda::GraphCensus) -> String {
    format!(
        "{} recorded: {} kernel nodes, {} allocation or free nodes; {} of {} kernel-to-kernel edges programmatic",
        g.graphs, g.kernels, g.memory, g.programmatic_edges, g.kernel_edges
    )
}

/// What one decode step asked of the GPUs, from the CUDA backends' counters.
#[derive(Clone, Copy)]
struct GpuWork {
    launches: f64,
    /// The step's wall time less the time the host waited for a GPU: when
    /// it nears the wall time, the host (launching kernels) bounds decode.
    host_us: f64,
}

impl GpuWork {
    fn per_step(before: cuda::Activity, after: cuda::Activity, wall: std::time::Duration, steps: usize) -> Self {
        let steps = steps.max(1) as f64;
        let waited = after.waited.saturating_sub(before.waited);
        GpuWork {
            launches: (after.launches - before.launches) as f64 / steps,
            host_us: wall.saturating_sub(waited).as_secs_f64() * 1e6 / steps,
        }
    }
}

/// Tokens a step of the load benchmark may batch.
const LOAD_BATCHED_TOKENS: usize = 2048;

/// `concurrency` requests through the engine at once, `--repeats` times;
/// output tokens/s and each stage's idle share (median run).
fn engine_load(args: &BenchArgs, options: &ModelOptions, config: &ModelConfig, concurrency: usize) -> anyhow::Result<()> {
    anyhow::ensure!(concurrency > 0, "--concurrency must be positive");
    let sampling = args.sampling()?;
    let per_request = blocks_for(args.prompt_len + args.decode_tokens);
    let num_kv_blocks = per_request * concurrency + 1;
    let (engine, busy) = start_engine(options, config, &args.parallel, concurrency, LOAD_BATCHED_TOKENS, num_kv_blocks)?;
    let layout = args.parallel.layout();
    let mut rng = Rng::seeded(args.seed);
    let mut runs = Vec::new();
    let mut device_before = cuda::device_time();
    for run in 0..args.repeats + 1 {
        let requests: Vec<Request> = (0..concurrency)
            .map(|_| random_request(&mut rng, config, &sampling, args.prompt_len, args.decode_tokens))
            .collect();
        let busy_before = busy_snapshot(busy.as_ref());
        // Each run timed on its own: no gap across the pause between runs.
        cuda::time_steps(true);
        if run == 1 {
            device_before = cuda::device_time();
        }
        let start = Instant::now();
        run_requests(&engine, requests)?;
        let wall = start.elapsed().as_secs_f64();
        // Each stage's idle share: its ranks' mean computing time against the wall.
        let stage_idle: Vec<f64> = busy_snapshot(busy.as_ref())
            .iter()
            .zip(&busy_before)
            .map(|(after, before)| (after - before) as f64 / 1e9)
            .collect::<Vec<f64>>()
            .chunks(layout.tp)
            .map(|ranks| 1.0 - ranks.iter().sum::<f64>() / ranks.len() as f64 / wall)
            .collect();
        runs.push(((concurrency * args.decode_tokens) as f64 / wall, stage_idle));
    }
    // The first run warms up.
    runs.remove(0);
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (tokens_per_s, stage_idle) = runs.swap_remove(runs.len() / 2);
    let device = DeviceIdle::since(device_before);
    let graphs = decode_graphs();
    let memory = match args.parallel.device()? {
        Device::Cuda => {
            let workload = Workload {
                max_num_batched_tokens: LOAD_BATCHED_TOKENS,
                max_num_seqs: concurrency,
                graph_tokens: args.parallel.decode_graph_rows(concurrency),
            };
            Some(MemoryHeld::now(&args.parallel, options, config, workload, num_kv_blocks)?)
        }
        _ => None,
    };
    let micro_batching = layout.pp > 1 && !args.parallel.no_micro_batching;
    if args.json {
        let mut report = json!({
            "tp": layout.tp, "pp": layout.pp, "micro_batching": micro_batching, "concurrency": concurrency,
            "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "output_tokens_per_s": tokens_per_s, "stage_idle_fraction": stage_idle,
            "sampling": sampling_json(&sampling),
        });
        device.add_to(&mut report);
        report["decode_graphs"] = json!(graphs.map(graphs_json));
        if let Some(m) = &memory {
            report["gpu_memory_in_use_bytes"] = json!(m.in_use);
            report["gpu_memory_predicted_bytes"] = json!(m.predicted);
        }
        println!("{report}");
        return Ok(());
    }
    let idle: Vec<String> = stage_idle.iter().map(|f| format!("{:.0}%", 100.0 * f)).collect();
    println!(
        "tp={} pp={} micro-batching={} concurrency={concurrency}: {tokens_per_s:.1} output tokens/s; stage idle {}",
        layout.tp,
        layout.pp,
        if micro_batching { "on" } else { "off" },
        if idle.is_empty() {
            "n/a (one rank)".to_string()
        } else {
            idle.join(" / ")
        }
    );
    device.print();
    if let Some(g) = graphs {
        println!("decode graphs of every batch size run: {}", graphs_line(&g));
    }
    if let Some(m) = memory {
        m.print();
    }
    Ok(())
}

/// The GPUs' own account of a run's steps (nothing off the GPU): how much
/// of the device's time passed idle between one step's end and the next
/// step's start, from timing events recorded on the ranks' streams.
pub(super) struct DeviceIdle(Option<cuda::DeviceTime>);

impl DeviceIdle {
    /// Since `before` (a [`cuda::device_time`] taken with timing on).
    pub(super) fn since(before: cuda::DeviceTime) -> Self {
        let run = cuda::device_time().since(before);
        DeviceIdle((run.gaps > 0).then_some(run))
    }

    fn mean_gap_us(run: &cuda::DeviceTime) -> f64 {
        run.idle.as_secs_f64() * 1e6 / run.gaps as f64
    }

    pub(super) fn add_to(&self, report: &mut serde_json::Value) {
        if let Some(run) = &self.0 {
            report["device_idle_fraction"] = json!(run.idle_fraction());
            report["device_mean_gap_us"] = json!(Self::mean_gap_us(run));
            report["device_steps"] = json!(run.steps);
        }
    }

    pub(super) fn print(&self) {
        if let Some(run) = &self.0 {
            println!(
                "device idle between steps: {:.1}% of its time ({:.1} µs a gap over {} gaps, {} steps timed)",
                100.0 * run.idle_fraction(),
                Self::mean_gap_us(run),
                run.gaps,
                run.steps
            );
        }
    }
}

/// An engine over the model with room for `max_num_seqs` sequences in
/// `num_kv_blocks` blocks, and the ranks' busy times when it is split.
pub(super) fn start_engine(
    options: &ModelOptions,
    config: &ModelConfig,
    parallel: &ParallelArgs,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    num_kv_blocks: usize,
) -> anyhow::Result<(EngineHandle, Option<BusyTimes>)> {
    let (executor, busy) = start_executor(options, config, parallel, num_kv_blocks)?;
    let engine_config = EngineConfig {
        max_num_seqs,
        max_num_batched_tokens,
        num_kv_blocks,
        block_size: BLOCK_SIZE,
    };
    Ok((EngineHandle::spawn(Engine::new(executor, None, engine_config)), busy))
}

/// A request of `prompt` random ids for exactly `output` tokens.
pub(super) fn random_request(rng: &mut Rng, config: &ModelConfig, sampling: &SamplingParams, prompt: usize, output: usize) -> Request {
    Request {
        prompt_ids: (0..prompt).map(|_| (rng.next_u64() % config.vocab_size as u64) as u32).collect(),
        sampling: sampling.clone(),
        max_tokens: output,
        stop: StopConditions {
            ignore_eos: true,
            ..Default::default()
        },
    }
}

/// Submits every request at once and waits for them all to finish.
pub(super) fn run_requests(engine: &EngineHandle, requests: Vec<Request>) -> anyhow::Result<()> {
    let receivers: Vec<_> = requests.into_iter().map(|r| engine.submit(r).1).collect();
    for mut events in receivers {
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Token { .. } => {}
                Event::Finished { .. } => break,
                Event::Failed(message) => anyhow::bail!("a request failed: {message}"),
            }
        }
    }
    Ok(())
}

fn busy_snapshot(busy: Option<&BusyTimes>) -> Vec<u64> {
    busy.map(|b| b.iter().map(|t| t.load(Ordering::Relaxed)).collect())
        .unwrap_or_default()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
