//! Tensor and pipeline parallelism on the CPU backend, through the worker
//! threads (one per rank, talking through the in-process communicator):
//! every layout the fixtures allow gives the Hugging Face reference logits
//! (within 1e-4 relative) and the same greedy ids as the reference, and
//! the model's sampling gives the host sampler's tokens in every layout;
//! split over TP ranks, the engine plans each step ahead (every rank keeps
//! the tokens it sampled) and all 30 chat answers stay exact.

mod common;

use common::engine::{assert_all_cases_exact, spawn, Recording};
use common::sampled;
use common::split::{check_split, layouts, spawn_split, Accuracy};
use common::Reference;
use shardline::backend::cpu::CpuBackend;
use shardline::generation::{Generator, BLOCK_SIZE};
use shardline::parallel::Layout;

fn check(name: &str, layout: Layout, pp_layers: Option<&[usize]>) {
    check_split(name, layout, pp_layers, |_| CpuBackend::default(), Accuracy::F32);
}

#[test]
fn tiny_gqa_every_layout_matches_hf() {
    let all = layouts("tiny-gqa");
    assert_eq!(all.len(), 7, "tiny-gqa (4 heads, 2 KV heads, 4 layers) allows every listed layout");
    for layout in all {
        check("tiny-gqa", layout, None);
    }
}

#[test]
fn tiny_mqa128_replicates_its_one_kv_head_and_splits_six_layers_unevenly() {
    let all = layouts("tiny-mqa128");
    assert!(all.contains(&Layout { tp: 2, pp: 1 }) && !all.contains(&Layout { tp: 4, pp: 1 }));
    for layout in all {
        check("tiny-mqa128", layout, None);
    }
    check("tiny-mqa128", Layout { tp: 1, pp: 2 }, Some(&[5, 1]));
}

#[test]
fn tiny_chat_every_layout_matches_hf_over_the_full_vocabulary() {
    let all = layouts("tiny-chat");
    // 2 heads: tp 4 is out; 4 layers allow up to 4 stages.
    assert_eq!(all.len(), 6);
    for layout in all {
        check("tiny-chat", layout, None);
    }
}

/// The model's sampling (on the last stage, after gathering a TP split's
/// vocabulary slices) picks the host sampler's tokens from the whole
/// model's logits.
#[test]
fn the_model_samples_what_the_host_sampler_picks_in_every_layout() {
    let name = "tiny-gqa";
    let request = sampled::request(&Reference::open(name).ids("prompt0.input_ids"), 24);
    let num_kv_blocks = sampled::blocks(&request);
    let capacity = num_kv_blocks * BLOCK_SIZE;
    let want = sampled::by_host(common::generator(name, capacity), &request);
    for layout in layouts(name) {
        let executor = spawn_split(name, layout, None, |_| CpuBackend::default(), num_kv_blocks);
        let got = sampled::by_model(Generator::with_executor(executor, num_kv_blocks), &request);
        sampled::assert_same(&got, &want, &format!("tp={} pp={}", layout.tp, layout.pp));
    }
}

#[test]
fn split_over_tp_ranks_the_engine_plans_ahead_and_over_stages_it_fills_the_pipeline() {
    for (layout, ahead) in [(Layout { tp: 2, pp: 1 }, true), (Layout { tp: 1, pp: 2 }, false)] {
        let executor = Recording::new(spawn_split("tiny-chat", layout, None, |_| CpuBackend::default(), 512));
        let handed = executor.handed.clone();
        let handle = spawn(Box::new(executor), common::load("tiny-chat").tokenizer, 512, 64);
        assert_all_cases_exact(&handle);
        let handed = handed.lock().unwrap();
        let (planned, steps) = (handed.ahead(), handed.batches.len());
        assert_eq!(
            2 * planned > steps,
            ahead,
            "tp={} pp={}: {planned} of {steps} steps ahead",
            layout.tp,
            layout.pp
        );
        assert_eq!(handed.most_in_flight, 2, "tp={} pp={}", layout.tp, layout.pp);
    }
}
