//! Command-line options (clap; every option also reads an environment
//! variable) and the subcommands they drive.

mod bench;
mod generate;
mod gpu_memory;
mod kernels;
mod plan;
mod sampling_args;
mod serve;
mod throughput;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shardline::backend::cpu::CpuBackend;
use shardline::backend::cuda::nccl;
use shardline::backend::cuda::{self, CudaBackend};
use shardline::backend::Backend;
use shardline::backend::DType;
use shardline::config::ModelConfig;
use shardline::executor::NodeSpec;
use shardline::executor::{nccl_ids, nccl_transport, BusyTimes, Executor, LocalExecutor, Transport, WorkerOptions, Workers};
use shardline::generation::BLOCK_SIZE;
use shardline::loader::LoadFormat;
use shardline::model::{Qwen2ForCausalLM, Shard};
use shardline::model_dir::{self, ModelOptions};
use shardline::parallel::Layout;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "shardline", version, about = "Multi-GPU LLM inference for Qwen2-family models")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a completion for one prompt, streaming text as it is produced.
    Generate(generate::GenerateArgs),
    /// Measure prefill and batch-1 decode speed against the memory-bandwidth limit.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Which tensor/pipeline-parallel layouts fit a model on N GPUs, and which to use.
    Plan(plan::PlanArgs),
}

/// Which model to load and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer), or a
    /// config.json alone with --load-format dummy.
    #[arg(long, env = "SHARDLINE_MODEL")]
    model: PathBuf,
    /// `safetensors` reads the folder's weights; `dummy` makes random weights of the config's shapes.
    #[arg(long, value_enum, default_value_t = LoadFormat::Safetensors, env = "SHARDLINE_LOAD_FORMAT")]
    load_format: LoadFormat,
    /// Dtype of dummy weights.
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16, env = "SHARDLINE_DUMMY_DTYPE")]
    dummy_dtype: WeightDtype,
}

/// Where the model runs and how it is split across devices (ranks are
/// threads of this process; with CUDA, rank r uses GPU r mod the GPUs visible).
#[derive(Args, Debug, Clone)]
pub struct ParallelArgs {
    /// `auto` takes the GPU where CUDA finds one (`CUDA_VISIBLE_DEVICES` applies), else the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto, env = "SHARDLINE_DEVICE")]
    device: Device,
    /// Tensor-parallel ranks: each holds a slice of every weight matrix.
    #[arg(long, default_value_t = 1, env = "SHARDLINE_TP")]
    tp: usize,
    /// Pipeline stages: each holds a contiguous range of layers.
    #[arg(long, default_value_t = 1, env = "SHARDLINE_PP")]
    pp: usize,
    /// Layers per pipeline stage, e.g. 13,11 (default: balanced by weight bytes).
    #[arg(long, value_delimiter = ',', env = "SHARDLINE_PP_LAYERS")]
    pp_layers: Option<Vec<usize>>,
    /// Run one step at a time through the pipeline stages instead of one
    /// micro-batch per stage.
    #[arg(long, env = "SHARDLINE_NO_MICRO_BATCHING")]
    no_micro_batching: bool,
    /// Machines serving the model together (ranks split evenly, node 0
    /// first); every node runs the same command with its own --node-rank.
    #[arg(long, default_value_t = 1, env = "SHARDLINE_NNODES")]
    nnodes: usize,
    /// This machine's place among --nnodes: 0 runs the engine (and the
    /// server), the others run their ranks' workers for it.
    #[arg(long, default_value_t = 0, env = "SHARDLINE_NODE_RANK")]
    node_rank: usize,
    /// Where node 0 listens for the others.
    #[arg(long, default_value = "127.0.0.1", env = "SHARDLINE_MASTER_ADDR")]
    master_addr: String,
    /// The port node 0 listens on for the others.
    #[arg(long, default_value_t = 29500, env = "SHARDLINE_MASTER_PORT")]
    master_port: u16,
    /// Seconds node 0 waits for the others to connect, and they for it.
    #[arg(long, default_value_t = 600, env = "SHARDLINE_RENDEZVOUS_TIMEOUT")]
    rendezvous_timeout: u64,
    /// Run every step op by op: no CUDA graphs for decode steps (as vLLM's
    /// flag of the name).
    #[arg(long, env = "SHARDLINE_ENFORCE_EAGER")]
    enforce_eager: bool,
    /// Fault injection for tests: worker RANK panics in step STEP.
    #[arg(long, hide = true, value_name = "RANK:STEP", value_parser = parse_rank_step)]
    inject_worker_panic: Option<(usize, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

impl ParallelArgs {
    fn layout(&self) -> Layout {
        Layout { tp: self.tp, pp: self.pp }
    }

    fn nodes(&self) -> NodeSpec {
        let timeout = std::time::Duration::from_secs(self.rendezvous_timeout);
        NodeSpec::new(self.nnodes, self.node_rank, &self.master_addr, self.master_port, timeout)
    }

    /// How many of the ranks this machine runs (`--nnodes` split them evenly).
    fn ranks_per_node(&self) -> usize {
        self.nodes().ranks_of(self.node_rank, self.layout()).len()
    }

    /// Rows of the largest decode graph the ranks record (graphs need one
    /// pipeline stage), 0 where they record none.
    fn decode_graph_rows(&self, max_num_seqs: usize) -> usize {
        match self.enforce_eager || self.pp > 1 {
            true => 0,
            false => shardline::model::largest_graph(max_num_seqs),
        }
    }

    /// On a node other than 0: the command's job is to run this node's
    /// ranks for node 0, so it does that (until node 0 hangs up) instead.
    fn follower(&self) -> bool {
        self.node_rank > 0
    }

    /// Multi-node runs move tensors between machines with NCCL only, so
    /// need `device` (resolved) to be CUDA.
    fn check_nodes(&self, device: Device) -> anyhow::Result<()> {
        let spec = self.nodes();
        spec.check(self.layout())?;
        anyhow::ensure!(
            device == Device::Cuda,
            "--nnodes {}: ranks on different machines exchange tensors through NCCL, so every node needs a GPU (--device cuda)",
            spec.nnodes
        );
        Ok(())
    }

    /// The device `--device` names, `auto` resolved: CUDA when a GPU is visible.
    fn device(&self) -> anyhow::Result<Device> {
        let gpus = cuda::gpu_count();
        match (self.device, gpus) {
            (Device::Cuda, 0) => anyhow::bail!(
                "--device cuda: no CUDA GPU found (the driver library libcuda.so is missing, or CUDA_VISIBLE_DEVICES hides every GPU)"
            ),
            (Device::Auto, 0) | (Device::Cpu, _) => Ok(Device::Cpu),
            _ => Ok(Device::Cuda),
        }
    }
}

/// Loads the model as `parallel` asks: whole, driven from the caller's
/// thread, or one worker thread per rank (whose computing times come
/// along); each with a KV cache of `num_kv_blocks` blocks.
fn start_executor(
    options: &ModelOptions,
    config: &ModelConfig,
    parallel: &ParallelArgs,
    num_kv_blocks: usize,
) -> anyhow::Result<(Box<dyn Executor>, Option<BusyTimes>)> {
    let layout = parallel.layout();
    layout.validate(config)?;
    let device = parallel.device()?;
    if parallel.nnodes > 1 {
        parallel.check_nodes(device)?;
    }
    if layout.world_size() == 1 && parallel.inject_worker_panic.is_none() {
        let executor: Box<dyn Executor> = match device {
            Device::Cuda => Box::new(local_executor(
                CudaBackend::new(0)?,
                options,
                config,
                num_kv_blocks,
                !parallel.enforce_eager,
            )?),
            _ => Box::new(local_executor(CpuBackend::default(), options, config, num_kv_blocks, false)?),
        };
        return Ok((executor, None));
    }
    let worker_options = WorkerOptions {
        layout,
        pp_layers: parallel.pp_layers.clone(),
        num_kv_blocks,
        block_size: BLOCK_SIZE,
        micro_batching: !parallel.no_micro_batching,
        graphs: !parallel.enforce_eager,
        panic_at: parallel.inject_worker_panic,
    };
    let options = options.clone();
    let workers = match device {
        Device::Cuda => {
            let gpus = cuda::gpu_count();
            let load = cuda_loader(options, gpus);
            let spec = parallel.nodes();
            if spec.nnodes > 1 {
                let ids = nccl_ids(layout)?;
                let keys: Vec<Vec<u8>> = ids.iter().map(nccl::id_bytes).collect();
                eprintln!("shardline: waiting for {} more nodes on {}", spec.nnodes - 1, spec.master);
                Workers::lead(config.clone(), worker_options, load, nccl_transport(layout, ids), &keys, &spec)?
            } else {
                Workers::spawn(config.clone(), worker_options, load, cuda_transport(layout, gpus)?)?
            }
        }
        _ => {
            let load = move |_, shard| model_dir::open_shard(CpuBackend::default(), &options, shard).map_err(|e| e.to_string());
            Workers::spawn(config.clone(), worker_options, load, Transport::InProcess)?
        }
    };
    let busy = workers.busy_times();
    Ok((Box::new(workers), Some(busy)))
}

/// NCCL when every rank has a GPU of its own; through host memory when
/// ranks share GPUs (NCCL refuses two ranks on one device) or libnccl is
/// missing.
fn cuda_transport(layout: Layout, gpus: usize) -> anyhow::Result<Transport<CudaBackend>> {
    if layout.world_size() > gpus || !nccl::nccl_available() {
        let why = if layout.world_size() > gpus {
            "ranks share GPUs"
        } else {
            "libnccl.so not found"
        };
        eprintln!(
            "shardline: {} ranks on {gpus} GPUs exchange through host memory ({why})",
            layout.world_size()
        );
        return Ok(Transport::InProcess);
    }
    eprintln!("shardline: {} ranks exchange through NCCL", layout.world_size());
    Ok(nccl_transport(layout, nccl_ids(layout)?))
}

/// Builds rank `r`'s shard on GPU `r` mod `gpus`.
fn cuda_loader(options: ModelOptions, gpus: usize) -> impl Fn(usize, Shard) -> Result<Qwen2ForCausalLM<CudaBackend>, String> + Send + Sync {
    move |rank: usize, shard| {
        let backend = CudaBackend::new(rank % gpus).map_err(|e| e.to_string())?;
        model_dir::open_shard(backend, &options, shard).map_err(|e| e.to_string())
    }
}

/// A node other than 0: runs its ranks for node 0 until node 0 hangs up.
fn follow(options: &ModelOptions, parallel: &ParallelArgs) -> anyhow::Result<()> {
    parallel.check_nodes(parallel.device()?)?;
    let config = model_dir::describe(options).context("loading the model")?.config;
    let (spec, layout, gpus) = (parallel.nodes(), parallel.layout(), cuda::gpu_count());
    let local = spec.ranks_of(spec.node_rank, layout);
    anyhow::ensure!(
        local.len() <= gpus,
        "node {} runs ranks {local:?}, one GPU each, but sees {gpus} GPUs",
        spec.node_rank
    );
    eprintln!("shardline: node {} joining {}", spec.node_rank, spec.master);
    let connect = |keys: &[Vec<u8>]| {
        let ids = keys.iter().map(|k| nccl::id_from_bytes(k)).collect::<Result<_, _>>();
        ids.map(|ids| nccl_transport(layout, ids)).map_err(|e| e.to_string())
    };
    Workers::follow(config, layout, cuda_loader(options.clone(), gpus), connect, &spec)?;
    eprintln!("shardline: node {}: node 0 hung up; stopping", spec.node_rank);
    Ok(())
}

/// The whole model on one device, driven from the caller's thread, with
/// decode graphs where `graphs`.
fn local_executor<B>(
    backend: B,
    options: &ModelOptions,
    config: &ModelConfig,
    num_kv_blocks: usize,
    graphs: bool,
) -> anyhow::Result<LocalExecutor<B>>
where
    B: Backend + Send,
    B::Weight: Send,
    B::KvCache: Send,
{
    let model = model_dir::open_shard(backend, options, Shard::whole(config)).context("loading the model")?;
    Ok(LocalExecutor::with_graphs(model, num_kv_blocks, BLOCK_SIZE, graphs)?)
}

fn parse_rank_step(text: &str) -> Result<(usize, u64), String> {
    let (rank, step) = text.split_once(':').ok_or("expected RANK:STEP")?;
    Ok((rank.parse().map_err(|_| "bad rank")?, step.parse().map_err(|_| "bad step")?))
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum WeightDtype {
    Bf16,
    F16,
    F32,
}

impl ModelArgs {
    fn options(&self, seed: u64) -> ModelOptions {
        let dummy_dtype = match self.dummy_dtype {
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
            WeightDtype::F32 => DType::F32,
        };
        ModelOptions {
            model: self.model.clone(),
            load_format: self.load_format,
            seed,
            dummy_dtype,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Plan(args) => plan::run(args),
    }
}
