//! Tensor and pipeline parallelism on the CPU backend, through the worker
//! threads (one per rank, talking through the in-process communicator):
//! every layout the fixtures allow gives the Hugging Face reference logits
//! (within 1e-4 relative) and the same greedy ids as the reference.

mod common;

use common::{assert_rows_close, prompt_keys, Reference};
use shardline::backend::cpu::CpuBackend;
use shardline::config::ModelConfig;
use shardline::executor::{WorkerOptions, Workers};
use shardline::generation::{blocks_for, Generator, BLOCK_SIZE};
use shardline::loader::SafetensorsCheckpoint;
use shardline::model::Qwen2ForCausalLM;
use shardline::parallel::Layout;
use shardline::sampling::argmax;

const TOLERANCE: f64 = 1e-4;

/// The prompt's logits at every position, and the greedy continuation.
struct Output {
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

/// Runs `prompt` and `steps` greedy decode steps through a `layout` split
/// of fixture `name`: one worker thread per rank, each loading its shard.
fn run_split(name: &str, layout: Layout, pp_layers: Option<&[usize]>, prompt: &[u32], steps: usize) -> Output {
    let dir = common::model_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let num_kv_blocks = blocks_for(prompt.len() + steps);
    let options = WorkerOptions {
        layout,
        pp_layers: pp_layers.map(<[usize]>::to_vec),
        num_kv_blocks,
        block_size: BLOCK_SIZE,
        micro_batching: true,
        panic_at: None,
    };
    let shard_config = config.clone();
    let load = move |shard| {
        let source = SafetensorsCheckpoint::open(&dir).map_err(|e| e.to_string())?;
        Qwen2ForCausalLM::load_shard(CpuBackend, shard_config.clone(), &source, shard).map_err(|e| e.to_string())
    };
    let workers = Workers::spawn(config.clone(), options, load).unwrap();
    let mut generator = Generator::with_executor(Box::new(workers), num_kv_blocks);
    let logits = generator.extend(prompt, true).unwrap();
    let vocab = config.vocab_size;
    let mut greedy = Vec::new();
    let mut last = logits[logits.len() - vocab..].to_vec();
    for _ in 0..steps {
        greedy.push(argmax(&last));
        if greedy.len() < steps {
            last = generator.decode_one_token(*greedy.last().unwrap()).unwrap();
        }
    }
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
