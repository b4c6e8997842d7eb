//! A fixture model split over worker threads (one per rank, talking through
//! the in-process communicator) on any backend, checked against the Hugging
//! Face reference logits and greedy ids.

use super::{assert_rows_close, model_dir, prompt_keys, Reference};
use shardline::backend::{Backend, HostStaging};
use shardline::config::ModelConfig;
use shardline::executor::{Executor, Transport, WorkerOptions, Workers};
use shardline::generation::{blocks_for, Generator, BLOCK_SIZE};
use shardline::loader::SafetensorsCheckpoint;
use shardline::model::{Qwen2ForCausalLM, Shard};
use shardline::parallel::Layout;
use shardline::sampling::argmax;

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
/// makes: logits within `tolerance` (relative, per position) and greedy ids
/// equal to the reference.
pub fn check_prompts(name: &str, what: &str, tolerance: f64, mut start: impl FnMut(usize) -> Box<dyn Executor>) {
    let reference = Reference::open(name);
    for p in prompt_keys(&reference) {
        let ids = reference.ids(&format!("{p}.input_ids"));
        let (rows, vocab, want) = reference.matrix(&format!("{p}.logits"));
        let greedy_key = format!("{p}.greedy_ids");
        let want_ids = reference.has(&greedy_key).then(|| reference.ids(&greedy_key));
        let steps = want_ids.as_ref().map_or(0, Vec::len);
        let num_kv_blocks = blocks_for(ids.len() + steps);
        let out = run_prompt(start(num_kv_blocks), num_kv_blocks, &ids, steps);
        let what = format!("{name} {what} {p}");
        assert_rows_close(&out.logits[(ids.len() - rows) * vocab..], &want, vocab, tolerance, &what);
        if let Some(want_ids) = want_ids {
            assert_eq!(out.greedy, want_ids, "{what}: greedy continuation");
        }
    }
}

/// Every prompt of the fixture through a `layout` split, rank `r` computing
/// on `backend(r)`, checked as [`check_prompts`] does.
pub fn check_split<B>(name: &str, layout: Layout, pp_layers: Option<&[usize]>, backend: fn(usize) -> B, tolerance: f64)
where
    B: Backend + 'static,
    B::Tensor: HostStaging,
{
    let what = format!("tp={} pp={}", layout.tp, layout.pp);
    check_prompts(name, &what, tolerance, |num_kv_blocks| {
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
