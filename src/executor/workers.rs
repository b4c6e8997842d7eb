//! A split model: one OS thread per rank, each owning its shard, its KV
//! cache and its communicator endpoints, and receiving every step's batch
//! over a channel. The last stage's first TP rank returns the logits.
//!
//! A rank that fails (an error, or a panic) breaks its communicator groups,
//! so its peers fail too instead of waiting; the step fails with the
//! failing rank's message, and every later step fails at once: the engine
//! fails its requests, and `/ready` reports not ready.

use super::Executor;
use crate::backend::{Backend, BackendError, HostStaging};
use crate::config::ModelConfig;
use crate::model::{Collectives, ForwardBatch, Qwen2ForCausalLM, Shard};
use crate::parallel::{in_process_group, InProcessComm, Layout, LayoutError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub layout: Layout,
    /// Layers per stage (`--pp-layers`); balanced by bytes when `None`.
    pub pp_layers: Option<Vec<usize>>,
    pub num_kv_blocks: usize,
    pub block_size: usize,
    /// Keep up to `pp` steps in flight, so each stage works on its own
    /// micro-batch; without it one step at a time crosses the stages.
    pub micro_batching: bool,
    /// Fault injection for tests: rank `.0` panics in step `.1` (counting from 0).
    pub panic_at: Option<(usize, u64)>,
}

/// Nanoseconds each rank has spent computing (in its forward, not blocked
/// on a peer), indexed by rank: against wall time, each stage's idle share.
pub type BusyTimes = Arc<Vec<AtomicU64>>;

#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("rank {rank} failed to load its shard: {message}")]
    Load { rank: usize, message: String },
}

/// One step's outcome from a worker: the logits (from the reporting rank)
/// or why it failed.
type StepResult = Result<Vec<f32>, String>;

pub struct Workers {
    config: ModelConfig,
    jobs: Vec<Sender<Arc<ForwardBatch>>>,
    results: Receiver<StepResult>,
    threads: Vec<JoinHandle<()>>,
    /// Summed over ranks.
    decode_weight_bytes: usize,
    /// Steps that may be in flight.
    depth: usize,
    busy: BusyTimes,
    /// Set after the first failed step: the groups are broken for good.
    broken: Option<String>,
}

impl Workers {
    /// Starts one thread per rank; each builds its shard with
    /// `load(rank, shard)` (on its own thread, so a device context is
    /// created where it is used) and allocates its KV cache. Returns once every rank is ready.
    pub fn spawn<B, F>(config: ModelConfig, options: WorkerOptions, load: F) -> Result<Self, WorkersError>
    where
        B: Backend + 'static,
        B::Tensor: HostStaging,
        F: Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync + 'static,
    {
        let layout = options.layout;
        layout.validate(&config)?;
        let stages = layout.stage_layers(&config, options.pp_layers.as_deref())?;
        let Layout { tp, pp } = layout;
        let mut tp_groups: Vec<Vec<InProcessComm>> = (0..pp).map(|_| in_process_group(tp)).collect();
        let mut pp_groups: Vec<Vec<InProcessComm>> = (0..tp).map(|_| in_process_group(pp)).collect();
        let load = Arc::new(load);
        let busy: BusyTimes = Arc::new((0..tp * pp).map(|_| AtomicU64::new(0)).collect());
        let (result_tx, results) = channel();
        let (ready_tx, ready) = channel();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        // Ranks in reverse so each group's endpoints pop off in rank order from the back.
        for rank in (0..tp * pp).rev() {
            let (stage, tp_rank) = (rank / tp, rank % tp);
            let worker = Worker {
                rank,
                shard: Shard {
                    tp_rank,
                    tp,
                    layers: stages[stage].clone(),
                    first_stage: stage == 0,
                    last_stage: stage == pp - 1,
                },
                tp_comm: tp_groups[stage].pop().expect("one endpoint per TP rank"),
                pp_comm: pp_groups[tp_rank].pop().expect("one endpoint per stage"),
                options: options.clone(),
                busy: busy.clone(),
            };
            let (job_tx, job_rx) = channel();
            jobs.push(job_tx);
            let (load, results, ready) = (load.clone(), result_tx.clone(), ready_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("shardline-rank-{rank}"))
                .spawn(move || worker.run(load.as_ref(), job_rx, results, ready))
                .expect("spawning a worker thread");
            threads.push(thread);
        }
        jobs.reverse();
        drop((result_tx, ready_tx));
        let mut decode_weight_bytes = 0;
        for _ in 0..tp * pp {
            match ready.recv() {
                Ok(Ok(bytes)) => decode_weight_bytes += bytes,
                Ok(Err((rank, message))) => return Err(WorkersError::Load { rank, message }),
                Err(_) => {
                    return Err(WorkersError::Load {
                        rank: 0,
                        message: "a worker stopped while loading".into(),
                    })
                }
            }
        }
        Ok(Workers {
            config,
            jobs,
            results,
            threads,
            decode_weight_bytes,
            depth: if options.micro_batching { pp } else { 1 },
            busy,
            broken: None,
        })
    }
}

impl Executor for Workers {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn decode_weight_bytes(&self) -> usize {
        self.decode_weight_bytes
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Device(why.clone()));
        }
        let batch = Arc::new(batch);
        if !self.jobs.iter().all(|j| j.send(batch.clone()).is_ok()) {
            return Err(self.break_with("a worker has stopped".into()));
        }
        Ok(())
    }

    fn collect(&mut self, logits: &mut Vec<f32>) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Device(why.clone()));
        }
        match self.results.recv() {
            Ok(Ok(values)) => {
                *logits = values;
                Ok(())
            }
            Ok(Err(why)) => Err(self.break_with(why)),
            Err(_) => Err(self.break_with("every worker has stopped".into())),
        }
    }
}

impl Workers {
    /// Each rank's computing time so far.
    pub fn busy_times(&self) -> BusyTimes {
        self.busy.clone()
    }

    /// Marks the group broken for good (results of steps still in flight
    /// are never read) and returns the error.
    fn break_with(&mut self, why: String) -> BackendError {
        self.broken = Some(why.clone());
        BackendError::Device(why)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.jobs.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct Worker {
    rank: usize,
    shard: Shard,
    tp_comm: InProcessComm,
    pp_comm: InProcessComm,
    options: WorkerOptions,
    busy: BusyTimes,
}

impl Worker {
    fn run<B>(
        self,
        load: &(dyn Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync),
        jobs: Receiver<Arc<ForwardBatch>>,
        results: Sender<StepResult>,
        ready: Sender<Result<usize, (usize, String)>>,
    ) where
        B: Backend,
        B::Tensor: HostStaging,
    {
        let rank = self.rank;
        let (tp_comm, pp_comm) = (&self.tp_comm, &self.pp_comm);
        // Each rank computes on its own share of the cores, as it would on
        // its own device (the CPU backend's parallel loops use this pool).
        let world = self.shard.tp * self.options.layout.pp;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads((cores / world).max(1))
            .thread_name(move |i| format!("shardline-rank-{rank}-{i}"))
            .build();
        let serve = || self.serve(load, jobs, &results, &ready);
        let outcome = catch_unwind(AssertUnwindSafe(|| match &pool {
            Ok(pool) => pool.install(serve),
            Err(_) => serve(),
        }));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let why = format!("worker rank {rank} panicked: {message}");
            tp_comm.abort(&why);
            pp_comm.abort(&why);
            let _ = ready.send(Err((rank, why.clone())));
            let _ = results.send(Err(why));
        }
    }

    fn serve<B>(
        &self,
        load: &(dyn Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync),
        jobs: Receiver<Arc<ForwardBatch>>,
        results: &Sender<StepResult>,
        ready: &Sender<Result<usize, (usize, String)>>,
    ) where
        B: Backend,
        B::Tensor: HostStaging,
    {
        let loaded = load(self.rank, self.shard.clone()).and_then(|model| {
            let shape = model.kv_cache_shape(self.options.num_kv_blocks, self.options.block_size);
            let caches = model.alloc_kv_caches(shape).map_err(|e| e.to_string())?;
            Ok((model, caches))
        });
        let (model, mut caches) = match loaded {
            Ok(loaded) => loaded,
            Err(message) => {
                let _ = ready.send(Err((self.rank, message)));
                return;
            }
        };
        let _ = ready.send(Ok(model.decode_weight_bytes()));
        let reports = self.shard.last_stage && self.shard.tp_rank == 0;
        let comms = Collectives {
            tp: &self.tp_comm,
            pp: &self.pp_comm,
        };
        let mut logits = Vec::new();
        for (step, batch) in jobs.iter().enumerate() {
            if self.options.panic_at == Some((self.rank, step as u64)) {
                panic!("injected fault in step {step}");
            }
            let (started, waited) = (Instant::now(), self.tp_comm.waited() + self.pp_comm.waited());
            let outcome = model.forward_shard(&batch, &mut caches, Some(&comms), &mut logits);
            let blocked = self.tp_comm.waited() + self.pp_comm.waited() - waited;
            let computing = started.elapsed().saturating_sub(blocked);
            self.busy[self.rank].fetch_add(computing.as_nanos() as u64, Ordering::Relaxed);
            match outcome {
                Ok(()) if reports => {
                    let _ = results.send(Ok(std::mem::take(&mut logits)));
                }
                Ok(()) => {}
                Err(e) => {
                    let why = format!("worker rank {}: {e}", self.rank);
                    self.tp_comm.abort(&why);
                    self.pp_comm.abort(&why);
                    let _ = results.send(Err(why));
                }
            }
        }
    }
}
