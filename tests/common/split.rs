//! A fixture model split over worker threads (one per rank, talking through
//! the in-process communicator) on any backend, checked against the Hugging
//! Face reference logits and greedy ids.

use super::{assert_rows_close, model_dir, prompt_keys, Reference};
use shardline::backend::cpu::CpuBackend;
use shardline::backend::{Backend, HostStaging};
use shardline::config::ModelConfig;
use shardline::executor::{Executor, Transport, WorkerOptions, Workers};
use shardline::generation::{blocks_for, Generator, BLOCK_SIZE};
use shardline::loader::SafetensorsCheckpoint;
use shardline::model::{Qwen2ForCausalLM, Shard};
use shardline::parallel::Layout;
use shardline::sampling::argmax;

/// How closely a backend must reproduce the reference.
#[derive(Clone, Copy, Debug)]
pub struct Accuracy {
    /// Relative error of the logits at each position.
    pub logits: f64,
    /// Whether every greedy id must match, or only those before the first
    /// near tie (the fixtures' README: a bf16 path may flip a tie within
    /// 0.05 of the random models' logits, and the continuation differs after).
    pub greedy_until_near_tie: bool,
}

impl Accuracy {
    /// f32 arithmetic, as the reference's.
    pub const F32: Accuracy = Accuracy {
        logits: 1e-4,
        greedy_until_near_tie: false,
    };
    /// A bf16 GPU path.
    pub const BF16: Accuracy = Accuracy {
        logits: 2e-2,
        greedy_until_near_tie: true,
    };
}

/// The top-two logit gap under which a bf16 path may pick the other token.
const NEAR_TIE: f32 = 0.05;

/// How many of the reference continuation `greedy` of `prompt` come before
/// its first near tie. The reference holds no logits past the prompt, so
/// the gaps are those of the CPU backend fed the reference's own tokens
/// (its logits match the reference's within 1e-4; tests/reference_logits.rs).
fn ids_before_near_tie(name: &str, prompt: &[u32], greedy: &[u32]) -> usize {
    let dir = model_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let source = SafetensorsCheckpoint::open(&dir).unwrap();
    let model = Qwen2ForCausalLM::load(CpuBackend::default(), config, &source).unwrap();
    let vocab = model.config().vocab_size;
    let fed = [prompt, &greedy[..greedy.len() - 1]].concat();
    let mut generator = Generator::new(model, fed.len()).unwrap();
    let logits = generator.extend(&fed, true).unwrap();
    let gap = |row: &[f32]| {
        let best = argmax(row) as usize;
        let second = row
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .map(|(_, v)| *v)
            .fold(f32::MIN, f32::max);
        row[best] - second
    };
    let rows = logits[(prompt.len() - 1) * vocab..].chunks(vocab);
    rows.take_while(|row| gap(row) >= NEAR_TIE).count()
}

/// The prompt's logits at every position, and the greedy continuation.
pub struct Output {
    pub logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

/// Worker options for a `layout` split with a KV cache of `num_kv_blocks`.
pub fn worker_options(layout: Layout, pp_layers: Option<&[usize]>, num_kv_blocks: usize) -> WorkerOptions {
    WorkerOptions {
        layout,
        pp_layers: pp_layers.map(<[usize]>::to_vec),
        num_kv_blocks,
        block_size: BLOCK_SIZE,
        micro_batching: true,
        graphs: true,
        panic_at: None,
    }
}

/// Loads rank `r`'s shard of fixture `name` on `backend(r)`.
pub fn shard_loader<B: Backend + 'static>(
    name: &str,
    backend: fn(usize) -> B,
) -> impl Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync + 'static {
    let dir = model_dir(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    move |rank, shard| {
        let source = SafetensorsCheckpoint::open(&dir).map_err(|e| e.to_string())?;
        Qwen2ForCausalLM::load_shard(backend(rank), config.clone(), &source, shard).map_err(|e| e.to_string())
    }
}

/// Runs `prompt` and `steps` greedy decode steps through `executor`.
pub fn run_prompt(executor: Box<dyn Executor>, num_kv_blocks: usize, prompt: &[u32], steps: usize) -> Output {
    let vocab = executor.config().vocab_size;
    let mut generator = Generator::with_executor(executor, num_kv_blocks);
    let logits = generator.extend(prompt, true).unwrap();
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

/// Every prompt of fixture `name` through an executor `start(num_kv_blocks)`
/// makes: logits and greedy ids as close to the reference as `accuracy` says.
pub fn check_prompts(name: &str, what: &str, accuracy: Accuracy, mut start: impl FnMut(usize) -> Box<dyn Executor>) {
    let reference = Reference::open(name);
    for p in prompt_keys(&reference) {
        let ids = reference.ids(&format!("{p}.input_ids"));
        let (rows, vocab, want) = reference.matrix(&format!("{p}.logits"));
        let greedy_key = format!("{p}.greedy_ids");
        let want_ids = match reference.has(&greedy_key) {
            true => reference.ids(&greedy_key),
            false => Vec::new(),
        };
        // Only the ids compared are decoded.
        let steps = match accuracy.greedy_until_near_tie && !want_ids.is_empty() {
            true => ids_before_near_tie(name, &ids, &want_ids),
            false => want_ids.len(),
        };
        let num_kv_blocks = blocks_for(ids.len() + steps);
        let out = run_prompt(start(num_kv_blocks), num_kv_blocks, &ids, steps);
        let what = format!("{name} {what} {p}");
        assert_rows_close(&out.logits[(ids.len() - rows) * vocab..], &want, vocab, accuracy.logits, &what);
        assert_eq!(out.greedy, want_ids[..steps], "{what}: greedy continuation");
    }
}

/// Every prompt of the fixture through a `layout` split, rank `r` computing
/// on `backend(r)`, checked as [`check_prompts`] does.
pub fn check_split<B>(name: &str, layout: Layout, pp_layers: Option<&[usize]>, backend: fn(usize) -> B, accuracy: Accuracy)
where
    B: Backend + 'static,
    B::Tensor: HostStaging,
{
    let what = format!("tp={} pp={}", layout.tp, layout.pp);
    check_prompts(name, &what, accuracy, |num_kv_blocks| {
        spawn_split(name, layout, pp_layers, backend, num_kv_blocks)
    });
}

/// Fixture `name` split as `layout` over worker threads, rank `r` on `backend(r)`.
pub fn spawn_split<B>(
    name: &str,
    layout: Layout,
    pp_layers: Option<&[usize]>,
    backend: fn(usize) -> B,
    num_kv_blocks: usize,
) -> Box<dyn Executor>
where
    B: Backend + 'static,
    B::Tensor: HostStaging,
{
    let config = ModelConfig::from_file(&model_dir(name).join("config.json")).unwrap();
    let options = worker_options(layout, pp_layers, num_kv_blocks);
    Box::new(Workers::spawn(config, options, shard_loader(name, backend), Transport::InProcess).unwrap())
}

/// The layouts among (1,1) (2,1) (4,1) (1,2) (1,3) (2,2) (1,4) that fixture `name` allows.
pub fn layouts(name: &str) -> Vec<Layout> {
    let config = ModelConfig::from_file(&model_dir(name).join("config.json")).unwrap();
    [(1, 1), (2, 1), (4, 1), (1, 2), (1, 3), (2, 2), (1, 4)]
        .into_iter()
        .map(|(tp, pp)| Layout { tp, pp })
        .filter(|l| l.validate(&config).is_ok())
        .collect()
}
