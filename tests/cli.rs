//! The `shardline` binary as a user runs it: `generate` streaming text and
//! `--json` output against the Hugging Face references, the errors a user can
//! trigger from the command line, and `bench`.

mod common;

use serde_json::Value;
use std::process::{Command, Output};

fn shardline(args: &[&str]) -> Output {
    Command::new(common::shardline_bin()).args(args).output().unwrap()
}

fn tiny_chat() -> String {
    common::model_dir("tiny-chat").display().to_string()
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `shardline generate --chat` of `question`, greedy, with `extra` flags.
fn generate_chat(question: &str, extra: &[&str]) -> Output {
    let model = tiny_chat();
    let mut args = vec!["generate", "--model", &model, "--chat", "--prompt", question, "--temperature", "0"];
    args.extend_from_slice(extra);
    shardline(&args)
}

fn reference_case(i: usize) -> Value {
    let path = common::repo().join("tests/fixtures/tiny-chat/reference.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["greedy_chat"][i].clone()
}

#[test]
fn generate_json_reports_the_reference_answer_with_logprobs() {
    let case = reference_case(0);
    let question = case["question"].as_str().unwrap();
    let out = generate_chat(question, &["--json", "--logprobs", "3"]);
    let report = json_of(&out);
    assert_eq!(report["prompt_ids"], case["prompt_ids"]);
    assert_eq!(report["completion_ids"], case["completion_ids"]);
    assert_eq!(report["text"], case["completion_text"]);
    assert_eq!(report["finish_reason"], "stop");
    let logprobs = report["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), case["completion_ids"].as_array().unwrap().len());
    for (entry, id) in logprobs.iter().zip(case["completion_ids"].as_array().unwrap()) {
        assert_eq!(&entry["token_id"], id);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy picks the most likely token, so it heads the list with its own logprob.
        assert_eq!(&top[0][0], id);
        assert_eq!(top[0][1], entry["logprob"]);
        assert!(top.windows(2).all(|w| w[0][1].as_f64() >= w[1][1].as_f64()));
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert!(report["timings"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let case = reference_case(3);
    let out = generate_chat(case["question"].as_str().unwrap(), &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", case["completion_text"].as_str().unwrap())
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("time to first token") && stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn generate_from_prompt_ids_reproduces_the_reference_greedy_ids() {
    let reference = common::Reference::open("tiny-gqa");
    let ids: Vec<String> = reference.ids("prompt1.input_ids").iter().map(u32::to_string).collect();
    let dir = common::model_dir("tiny-gqa").display().to_string();
    let out = shardline(&[
        "generate",
        "--model",
        &dir,
        "--prompt-ids",
        &ids.join(","),
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "32",
        "--json",
    ]);
    let report = json_of(&out);
    let got: Vec<u32> = serde_json::from_value(report["completion_ids"].clone()).unwrap();
    assert_eq!(got, reference.ids("prompt1.greedy_ids"));
    assert_eq!(report["finish_reason"], "length");
    assert_eq!(report["text"], Value::Null);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let run = |seed: &str| {
        let args = [
            "generate",
            "--model",
            &tiny_chat(),
            "--prompt",
            "Once upon",
            "--temperature",
            "1.5",
            "--top-k",
            "0",
            "--top-p",
            "1",
        ];
        json_of(&shardline(
            &[&args[..], &["--seed", seed, "--max-tokens", "12", "--ignore-eos", "--json"]].concat(),
        ))["completion_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
}

fn assert_fails_with(args: &[&str], message: &str) {
    let out = shardline(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr}");
}

#[test]
fn bad_command_lines_fail_with_clear_messages() {
    let chat = tiny_chat();
    let gqa = common::model_dir("tiny-gqa").display().to_string();
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--temperature", "-1"],
        "--temperature must be 0 (greedy) or positive",
    );
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--top-p", "0"],
        "--top-p must be in (0, 1]",
    );
    assert_fails_with(
        &["generate", "--model", &gqa, "--prompt", "hi"],
        "no tokenizer.json, so it takes --prompt-ids",
    );
    assert_fails_with(
        &["generate", "--model", &gqa, "--prompt-ids", "1,5000"],
        "token id 5000 is outside the model's vocabulary of 1024",
    );
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--max-tokens", "5000"],
        "max_tokens 5000 + prompt 1 tokens exceeds the model's 4096-token context",
    );
    assert_fails_with(&["generate", "--model", &chat], "--prompt");
    assert_fails_with(&["generate", "--model", &chat, "--prompt", ""], "the prompt is empty");
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--max-tokens", "0"],
        "max_tokens must be at least 1",
    );
    assert_fails_with(&["generate", "--model", "/no/such/model", "--prompt", "hi"], "no such model folder");
    assert_fails_with(&["generate", "--model", &chat, "--prompt-ids", "1,x"], "invalid value 'x'");
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--inject-worker-panic", "1"],
        "expected RANK:STEP",
    );
    let serve = ["serve", "--model", &chat, "--port", "0", "--device", "cpu"];
    assert_fails_with(
        &[&serve[..], &["--gpu-memory-utilization", "0"]].concat(),
        "--gpu-memory-utilization must be within (0, 1], got 0",
    );
    assert_fails_with(
        &[&serve[..], &["--max-model-len", "5000"]].concat(),
        "--max-model-len 5000 must be within 1..=4096, the model's max_position_embeddings",
    );
    // tiny-chat's f32 KV cache on the CPU: 4 layers × K and V × 2 heads × 32 × 4 bytes a token.
    assert_fails_with(
        &[&serve[..], &["--kv-cache-memory", "16KiB"]].concat(),
        "--kv-cache-memory 16384 bytes holds no 16-token block of KV cache (32768 bytes each",
    );
    let two_nodes = ["generate", "--model", &chat, "--prompt", "hi", "--tp", "2", "--nnodes", "2"];
    assert_fails_with(
        &[&two_nodes[..], &["--device", "cpu"]].concat(),
        "every node needs a GPU (--device cuda)",
    );
    assert_fails_with(
        &[&two_nodes[..], &["--node-rank", "1", "--device", "cpu"]].concat(),
        "every node needs a GPU (--device cuda)",
    );
    assert_fails_with(
        &[&two_nodes[..], &["--node-rank", "2"]].concat(),
        "--node-rank 2 must be below --nnodes 2",
    );
    assert_fails_with(
        &["generate", "--model", &chat, "--prompt", "hi", "--nnodes", "2"],
        "1 ranks do not divide over 2 nodes",
    );
    if shardline::backend::cuda::gpu_count() == 0 {
        assert_fails_with(
            &["generate", "--model", &chat, "--prompt", "hi", "--device", "cuda"],
            "--device cuda: no CUDA GPU found",
        );
        assert_fails_with(
            &["bench", "--model", &chat, "--kernels"],
            "--kernels times CUDA kernels: no CUDA GPU found",
        );
    }
    assert_fails_with(&["bench", "--model", &chat, "--kernels", "--requests", "4"], "cannot be used with");
    assert_fails_with(
        &["bench", "--model", &chat, "--concurrency", "2", "--repetition-penalty", "0"],
        "--repetition-penalty must be positive, got 0",
    );
    for zero in ["--context", "--decode-tokens"] {
        assert_fails_with(
            &["bench", "--model", &chat, "--kernels", zero, "0"],
            "--prompt-len, --decode-tokens, --repeats and --context must be positive",
        );
    }
}

#[test]
fn bench_reports_speeds_and_the_bandwidth_fraction() {
    let out = shardline(&[
        "bench",
        "--model",
        &tiny_chat(),
        "--prompt-len",
        "16",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]);
    let report = json_of(&out);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "memory_bandwidth_gb_per_s",
        "decode_fraction_of_limit",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    // Kernel counts come from the CUDA backend; the CPU has none to give.
    let launches = &report["kernel_launches_per_decode_step"];
    match report["device"].as_str() {
        Some("cpu") => assert!(launches.is_null(), "{report}"),
        _ => assert!(
            launches.as_f64().unwrap() > 0.0 && report["host_us_per_decode_step"].as_f64().unwrap() > 0.0,
            "{report}"
        ),
    }
    // tiny-chat streams its tied 151,936 × 64 bf16 embedding as the LM head each step.
    assert!(report["weight_bytes_per_token"].as_u64().unwrap() > 151_936 * 64 * 2);
    assert_eq!(report["sampling"]["temperature"], 0.0, "greedy unless asked: {report}");
}

/// `bench --requests` runs the workload the transformers peer computes
/// from the same seed, and refuses lengths it cannot run.
#[test]
fn bench_requests_reports_throughput_over_the_peers_workload() {
    let chat = tiny_chat();
    let lens = ["--prompt-lens", "3-40", "--output-lens", "2-9", "--seed", "5"];
    // Qwen2.5-Instruct's sampling, which `serve` applies by default.
    let qwen = [
        "--temperature",
        "0.7",
        "--top-k",
        "20",
        "--top-p",
        "0.8",
        "--repetition-penalty",
        "1.05",
    ];
    let out = shardline(&[&["bench", "--model", &chat, "--requests", "6", "--json"][..], &lens, &qwen].concat());
    let report = json_of(&out);
    assert!(report["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{report}");
    let sampling = &report["sampling"];
    assert_eq!(
        (sampling["top_k"].as_u64(), sampling["repetition_penalty"].as_f64()),
        (Some(20), Some(1.05f32 as f64))
    );
    let peer = Command::new("python3")
        .current_dir(common::repo().join("benches"))
        .args(["-c", "import hf_gpu_peer as h; w = h.workload(5, 6, h.lengths('3-40'), h.lengths('2-9')); print(sum(p for p, _ in w), sum(o for _, o in w))"])
        .output()
        .unwrap();
    let peer = String::from_utf8(peer.stdout).unwrap();
    assert_eq!(peer.trim(), format!("{} {}", report["prompt_tokens"], report["output_tokens"]));
    let bench = ["bench", "--model", &chat, "--requests"];
    assert_fails_with(
        &[&bench[..], &["2", "--prompt-lens", "9-3"]].concat(),
        "want N or MIN-MAX with 0 < MIN <= MAX",
    );
    assert_fails_with(&[&bench[..], &["0"]].concat(), "--requests must be positive");
    assert_fails_with(
        &[&bench[..], &["2", "--prompt-lens", "4000", "--output-lens", "200"]].concat(),
        "a request of 4000 prompt + 200 output tokens exceeds the model's 4096-token context",
    );
    assert_fails_with(&[&bench[..], &["2", "--concurrency", "2"]].concat(), "cannot be used with");
}

#[test]
fn plan_shows_qwen_72b_needs_two_80_gib_gpus_in_bf16() {
    let config = common::repo().join("configs/models/qwen2.5-72b.json");
    let config = config.to_str().unwrap();
    let run = |gpus: &str| {
        json_of(&shardline(&[
            "plan",
            "--model",
            config,
            "--gpus",
            gpus,
            "--gpu-memory-gib",
            "80",
            "--json",
        ]))
    };
    let one = run("1");
    let layouts = one["layouts"].as_array().unwrap();
    let bf16 = layouts
        .iter()
        .find(|l| l["dtype"] == "bf16" && l["tp"] == 1 && l["pp"] == 1)
        .unwrap();
    assert_eq!(bf16["fits"], false);
    for key in ["weight_bytes_per_gpu", "kv_bytes_per_token", "max_kv_tokens"] {
        assert!(bf16[key].is_u64(), "{key} missing: {bf16}");
    }
    assert!(one["recommended"].is_null());
    let two = run("2");
    let recommended = &two["recommended"];
    assert_eq!((recommended["tp"].as_u64(), recommended["pp"].as_u64()), (Some(2), Some(1)));
    assert_eq!(recommended["dtype"], "bf16");
    assert_eq!(recommended["fits"], true);
    // The table names the recommendation too.
    let table = shardline(&["plan", "--model", config, "--gpus", "2", "--gpu-memory-gib", "80"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("recommended: --tp 2 --pp 1 with bf16 weights"));
    assert_fails_with(
        &["plan", "--model", config, "--gpus", "0", "--gpu-memory-gib", "80"],
        "--gpus must be at least 1",
    );
    assert_fails_with(
        &[
            "plan",
            "--model",
            config,
            "--gpus",
            "2",
            "--gpu-memory-gib",
            "80",
            "--gpu-memory-utilization",
            "1.5",
        ],
        "--gpu-memory-utilization within 0..1",
    );
}

#[test]
fn an_impossible_split_is_a_startup_error_naming_the_dimension() {
    // tiny-chat has 2 attention heads and 4 layers.
    let out = shardline(&["serve", "--model", &tiny_chat(), "--port", "0", "--tp", "4"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tp=4 does not divide num_attention_heads=2; tp may be one of [1, 2]"),
        "{stderr}"
    );
    let out = shardline(&["serve", "--model", &tiny_chat(), "--port", "0", "--pp", "2", "--pp-layers", "3,2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pp-layers [3, 2] must give 2 positive counts summing to num_hidden_layers=4"));
}

#[test]
fn generate_and_bench_split_over_ranks_give_the_reference() {
    let case = reference_case(3);
    for (tp, pp) in [("2", "1"), ("1", "2"), ("2", "2")] {
        let out = generate_chat(case["question"].as_str().unwrap(), &["--json", "--tp", tp, "--pp", pp]);
        let report = json_of(&out);
        assert_eq!(report["completion_ids"], case["completion_ids"], "tp={tp} pp={pp}");
    }
    let bench = json_of(&shardline(&[
        "bench",
        "--model",
        &tiny_chat(),
        "--tp",
        "2",
        "--pp",
        "2",
        "--prompt-len",
        "8",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]));
    assert_eq!((bench["tp"].as_u64(), bench["pp"].as_u64()), (Some(2), Some(2)));
    assert!(bench["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}
