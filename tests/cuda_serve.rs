//! `shardline serve` on a GPU sizes its KV cache from the memory the driver
//! reports: what `--gpu-memory-utilization` of the GPU leaves beside the
//! weights and workspace (and what is in use already), and refuses to start
//! where that leaves nothing; and what a run holds stays within what that
//! arithmetic reserves. Skips, saying so, where no GPU is visible.

mod common;

use common::http::Server;
use shardline::backend::cuda;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Held by each test for its whole run: on a real GPU another test's
/// process would change the memory in use under its measurements.
static GPU_0: Mutex<()> = Mutex::new(());

fn gpu_0() -> MutexGuard<'static, ()> {
    GPU_0.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `--gpu-memory-utilization` that lets shardline have `mib` MiB of GPU 0
/// beyond what is in use now (this process's own context among it; the
/// server's context, a few hundred MiB on a real GPU, comes out of it).
fn utilization_for(mib: usize) -> String {
    let (free, total) = cuda::memory_info(0).unwrap();
    ((total - free + mib * MIB) as f64 / total as f64).to_string()
}

/// The tokens of KV cache a server started with `utilization` reports.
fn kv_tokens(utilization: &str) -> usize {
    // 512 sequences: room for 2 Mi tokens, so no bound but the memory's.
    let server = Server::start(&["--device", "cuda", "--max-num-seqs", "512", "--gpu-memory-utilization", utilization]);
    let line = server
        .startup
        .iter()
        .find_map(|l| l.strip_prefix("shardline: KV cache of "))
        .unwrap_or_else(|| panic!("no KV cache line in {:?}", server.startup));
    assert!(
        server
            .startup
            .iter()
            .any(|l| l.starts_with("shardline: GPU 0: ") && l.ends_with("free after loading")),
        "no report of the memory left: {:?}",
        server.startup
    );
    line.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn serve_gives_the_kv_cache_what_the_gpu_memory_utilization_leaves_and_refuses_too_little() {
    if !common::gpu_visible() {
        return;
    }
    let _gpu = gpu_0();
    let small = kv_tokens(&utilization_for(1400));
    let large = kv_tokens(&utilization_for(1464));
    // tiny-chat's bf16 KV cache takes 4 layers × K and V × 2 heads × 32 × 2
    // bytes = 1 KiB a token: the 64 MiB more all go to it (to a 16-token block).
    assert!(large.abs_diff(small + 64 * 1024) <= 16, "{small} tokens, then {large}");
    let weights = std::fs::metadata(common::model_dir("tiny-chat").join("model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        small * 1024 + weights < 1400 * MIB,
        "{small} tokens and {weights} bytes of weights in 1400 MiB"
    );
    refuses_a_gpu_without_room_for_the_weights_and_workspace();
}

/// Part of the test above, under its hold on the GPU.
fn refuses_a_gpu_without_room_for_the_weights_and_workspace() {
    let model = common::model_dir("tiny-chat");
    let utilization = utilization_for(100);
    let mut child = Command::new(common::shardline_bin())
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--device", "cuda"])
        .args(["--gpu-memory-utilization", &utilization])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A server that starts serves until stopped: give it a minute to refuse.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started on {utilization} of the GPU instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in ["GPU 0 has", "before any KV cache", "a lower --max-num-seqs"] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }
}

/// What the KV-cache sizing reserves beside the cache must cover what a
/// run leaves held: bench's load run on GPU 0 holds no more than plan
/// expects of weights, workspace and cache (beyond a CUDA context, which
/// this process measures with its own, and 16 MiB for the kernels' modules).
#[test]
fn a_load_run_holds_no_more_than_plan_expects() {
    if !common::gpu_visible() {
        return;
    }
    let _gpu = gpu_0();
    let (free, total) = cuda::memory_info(0).unwrap();
    let context = (total - free) as u64;
    let model = common::model_dir("tiny-chat");
    for concurrency in ["1", "16"] {
        let out = Command::new(common::shardline_bin())
            .args(["bench", "--model", model.to_str().unwrap(), "--device", "cuda", "--json"])
            .args("--prompt-len 16 --decode-tokens 4 --repeats 1 --concurrency".split(' '))
            .arg(concurrency)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let held = report["gpu_memory_in_use_bytes"][0].as_u64().unwrap();
        let predicted = report["gpu_memory_predicted_bytes"].as_u64().unwrap();
        assert!(
            held <= context + predicted + 16 * MIB as u64,
            "{concurrency} at once: {held} bytes held; plan expects {predicted} beside a {context}-byte context"
        );
    }
}
