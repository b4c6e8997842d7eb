//! Tensor and pipeline parallelism on the CPU backend, one thread per rank
//! talking through the in-process communicator: every layout the fixtures
//! allow gives the Hugging Face reference logits (within 1e-4 relative) and
//! the same greedy ids as the reference.

mod common;

use common::{assert_rows_close, prompt_keys, Reference};
use shardline::backend::cpu::CpuBackend;
use shardline::config::ModelConfig;
use shardline::loader::SafetensorsCheckpoint;
use shardline::model::{Collectives, ForwardBatch, Qwen2ForCausalLM, Shard};
use shardline::parallel::{in_process_group, InProcessComm, Layout};
use shardline::sampling::argmax;
use std::sync::{Arc, Barrier, Mutex};

const TOLERANCE: f64 = 1e-4;
const BLOCK: usize = 16;
const BLOCKS: usize = 16;

/// What the last stage's first TP rank saw: the prompt's logits at every
/// position, and the greedy continuation.
struct Output {
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

/// Runs `prompt` and `steps` greedy decode steps through a `layout` split
/// of fixture `name`, each rank on its own thread.
fn run_split(name: &str, layout: Layout, pp_layers: Option<&[usize]>, prompt: &[u32], steps: usize) -> Output {
    let dir = common::model_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    layout.validate(&config).unwrap();
    let stages = layout.stage_layers(&config, pp_layers).unwrap();
    let Layout { tp, pp } = layout;
    let mut tp_groups: Vec<Vec<Option<InProcessComm>>> = (0..pp).map(|_| in_process_group(tp).into_iter().map(Some).collect()).collect();
    let mut pp_groups: Vec<Vec<Option<InProcessComm>>> = (0..tp).map(|_| in_process_group(pp).into_iter().map(Some).collect()).collect();
    let next_token = Arc::new(Mutex::new(Vec::<u32>::new()));
    let step_done = Arc::new(Barrier::new(tp * pp));
    let mut threads = Vec::new();
    for rank in 0..tp * pp {
        let (stage, tp_rank) = (rank / tp, rank % tp);
        let shard = Shard {
            tp_rank,
            tp,
            layers: stages[stage].clone(),
            first_stage: stage == 0,
            last_stage: stage == pp - 1,
        };
        let tp_comm = tp_groups[stage][tp_rank].take().unwrap();
        let pp_comm = pp_groups[tp_rank][stage].take().unwrap();
        let (dir, config, prompt) = (dir.clone(), config.clone(), prompt.to_vec());
        let (next_token, step_done) = (next_token.clone(), step_done.clone());
        threads.push(std::thread::spawn(move || {
            let source = SafetensorsCheckpoint::open(&dir).unwrap();
            let model = Qwen2ForCausalLM::load_shard(CpuBackend, config, &source, shard.clone()).unwrap();
            let mut caches = model.alloc_kv_caches(model.kv_cache_shape(BLOCKS, BLOCK)).unwrap();
            let comms = Collectives {
                tp: &tp_comm,
                pp: &pp_comm,
            };
            let table: Vec<u32> = (0..BLOCKS as u32).collect();
            let reports = shard.last_stage && tp_rank == 0;
            let mut logits = Vec::new();
            let batch = ForwardBatch::single(&prompt, 0, &table, BLOCK, true);
            model.forward_shard(&batch, &mut caches, Some(&comms), &mut logits).unwrap();
            let prompt_logits = logits.clone();
            let vocab = model.config().vocab_size;
            for position in prompt.len()..prompt.len() + steps {
                if reports {
                    next_token.lock().unwrap().push(argmax(&logits[logits.len() - vocab..]));
                }
                step_done.wait();
                let token = *next_token.lock().unwrap().last().unwrap();
                let batch = ForwardBatch::single(&[token], position, &table, BLOCK, false);
                model.forward_shard(&batch, &mut caches, Some(&comms), &mut logits).unwrap();
            }
            reports.then_some(prompt_logits)
        }));
    }
    let logits = threads.into_iter().filter_map(|t| t.join().unwrap()).next().unwrap();
    let greedy = next_token.lock().unwrap().clone();
    Output { logits, greedy }
}

/// Every prompt of the fixture through `layout`: logits and greedy ids.
fn check(name: &str, layout: Layout, pp_layers: Option<&[usize]>) {
    let reference = Reference::open(name);
    for p in prompt_keys(&reference) {
        let ids = reference.ids(&format!("{p}.input_ids"));
        let (rows, vocab, want) = reference.matrix(&format!("{p}.logits"));
        let greedy_key = format!("{p}.greedy_ids");
        let want_ids = reference.has(&greedy_key).then(|| reference.ids(&greedy_key));
        let steps = want_ids.as_ref().map_or(0, Vec::len);
        let out = run_split(name, layout, pp_layers, &ids, steps);
        let what = format!("{name} tp={} pp={} {p}", layout.tp, layout.pp);
        assert_rows_close(&out.logits[(ids.len() - rows) * vocab..], &want, vocab, TOLERANCE, &what);
        if let Some(want_ids) = want_ids {
            assert_eq!(out.greedy, want_ids, "{what}: greedy continuation");
        }
    }
}

fn layouts(name: &str) -> Vec<Layout> {
    let config = ModelConfig::from_file(&common::model_dir(name).join("config.json")).unwrap();
    [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2), (1, 4)]
        .into_iter()
        .map(|(tp, pp)| Layout { tp, pp })
        .filter(|l| l.validate(&config).is_ok())
        .collect()
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
