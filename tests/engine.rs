//! The continuous-batching engine on tiny-chat against the Hugging Face
//! references: every greedy answer is exact when all 30 run in one batch,
//! alone or under a KV cache so small that sequences are preempted and
//! recomputed; seeded samples do not depend on their batch; stop strings,
//! aborts, refusals and prefix-cache hits behave; each decode step is
//! submitted before the last one's tokens are back, and the penalties of
//! its rows count the tokens it has not seen on the device.

mod common;

use common::engine::{assert_all_cases_exact, cases, collect, ids, request, spawn, Handed, Recording};
use common::sampled;
use shardline::backend::PREVIOUS_SAMPLE;
use shardline::engine::request::{Event, FinishReason, StopReason};
use shardline::engine::EngineHandle;
use shardline::executor::{Executor, LocalExecutor};
use shardline::model::{ForwardBatch, Sampling};
use shardline::sampling::{RowSampling, SamplingParams};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

fn engine(num_kv_blocks: usize, max_num_seqs: usize) -> EngineHandle {
    let loaded = common::load("tiny-chat");
    let executor = LocalExecutor::new(loaded.model, num_kv_blocks, 16).unwrap();
    spawn(Box::new(executor), loaded.tokenizer, num_kv_blocks, max_num_seqs)
}

#[test]
fn thirty_greedy_answers_in_one_batch_are_each_exact() {
    let handle = engine(512, 64);
    assert_all_cases_exact(&handle);
    assert_eq!(handle.stats().preemptions.load(Ordering::Relaxed), 0);
}

#[test]
fn a_tiny_kv_cache_preempts_and_every_answer_is_still_exact() {
    // 12 blocks of 16 tokens: a few sequences at a time, so most wait or are preempted.
    let handle = engine(12, 64);
    assert_all_cases_exact(&handle);
    assert!(handle.stats().preemptions.load(Ordering::Relaxed) > 0, "no preemption happened");
    wait_until_idle(&handle, 12);
}

/// Waits until nothing runs and every block is free (the engine frees a
/// sequence right after sending its last event).
fn wait_until_idle(handle: &EngineHandle, total_blocks: usize) {
    let stats = handle.stats();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats.running.load(Ordering::Relaxed) > 0 || stats.free_blocks.load(Ordering::Relaxed) < total_blocks {
        assert!(std::time::Instant::now() < deadline, "requests still hold blocks");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn seeded_sampling_gives_the_same_text_whatever_else_is_in_the_batch() {
    let prompt = ids(&cases()[4]["prompt_ids"]);
    let seeded = SamplingParams {
        temperature: 1.3,
        top_p: 0.95,
        seed: Some(11),
        ..SamplingParams::greedy()
    };
    let alone = collect(engine(512, 64).submit(request(prompt.clone(), seeded.clone(), 24)).1)
        .unwrap()
        .ids;
    let handle = engine(512, 64);
    let noise: Vec<_> = (0..6)
        .map(|i| {
            let other = SamplingParams {
                temperature: 1.0,
                seed: Some(i),
                ..SamplingParams::greedy()
            };
            handle.submit(request(ids(&cases()[i as usize]["prompt_ids"]), other, 30)).1
        })
        .collect();
    let batched = collect(handle.submit(request(prompt, seeded, 24)).1).unwrap().ids;
    noise.into_iter().for_each(|rx| drop(collect(rx)));
    assert_eq!(alone, batched);
}

#[test]
fn a_stop_string_ends_generation_and_is_not_in_the_text() {
    let case = &cases()[0]; // "Tensor parallelism splits every weight matrix across GPUs, ..."
    let mut req = request(ids(&case["prompt_ids"]), SamplingParams::greedy(), 96);
    req.stop.stop_strings = vec![" across".into()];
    let out = collect(engine(512, 64).submit(req).1).unwrap();
    assert_eq!(out.text, "Tensor parallelism splits every weight matrix");
    assert_eq!(out.finished.reason, FinishReason::Stop);
    assert_eq!(out.finished.stop_reason, Some(StopReason::String(" across".into())));
}

#[test]
fn max_tokens_ends_with_length() {
    let out = collect(
        engine(512, 64)
            .submit(request(ids(&cases()[0]["prompt_ids"]), SamplingParams::greedy(), 5))
            .1,
    )
    .unwrap();
    assert_eq!(out.ids, ids(&cases()[0]["completion_ids"])[..5]);
    assert_eq!(out.finished.reason, FinishReason::Length);
}

#[test]
fn dropping_the_receiver_aborts_and_frees_the_blocks() {
    let handle = engine(64, 64);
    let mut req = request(ids(&cases()[0]["prompt_ids"]), SamplingParams::greedy(), 500);
    req.stop.ignore_eos = true;
    let (_, mut rx) = handle.submit(req);
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    drop(rx);
    wait_until_idle(&handle, 64);
}

#[test]
fn requests_that_can_never_fit_are_refused_up_front() {
    let handle = engine(8, 64); // 128 tokens of KV cache
    let prompt = ids(&cases()[0]["prompt_ids"]);
    let err = collect(handle.submit(request(prompt.clone(), SamplingParams::greedy(), 200)).1)
        .err()
        .unwrap();
    assert_eq!(err, "max_tokens 200 + prompt 31 tokens exceeds the KV cache's 128 tokens");
    let err = collect(handle.submit(request(prompt, SamplingParams::greedy(), 5000)).1)
        .err()
        .unwrap();
    assert!(err.contains("exceeds the model's 4096-token context"), "{err}");
    let err = collect(handle.submit(request(vec![], SamplingParams::greedy(), 5)).1)
        .err()
        .unwrap();
    assert_eq!(err, "the prompt is empty");
}

#[test]
fn a_shared_system_prompt_is_served_from_the_prefix_cache() {
    let handle = engine(512, 64);
    // Both start with the default system prompt: 16 identical tokens, one full block.
    let (a, b) = (ids(&cases()[0]["prompt_ids"]), ids(&cases()[1]["prompt_ids"]));
    assert_eq!(a[..16], b[..16]);
    let first = collect(handle.submit(request(a, SamplingParams::greedy(), 96)).1).unwrap();
    let second = collect(handle.submit(request(b, SamplingParams::greedy(), 96)).1).unwrap();
    assert_eq!(first.finished.cached_tokens, 0);
    assert_eq!(second.finished.cached_tokens, 16, "the first block of the shared system prompt");
    assert_eq!(second.ids, ids(&cases()[1]["completion_ids"]));
}

/// The engine over tiny-chat, noting what it hands the executor.
fn recorded() -> (EngineHandle, Arc<Mutex<Handed>>) {
    let loaded = common::load("tiny-chat");
    let executor = Recording::new(Box::new(LocalExecutor::new(loaded.model, 512, 16).unwrap()));
    let handed = executor.handed.clone();
    (spawn(Box::new(executor), loaded.tokenizer, 512, 64), handed)
}

#[test]
fn each_decode_step_goes_to_the_device_before_the_last_ones_token_is_back() {
    let case = &cases()[0];
    let (handle, handed) = recorded();
    let out = collect(handle.submit(request(ids(&case["prompt_ids"]), SamplingParams::greedy(), 96)).1).unwrap();
    assert_eq!(out.ids, ids(&case["completion_ids"]));
    assert_eq!(out.finished.reason, FinishReason::Stop);
    let handed = handed.lock().unwrap();
    assert_eq!(handed.most_in_flight, 2);
    // The prefill, then a step for each token after it, each taking the
    // token before from the device; the EOS is seen a step late, so the
    // step past it is wasted.
    assert_eq!((handed.batches.len(), handed.ahead()), (out.ids.len() + 1, out.ids.len()));
}

#[test]
fn a_length_stop_is_known_ahead_and_wastes_no_step() {
    let case = &cases()[0];
    let (handle, handed) = recorded();
    let out = collect(handle.submit(request(ids(&case["prompt_ids"]), SamplingParams::greedy(), 5)).1).unwrap();
    assert_eq!(out.ids, ids(&case["completion_ids"])[..5]);
    let handed = handed.lock().unwrap();
    assert_eq!((handed.batches.len(), handed.ahead()), (5, 4));
}

#[test]
fn a_penalized_request_is_planned_ahead_and_picks_what_the_host_picks() {
    let prompt = ids(&cases()[0]["prompt_ids"]);
    let mut generate = sampled::request(&prompt, 12);
    // Tokens generated so far are favoured, the one still on the device too.
    generate.sampling.frequency_penalty = -50.0;
    let want: Vec<u32> = sampled::by_host(common::generator("tiny-chat", 512 * 16), &generate)
        .iter()
        .map(|t| t.token_id)
        .collect();
    let (handle, handed) = recorded();
    let mut req = request(prompt, generate.sampling, 12);
    req.stop.ignore_eos = true;
    let out = collect(handle.submit(req).1).unwrap();
    assert_eq!(out.ids, want);
    let handed = handed.lock().unwrap();
    assert_eq!((handed.batches.len(), handed.ahead(), handed.most_in_flight), (12, 11, 2));
}

#[test]
fn a_step_naming_a_token_no_step_sampled_is_refused() {
    let loaded = common::load("tiny-chat");
    let mut executor = LocalExecutor::new(loaded.model, 8, 16).unwrap();
    let err = executor
        .submit(ForwardBatch::single(&[PREVIOUS_SAMPLE | 3], 0, &[0], 16, false))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("takes row 3 of the previous step's tokens, which sampled 0"),
        "{err}"
    );
    // A row whose penalties count a coming token its step does not take.
    let mut counted = ForwardBatch::single(&[5], 0, &[0], 16, false);
    counted.sampling = Sampling::Model {
        rows: vec![RowSampling {
            coming: Some(0),
            ..RowSampling::greedy()
        }],
        logits: false,
    };
    let err = executor.submit(counted).unwrap_err();
    assert!(
        err.to_string()
            .contains("a row counts row 0 of the previous step's tokens, which no token of its step takes"),
        "{err}"
    );
}
