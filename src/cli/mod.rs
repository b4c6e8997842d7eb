//! Command-line options (clap; every option also reads an environment
//! variable) and the subcommands they drive.

mod bench;
mod generate;
mod plan;
mod serve;

use clap::{Args, Parser, Subcommand};
use shardline::backend::DType;
use shardline::loader::LoadFormat;
use shardline::model_dir::ModelOptions;
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
