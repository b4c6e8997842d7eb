//! Decode steps replayed as CUDA graphs: one launch a step, and the same
//! tokens as the step run op by op (seeded sampling with penalties and
//! biases whose adjustments outgrow a graph's first step buffer, so it is
//! recorded again); tiny-chat's 30 greedy answers exact from one batch
//! through the engine, whose shrinking batch replays graph after graph of
//! rows padded up to their bucket. Skips, saying so, where no GPU is visible.

mod common;

use common::engine::{assert_all_cases_exact, spawn};
use shardline::backend::cuda::{self, CudaBackend};
use shardline::executor::{Executor, LocalExecutor};
use shardline::generation::{blocks_for, GenerateRequest, Generator, BLOCK_SIZE};
use shardline::model::BUCKETS;
use shardline::model_dir;
use shardline::sampling::SamplingParams;
use std::sync::Mutex;

/// Launches are counted process-wide: one test at a time here.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn executor(name: &str, num_blocks: usize, graphs: bool) -> LocalExecutor<CudaBackend> {
    let mut gpu = CudaBackend::new(0).expect("opening GPU 0");
    gpu.poison_outputs();
    let model = model_dir::open(gpu, &common::options(&common::model_dir(name))).unwrap().model;
    LocalExecutor::with_graphs(model, num_blocks, BLOCK_SIZE, graphs).unwrap()
}

/// Every sampling rule at once, without logprobs (which need the logits,
/// so run op by op): 70 tokens of repetition, presence and frequency
/// penalties over a 9-token prompt, past a graph's first 64 adjustments.
fn penalized(prompt: &[u32]) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens: 70,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.2,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            logit_bias: vec![(5, 1.0), (9, -2.0)],
            seed: Some(7),
            logprobs: None,
        },
        eos_token_ids: Vec::new(),
        ignore_eos: true,
    }
}

#[test]
fn a_graphed_decode_step_is_one_launch_and_picks_the_eager_tokens() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    if !common::gpu_visible() {
        return;
    }
    let prompt = common::Reference::open("tiny-gqa").ids("prompt1.input_ids");
    for request in [
        penalized(&prompt),
        GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..penalized(&prompt)
        },
    ] {
        let blocks = blocks_for(prompt.len() + request.max_tokens);
        // The tokens, and the launches each decode step queued (between
        // one token's arrival and the next).
        let run = |graphs: bool| {
            let mut generator = Generator::with_executor(Box::new(executor("tiny-gqa", blocks, graphs)), blocks);
            let mut seen = Vec::new();
            let tokens = generator
                .generate(&request, |_| seen.push(cuda::activity().launches))
                .unwrap()
                .tokens;
            let ids: Vec<u32> = tokens.iter().map(|t| t.token_id).collect();
            (ids, seen.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>())
        };
        let (eager, eager_steps) = run(false);
        let (graphed, graphed_steps) = run(true);
        assert_eq!(graphed, eager, "{:?}: graphed tokens", request.sampling);
        assert_eq!(graphed_steps.len(), request.max_tokens - 1);
        assert!(
            graphed_steps.iter().all(|&n| n == 1),
            "launches per graphed decode step: {graphed_steps:?}"
        );
        assert!(
            eager_steps.iter().all(|&n| n > 40),
            "launches per eager decode step: {eager_steps:?}"
        );
    }
}

#[test]
fn thirty_greedy_answers_through_graphs_of_every_bucket_are_exact() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    if !common::gpu_visible() {
        return;
    }
    let loaded = model_dir::open(CudaBackend::new(0).unwrap(), &common::options(&common::model_dir("tiny-chat"))).unwrap();
    let executor = LocalExecutor::with_graphs(loaded.model, 512, BLOCK_SIZE, true).unwrap();
    assert!(BUCKETS.contains(&32) && BUCKETS.contains(&1));
    let handle = spawn(Box::new(executor) as Box<dyn Executor>, loaded.tokenizer, 512, 64);
    assert_all_cases_exact(&handle);
}
