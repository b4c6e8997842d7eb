//! Decode steps replayed as CUDA graphs: one launch a step, and the same
//! tokens as the step run op by op (seeded sampling with penalties and
//! biases whose adjustments outgrow a graph's first step buffer, so it is
//! recorded again); tiny-chat's 30 greedy answers exact from one batch
//! through the engine, whose shrinking batch replays graph after graph of
//! rows padded up to their bucket. The same split over two GPUs (TP=2,
//! NCCL in the graphs). Skips, saying so, where no GPU is visible.

mod common;

use common::engine::{assert_all_cases_exact, spawn, Recording};
use common::sampled;
use common::split::{shard_loader, worker_options};
use shardline::backend::cuda::{self, CudaBackend};
use shardline::config::ModelConfig;
use shardline::executor::{nccl_ids, nccl_transport, Executor, LocalExecutor, WorkerOptions, Workers};
use shardline::generation::{blocks_for, GenerateRequest, Generator, BLOCK_SIZE};
use shardline::model::BUCKETS;
use shardline::model_dir;
use shardline::parallel::Layout;
use shardline::sampling::SamplingParams;
use std::sync::{Mutex, MutexGuard};

/// Launches and step times are counted process-wide: one test at a time here.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// This test's turn, where a GPU is visible (after another's failure too).
fn gpu_test() -> Option<MutexGuard<'static, ()>> {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|failed| failed.into_inner());
    common::gpu_visible().then_some(turn)
}

fn executor(name: &str, num_blocks: usize, graphs: bool) -> LocalExecutor<CudaBackend> {
    let model = model_dir::open(common::poisoned_gpu(0), &common::options(&common::model_dir(name)))
        .unwrap()
        .model;
    LocalExecutor::with_graphs(model, num_blocks, BLOCK_SIZE, graphs).unwrap()
}

/// Every sampling rule at once (tests/common/sampled.rs) without logprobs,
/// which need the logits and so run op by op: 70 tokens of penalties over
/// a 9-token prompt, past a graph's first 64 adjustments a row.
fn penalized(prompt: &[u32]) -> GenerateRequest {
    let request = sampled::request(prompt, 70);
    GenerateRequest {
        sampling: SamplingParams {
            logprobs: None,
            ..request.sampling.clone()
        },
        ..request
    }
}

/// Rank `r` on GPU `r`.
fn own_gpu(rank: usize) -> CudaBackend {
    common::poisoned_gpu(rank)
}

/// `name` split tp=2 over GPUs 0 and 1 through NCCL, `num_blocks` KV blocks.
fn split_over_nccl(name: &str, num_blocks: usize, graphs: bool) -> Workers {
    let layout = Layout { tp: 2, pp: 1 };
    let config = ModelConfig::from_file(&common::model_dir(name).join("config.json")).unwrap();
    let options = WorkerOptions {
        graphs,
        ..worker_options(layout, None, num_blocks)
    };
    let transport = nccl_transport(layout, nccl_ids(layout).unwrap());
    Workers::spawn(config, options, shard_loader(name, own_gpu), transport).unwrap()
}

/// The penalized and the greedy request over tiny-gqa's prompt 1, run with
/// and without graphs on `start(num_blocks, graphs)`'s executor: the same
/// tokens, and each graphed decode step `replays` launches (one a rank).
fn graphed_tokens_are_the_eager_ones(replays: u64, start: impl Fn(usize, bool) -> Box<dyn Executor>) {
    let prompt = common::Reference::open("tiny-gqa").ids("prompt1.input_ids");
    let greedy = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..penalized(&prompt)
    };
    for request in [penalized(&prompt), greedy] {
        let blocks = blocks_for(prompt.len() + request.max_tokens);
        // The tokens, the launches queued between one token's arrival and
        // the next, and whether the executor looks a step ahead.
        let run = |graphs: bool| {
            let executor = start(blocks, graphs);
            let looks_ahead = executor.lookahead();
            let mut generator = Generator::with_executor(executor, blocks);
            let mut seen = Vec::new();
            let tokens = generator
                .generate(&request, |_| seen.push(cuda::activity().launches))
                .unwrap()
                .tokens;
            let ids: Vec<u32> = tokens.iter().map(|t| t.token_id).collect();
            (ids, seen.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(), looks_ahead)
        };
        let (eager, eager_steps, _) = run(false);
        let before = cuda::recorded_graphs();
        let (graphed, graphed_steps, looks_ahead) = run(true);
        assert_eq!(graphed, eager, "{:?}: graphed tokens", request.sampling);
        assert_kernels_follow_programmatically(before, replays == 1);
        let decode_steps = request.max_tokens as u64 - 1;
        if replays > 1 {
            // A split's ranks launch on their own threads as their jobs
            // come, so a window between two arrivals holds about one
            // step's launches; over all of them, the decode steps' less
            // at most the first one's (queued ahead of the first token),
            // plus at most the prefill's last ops on a rank that does not
            // report (they may follow the first token).
            let (graphed, eager) = (graphed_steps.iter().sum::<u64>(), eager_steps.iter().sum::<u64>());
            assert!(
                (replays * (decode_steps - 1)..=replays * decode_steps + 7 * 4 + 4).contains(&graphed),
                "launches over the graphed decode steps: {graphed_steps:?}"
            );
            assert!(
                eager >= (7 * 4 + 4) * (decode_steps - 1),
                "launches over the eager decode steps: {eager_steps:?}"
            );
            continue;
        }
        // Planned ahead (penalties too, which count the coming token on the
        // device), a step goes to the device before the token before it
        // arrives: the last token's step was queued before the one before it came.
        let (graphed_steps, last) = graphed_steps.split_at(request.max_tokens - 1 - looks_ahead as usize);
        assert_eq!(
            last,
            if looks_ahead { &[0][..] } else { &[] },
            "launches after the last step: {last:?}"
        );
        assert!(
            graphed_steps.iter().all(|&n| n == replays),
            "launches per graphed decode step: {graphed_steps:?}"
        );
        // At least one rank's 5 ops for each of tiny-gqa's 4 layers and 4 more.
        let eager_steps = &eager_steps[..request.max_tokens - 1 - looks_ahead as usize];
        assert!(
            eager_steps.iter().all(|&n| n >= 5 * 4 + 4),
            "launches per eager decode step: {eager_steps:?}"
        );
    }
}

/// The graphs recorded since `before` hold no allocation or free (their
/// activations are ranges of the arena). `all`: each kernel after a
/// graph's first follows a kernel, programmatically (no NCCL or cuBLAS
/// kernel, launched as usual, is among them, nor the memset of a buffer
/// NCCL gathers into); else some kernels do.
fn assert_kernels_follow_programmatically(before: cuda::GraphCensus, all: bool) {
    let now = cuda::recorded_graphs();
    let (graphs, kernels, memory) = (now.graphs - before.graphs, now.kernels - before.kernels, now.memory - before.memory);
    let (kernel_edges, edges) = (
        now.kernel_edges - before.kernel_edges,
        now.programmatic_edges - before.programmatic_edges,
    );
    assert!(graphs >= 1 && kernels > graphs, "{graphs} graphs of {kernels} kernels");
    assert_eq!(memory, 0, "allocations and frees in the graphs");
    match all {
        true => {
            assert_eq!(
                kernel_edges,
                kernels - graphs,
                "kernel-to-kernel edges in {graphs} graphs of {kernels} kernels"
            );
            assert_eq!(edges, kernel_edges, "programmatic edges");
        }
        false => assert!(edges > 0 && edges < kernel_edges, "{edges} of {kernel_edges} edges programmatic"),
    }
}

#[test]
fn a_graphed_decode_step_is_one_launch_and_picks_the_eager_tokens() {
    let Some(_one) = gpu_test() else { return };
    graphed_tokens_are_the_eager_ones(1, |blocks, graphs| Box::new(executor("tiny-gqa", blocks, graphs)));
}

#[test]
fn thirty_greedy_answers_through_graphs_of_every_bucket_are_exact() {
    let Some(_one) = gpu_test() else { return };
    let loaded = model_dir::open(common::poisoned_gpu(0), &common::options(&common::model_dir("tiny-chat"))).unwrap();
    let executor = LocalExecutor::with_graphs(loaded.model, 512, BLOCK_SIZE, true).unwrap();
    assert!(BUCKETS.contains(&32) && BUCKETS.contains(&1));
    // Each decode step replays with the tokens of the step before still on the device.
    let executor = Recording::new(Box::new(executor));
    let handed = executor.handed.clone();
    let before = cuda::recorded_graphs();
    let handle = spawn(Box::new(executor), loaded.tokenizer, 512, 64);
    assert_all_cases_exact(&handle);
    // Buckets past 8 rows multiply through cuBLAS, whose kernels are
    // launched as usual.
    assert_kernels_follow_programmatically(before, false);
    let handed = handed.lock().unwrap();
    let (ahead, steps) = (handed.ahead(), handed.batches.len());
    assert!(2 * ahead > steps && handed.most_in_flight == 2, "{ahead} of {steps} steps ahead");
}

#[test]
fn split_over_two_gpus_the_graphs_hold_nccl_and_give_the_eager_tokens_and_answers() {
    let Some(_one) = gpu_test() else { return };
    if cuda::gpu_count() < 2 {
        eprintln!("skipped: TP over NCCL needs 2 GPUs, {} visible", cuda::gpu_count());
        return;
    }
    graphed_tokens_are_the_eager_ones(2, |blocks, graphs| Box::new(split_over_nccl("tiny-gqa", blocks, graphs)));
    let tokenizer = common::load("tiny-chat").tokenizer;
    let handle = spawn(Box::new(split_over_nccl("tiny-chat", 512, true)), tokenizer, 512, 64);
    assert_all_cases_exact(&handle);
}

/// With step timing on, each step (here each fetches its ids) is timed by
/// the device's clock from its inputs' copy to its ids' copy, and every
/// step after the first has its gap since the one before; with it off,
/// nothing is recorded. Op by op and replayed alike.
#[test]
fn step_timing_reads_each_steps_span_and_the_gaps_between_off_the_device() {
    let Some(_one) = gpu_test() else { return };
    let prompt = common::Reference::open("tiny-gqa").ids("prompt1.input_ids");
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        max_tokens: 6,
        ..penalized(&prompt)
    };
    let blocks = blocks_for(prompt.len() + request.max_tokens);
    for graphs in [false, true] {
        let mut generator = Generator::with_executor(Box::new(executor("tiny-gqa", blocks, graphs)), blocks);
        // Untimed first (which also records the graph).
        let before = cuda::device_time();
        let untimed = generator.generate(&request, |_| {}).unwrap().tokens;
        assert_eq!(cuda::device_time(), before, "graphs={graphs}: timing off records nothing");
        cuda::time_steps(true);
        let before = cuda::device_time();
        generator.reset();
        let timed = generator.generate(&request, |_| {});
        cuda::time_steps(false);
        let run = cuda::device_time().since(before);
        assert_eq!(timed.unwrap().tokens, untimed, "graphs={graphs}: timing changes no token");
        assert_eq!((run.steps, run.gaps), (6, 5), "graphs={graphs}: a prefill and five decode steps");
        assert!(!run.busy.is_zero(), "graphs={graphs}: {run:?}");
        assert!((0.0..1.0).contains(&run.idle_fraction()), "graphs={graphs}: {run:?}");
    }
}
