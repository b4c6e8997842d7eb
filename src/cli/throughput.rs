//! `shardline bench --requests N`: many requests of random prompt and
//! output lengths submitted at once to the serving engine, reporting output
//! tokens/s. The lengths come from a 64-bit LCG that
//! `benches/hf_gpu_peer.py --requests` repeats, so a peer runs the same
//! workload.

use super::bench::{random_request, run_requests, sampling_json, start_engine, BenchArgs, DeviceIdle};
use anyhow::Context;
use serde_json::json;
use shardline::backend::cuda;
use shardline::config::ModelConfig;
use shardline::generation::blocks_for;
use shardline::model_dir::ModelOptions;
use shardline::rng::Rng;
use std::str::FromStr;
use std::time::Instant;

/// Token counts drawn uniformly from `min..=max` (`N` or `MIN-MAX`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LenRange {
    min: usize,
    max: usize,
}

impl FromStr for LenRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bound = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{v:?} is not a token count"));
        let (min, max) = match s.split_once('-') {
            Some((lo, hi)) => (bound(lo)?, bound(hi)?),
            None => (bound(s)?, bound(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("{s:?}: want N or MIN-MAX with 0 < MIN <= MAX"));
        }
        Ok(LenRange { min, max })
    }
}

/// The prompt and output lengths of `n` requests, seeded by `seed`.
pub fn workload(seed: u64, n: usize, prompts: LenRange, outputs: LenRange) -> Vec<(usize, usize)> {
    let mut state = seed;
    let mut draw = |range: LenRange| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        range.min + (state >> 33) as usize % (range.max - range.min + 1)
    };
    (0..n).map(|_| (draw(prompts), draw(outputs))).collect()
}

pub fn run(args: &BenchArgs, options: &ModelOptions, config: &ModelConfig, requests: usize) -> anyhow::Result<()> {
    anyhow::ensure!(requests > 0, "--requests must be positive");
    let lengths = workload(args.seed, requests, args.prompt_lens, args.output_lens);
    let context = config.max_position_embeddings;
    if let Some(&(p, o)) = lengths.iter().find(|(p, o)| p + o > context) {
        anyhow::bail!("a request of {p} prompt + {o} output tokens exceeds the model's {context}-token context");
    }
    // Room for every request at once, so none waits for blocks.
    let num_kv_blocks = lengths.iter().map(|&(p, o)| blocks_for(p + o)).sum::<usize>() + 1;
    let (engine, _) = start_engine(options, config, &args.parallel, requests, 8192, num_kv_blocks)?;
    let mut rng = Rng::seeded(args.seed);
    let sampling = args.sampling()?;
    let mut request = |prompt, output| random_request(&mut rng, config, &sampling, prompt, output);
    // A short untimed run first: kernel loading, handles and allocator pools.
    let warm_up = (0..requests.min(4)).map(|_| request(args.prompt_lens.min, 2)).collect();
    run_requests(&engine, warm_up).context("warming up")?;
    let batch = lengths.iter().map(|&(p, o)| request(p, o)).collect();
    cuda::time_steps(true);
    let device_before = cuda::device_time();
    let start = Instant::now();
    run_requests(&engine, batch)?;
    let wall = start.elapsed().as_secs_f64();
    let device = DeviceIdle::since(device_before);
    let prompt_tokens: usize = lengths.iter().map(|l| l.0).sum();
    let output_tokens: usize = lengths.iter().map(|l| l.1).sum();
    let layout = args.parallel.layout();
    if args.json {
        let mut report = json!({
            "tp": layout.tp, "pp": layout.pp, "requests": requests,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "seconds": wall,
            "output_tokens_per_s": output_tokens as f64 / wall,
            "total_tokens_per_s": (prompt_tokens + output_tokens) as f64 / wall,
            "sampling": sampling_json(&sampling),
        });
        device.add_to(&mut report);
        println!("{report}");
        return Ok(());
    }
    println!(
        "{requests} requests ({prompt_tokens} prompt, {output_tokens} output tokens), tp={} pp={}: {:.1} s, \
         {:.1} output tokens/s, {:.1} tokens/s in all",
        layout.tp,
        layout.pp,
        wall,
        output_tokens as f64 / wall,
        (prompt_tokens + output_tokens) as f64 / wall
    );
    device.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_stay_in_range() {
        assert_eq!("7".parse::<LenRange>().unwrap(), LenRange { min: 7, max: 7 });
        assert!("0-4".parse::<LenRange>().is_err() && "9-3".parse::<LenRange>().is_err() && "x".parse::<LenRange>().is_err());
        let (prompts, outputs) = ("128-1024".parse().unwrap(), "3-5".parse().unwrap());
        let lengths = workload(0, 256, prompts, outputs);
        assert!(lengths.iter().all(|&(p, o)| (128..=1024).contains(&p) && (3..=5).contains(&o)));
        assert!(lengths.iter().any(|l| l.0 < 300) && lengths.iter().any(|l| l.0 > 900));
        assert_eq!(lengths, workload(0, 256, prompts, outputs));
    }
}
