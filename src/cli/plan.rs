//! `shardline plan`: which tp × pp layouts and weight dtypes fit a model on
//! N GPUs of G GiB, and which to use.

use anyhow::Context;
use clap::Args;
use shardline::config::ModelConfig;
use shardline::model::largest_graph;
use shardline::parallel::plan::{gib, plan, recommend, PlanOptions, PlanRow, Workload};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A model folder or its config.json.
    #[arg(long, env = "SHARDLINE_MODEL")]
    model: PathBuf,
    /// GPUs available.
    #[arg(long)]
    gpus: usize,
    /// Memory of each GPU in GiB.
    #[arg(long)]
    gpu_memory_gib: f64,
    /// Fraction of each GPU's memory to use.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Tokens per step (sizes the activation workspace).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Sequences per step (sizes the logits buffer).
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// A layout fits when this many tokens of KV cache fit beside the weights.
    #[arg(long, default_value_t = 4096)]
    min_kv_tokens: usize,
    /// Print `{"layouts": [...], "recommended": {...}}` instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.gpus > 0, "--gpus must be at least 1");
    anyhow::ensure!(
        args.gpu_memory_gib > 0.0 && (0.0..=1.0).contains(&args.gpu_memory_utilization),
        "--gpu-memory-gib must be positive and --gpu-memory-utilization within 0..1"
    );
    let path = match args.model.is_dir() {
        true => args.model.join("config.json"),
        false => args.model.clone(),
    };
    let config = ModelConfig::from_file(&path).with_context(|| format!("reading {}", path.display()))?;
    let options = PlanOptions {
        gpus: args.gpus,
        gpu_memory_bytes: (args.gpu_memory_gib * (1u64 << 30) as f64) as u64,
        gpu_memory_utilization: args.gpu_memory_utilization,
        workload: Workload {
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_num_seqs: args.max_num_seqs,
            graph_tokens: largest_graph(args.max_num_seqs),
        },
        min_kv_tokens: args.min_kv_tokens,
    };
    let rows = plan(&config, &options);
    let best = recommend(&rows);
    if args.json {
        let recommended = best.map(|r| {
            let mut value = serde_json::to_value(r).expect("plain fields");
            value["replicas"] = (args.gpus / r.gpus()).into();
            value
        });
        println!("{}", serde_json::json!({"layouts": rows, "recommended": recommended}));
        return Ok(());
    }
    print_table(&config, &args, &rows);
    match best {
        Some(r) => println!(
            "\nrecommended: --tp {} --pp {} with {} weights ({} GPUs each; {} replica(s) on {} GPUs)",
            r.tp,
            r.pp,
            r.dtype,
            r.gpus(),
            args.gpus / r.gpus(),
            args.gpus
        ),
        None => println!(
            "\nnothing fits: no layout on {} GPU(s) of {} GiB leaves {} tokens of KV cache",
            args.gpus, args.gpu_memory_gib, args.min_kv_tokens
        ),
    }
    Ok(())
}

fn print_table(config: &ModelConfig, args: &PlanArgs, rows: &[PlanRow]) {
    println!(
        "{:.1}B parameters, {} layers; {} GPU(s) of {} GiB at {:.0}% use; fits = room for {} KV tokens",
        config.num_parameters() as f64 / 1e9,
        config.num_hidden_layers,
        args.gpus,
        args.gpu_memory_gib,
        100.0 * args.gpu_memory_utilization,
        args.min_kv_tokens
    );
    println!(
        "{:>3} {:>3} {:>5} {:>15} {:>15} {:>15} {:>14} {:>5}",
        "tp", "pp", "dtype", "weights GiB/GPU", "workspace GiB", "KV KiB/token", "max KV tokens", "fits"
    );
    for r in rows {
        println!(
            "{:>3} {:>3} {:>5} {:>15.2} {:>15.2} {:>15.1} {:>14} {:>5}",
            r.tp,
            r.pp,
            r.dtype,
            gib(r.weight_bytes_per_gpu),
            gib(r.workspace_bytes_per_gpu),
            r.kv_bytes_per_token as f64 / 1024.0,
            r.max_kv_tokens,
            if r.fits { "yes" } else { "no" }
        );
    }
    println!("(the KV cache is bf16; an f16 checkpoint's weights are held in f32, as shardline's kernels read bf16 or f32)");
}
