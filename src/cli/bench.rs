//! `shardline bench`: prefill and batch-1 decode speed of one model on this
//! machine, with decode put against its ceiling. Batch-1 decode must stream
//! every weight once per token, so the limit is
//! `measured memory bandwidth ÷ weight bytes per token`.

use super::{start_executor, ModelArgs, ParallelArgs};
use anyhow::Context;
use clap::Args;
use serde_json::json;
use shardline::backend::cpu;
use shardline::generation::{blocks_for, Generator};
use shardline::model_dir;
use shardline::rng::Rng;
use shardline::sampling::argmax;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    /// Prompt tokens for the prefill measurement (random ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens decoded after the prompt in each run.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seeds dummy weights and the prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prompt_len > 0 && args.decode_tokens > 0 && args.repeats > 0,
        "--prompt-len, --decode-tokens and --repeats must be positive"
    );
    let load_start = Instant::now();
    let options = args.model.options(args.seed);
    let info = model_dir::describe(&options).context("loading the model")?;
    let (name, config) = (info.name, info.config);
    let num_blocks = blocks_for(args.prompt_len + args.decode_tokens);
    let mut generator = Generator::with_executor(start_executor(&options, &config, &args.parallel, num_blocks)?, num_blocks);
    let load_seconds = load_start.elapsed().as_secs_f64();
    let weight_bytes = generator.executor().decode_weight_bytes();

    let mut rng = Rng::seeded(args.seed);
    let prompt: Vec<u32> = (0..args.prompt_len)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let start = Instant::now();
        let mut logits = generator.prefill(&prompt)?;
        prefill.push(args.prompt_len as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for _ in 0..args.decode_tokens {
            logits = generator.decode_one_token(argmax(&logits))?;
        }
        decode.push(args.decode_tokens as f64 / start.elapsed().as_secs_f64());
    }
    let bandwidth = cpu::measure_read_bandwidth()?;
    let (prefill, decode) = (median(prefill), median(decode));
    let limit = bandwidth / weight_bytes as f64;
    let report = json!({
        "model": name,
        "parameters": config.num_parameters(),
        "threads": rayon::current_num_threads(),
        "tp": args.parallel.layout().tp,
        "pp": args.parallel.layout().pp,
        "load_seconds": load_seconds,
        "weight_bytes_per_token": weight_bytes,
        "memory_bandwidth_gb_per_s": bandwidth / 1e9,
        "prompt_len": args.prompt_len,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "decode_bandwidth_limit_tokens_per_s": limit,
        "decode_fraction_of_limit": decode / limit,
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let layout = args.parallel.layout();
    println!(
        "model              {name}: {:.1}M parameters, tp={} pp={}, loaded in {load_seconds:.1} s",
        config.num_parameters() as f64 / 1e6,
        layout.tp,
        layout.pp
    );
    println!("weights per token  {:.1} MB streamed per decode step", weight_bytes as f64 / 1e6);
    println!(
        "memory bandwidth   {:.1} GB/s (read, {} threads)",
        bandwidth / 1e9,
        rayon::current_num_threads()
    );
    println!("prefill            {prefill:.1} tokens/s ({}-token prompt)", args.prompt_len);
    println!(
        "decode (batch 1)   {decode:.2} tokens/s = {:.0}% of the {limit:.2} tokens/s bandwidth limit",
        100.0 * decode / limit
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
