//! `shardline serve`: the OpenAI-compatible server. It listens at once (so
//! `/health` answers and `/v1` says 503 while the model loads), becomes ready
//! after decoding a warm-up token, and on SIGTERM or Ctrl-C stops admitting
//! requests, lets those in flight finish within `--shutdown-timeout`, and
//! exits 0.

mod kv_cache;

use super::{follow, gpu_memory, start_executor, Device, ModelArgs, ParallelArgs};
use anyhow::{bail, Context};
use axum::serve::ListenerExt;
use clap::Args;
use shardline::api::{self, AppState, Limits, Served, ServerOptions};
use shardline::engine::request::{Event, Request, StopConditions};
use shardline::engine::{Engine, EngineConfig, EngineHandle};
use shardline::generation::BLOCK_SIZE;
use shardline::model_dir;
use shardline::sampling::SamplingParams;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[arg(long, default_value = "0.0.0.0", env = "SHARDLINE_HOST")]
    host: String,
    #[arg(long, default_value_t = 8000, env = "SHARDLINE_PORT")]
    port: u16,
    /// The model name clients send (default: the model folder's name).
    #[arg(long, env = "SHARDLINE_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every /v1 route.
    #[arg(long, env = "SHARDLINE_API_KEY")]
    api_key: Option<String>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256, env = "SHARDLINE_MAX_NUM_SEQS")]
    max_num_seqs: usize,
    /// Longest context (prompt plus output) a request may have (default:
    /// the model's max_position_embeddings); also caps the KV cache at
    /// --max-num-seqs contexts this long.
    #[arg(long, env = "SHARDLINE_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// Most tokens (prefill chunks plus decodes) in one step.
    #[arg(long, default_value_t = 2048, env = "SHARDLINE_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: usize,
    /// KV-cache size a rank, e.g. 2GiB or 512MiB (default: on GPUs, what
    /// --gpu-memory-utilization leaves beside the weights and workspace; on
    /// the CPU, a fifth of available memory; at most what max-num-seqs full
    /// contexts need).
    #[arg(long, value_parser = parse_bytes, env = "SHARDLINE_KV_CACHE_MEMORY")]
    kv_cache_memory: Option<usize>,
    /// Fraction of each GPU's memory for the weights, workspace and KV
    /// cache; what other processes hold counts against it.
    #[arg(long, default_value_t = 0.9, env = "SHARDLINE_GPU_MEMORY_UTILIZATION")]
    gpu_memory_utilization: f64,
    /// Requests that may wait for a batch slot; more get 429.
    #[arg(long, default_value_t = 1024, env = "SHARDLINE_MAX_WAITING")]
    max_waiting: usize,
    /// Largest request body, e.g. 8MiB.
    #[arg(long, default_value = "8MiB", value_parser = parse_bytes, env = "SHARDLINE_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "SHARDLINE_SHUTDOWN_TIMEOUT")]
    shutdown_timeout: u64,
    /// Seeds dummy weights.
    #[arg(long, default_value_t = 0, env = "SHARDLINE_SEED")]
    seed: u64,
}

/// `123`, `64KiB`, `512MiB`, `2GiB` (also KB/MB/GB as powers of 1000).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a size such as 2GiB"))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)")),
    };
    Ok((number * scale) as usize)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.parallel.follower() {
        return follow(&args.model.options(args.seed), &args.parallel);
    }
    anyhow::ensure!(
        args.max_num_seqs > 0 && args.max_num_batched_tokens > 0,
        "--max-num-seqs and --max-num-batched-tokens must be positive"
    );
    anyhow::ensure!(
        args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0,
        "--gpu-memory-utilization must be within (0, 1], got {}",
        args.gpu_memory_utilization
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let options = ServerOptions {
        served_model_name: name,
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        max_waiting: args.max_waiting,
    };
    let state = AppState::new(options);
    let address = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    eprintln!("shardline: listening on http://{}", listener.local_addr()?);

    let loading = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || load(&args, &state).map(|()| args.shutdown_timeout))
    };
    let shutdown = Arc::new(tokio::sync::Notify::new());
    // Without TCP_NODELAY, a streamed token can sit ~40 ms in Nagle's buffer
    // waiting for the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, api::router(state.clone())).with_graceful_shutdown({
        let shutdown = shutdown.clone();
        async move { shutdown.notified().await }
    });
    let server = tokio::spawn(async move { server.await });
    let shutdown_timeout = match loading.await? {
        Ok(timeout) => timeout,
        Err(e) => bail!("{e:#}"),
    };
    eprintln!("shardline: ready");
    wait_for_signal().await;
    eprintln!(
        "shardline: draining {} in-flight requests (up to {shutdown_timeout} s)",
        state.in_flight()
    );
    state.start_draining();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(shutdown_timeout);
    while state.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.notify_one();
    // Connections still open past the deadline are cut.
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    eprintln!("shardline: stopped");
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Loads the model, starts the engine, proves it decodes, then serves it.
fn load(args: &ServeArgs, state: &AppState) -> anyhow::Result<()> {
    let options = args.model.options(args.seed);
    let info = model_dir::describe(&options).context("loading the model")?;
    let tokenizer = Arc::new(info.tokenizer.context("serving needs the model folder's tokenizer.json")?);
    let config = info.config;
    let layout = args.parallel.layout();
    layout.validate(&config)?;
    let stages = layout.stage_layers(&config, args.parallel.pp_layers.as_deref())?;
    let context_len = match args.max_model_len {
        None => config.max_position_embeddings,
        Some(n) if n > 0 && n <= config.max_position_embeddings => n,
        Some(n) => bail!(
            "--max-model-len {n} must be within 1..={}, the model's max_position_embeddings",
            config.max_position_embeddings
        ),
    };
    let device = args.parallel.device()?;
    // Held until loaded: the workers then open the contexts read here.
    let gpus = match device {
        Device::Cuda => Some(gpu_memory::hold(&args.parallel)?),
        _ => None,
    };
    let memory = gpus.as_deref().map(gpu_memory::memory_of).transpose()?;
    let (num_kv_blocks, per_token) = kv_cache::kv_cache_blocks(args, &options, &config, &stages, memory.as_deref(), context_len)?;
    let engine_config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        num_kv_blocks,
        block_size: BLOCK_SIZE,
    };
    let (executor, _) = start_executor(&options, &config, &args.parallel, num_kv_blocks)?;
    let engine = EngineHandle::spawn(Engine::new(executor, Some(tokenizer.clone()), engine_config));
    eprintln!(
        "shardline: KV cache of {} tokens ({:.1} MiB a rank)",
        num_kv_blocks * BLOCK_SIZE,
        (num_kv_blocks * BLOCK_SIZE * per_token) as f64 / (1 << 20) as f64
    );
    if num_kv_blocks * BLOCK_SIZE < context_len {
        eprintln!(
            "shardline: the KV cache holds fewer tokens than one {context_len}-token context; \
             a request needing more is refused (--max-model-len caps the context)"
        );
    }
    warm_up(&engine)?;
    if let Some(gpus) = &gpus {
        gpu_memory::report(gpus, "after loading");
    }
    let limits = Limits {
        context_len,
        kv_cache_tokens: num_kv_blocks * BLOCK_SIZE,
        vocab_size: config.vocab_size,
        eos_token_ids: info.eos_token_ids,
        defaults: info.generation,
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    state.set_served(Served {
        engine,
        tokenizer,
        limits,
        created,
    });
    Ok(())
}

/// Decodes one token end to end: readiness means decoding works.
fn warm_up(engine: &EngineHandle) -> anyhow::Result<()> {
    let request = Request {
        prompt_ids: vec![0],
        sampling: SamplingParams::greedy(),
        max_tokens: 1,
        stop: StopConditions::default(),
    };
    let (_, mut events) = engine.submit(request);
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { .. } => {}
            Event::Finished { .. } => return Ok(()),
            Event::Failed(message) => bail!("the warm-up step failed: {message}"),
        }
    }
    bail!("the engine stopped during warm-up")
}
