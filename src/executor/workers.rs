//! A split model: one OS thread per rank, each owning its shard, its KV
//! cache and its communicator endpoints, and receiving every step's batch
//! over a channel (each rank's thread: `super::rank`). The last stage's
//! first TP rank returns the step's output.
//! A rank whose next batch has come queues it behind the step on its
//! device before waiting for that step's tokens, so with the engine
//! planning ahead (TP only; every last-stage rank keeps the tokens it
//! sampled) the devices go from step to step.
//!
//! A rank that fails (an error, or a panic) breaks its communicator groups,
//! so its peers fail too instead of waiting; the step fails with the
//! failing rank's message, and every later step fails at once: the engine
//! fails its requests, and `/ready` reports not ready.

use super::nodes::{NodeError, Nodes};
use super::rank::{Link, Readiness, Worker};
use super::{rows_sampled_after, Executor};
use crate::backend::{Backend, BackendError, HostStaging};
use crate::config::ModelConfig;
use crate::model::{ForwardBatch, Qwen2ForCausalLM, Shard, StepOutput};
use crate::parallel::{in_process_group, Communicator, InProcessComm, Layout, LayoutError};
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    /// Decode steps replay recorded graphs where the model can record them
    /// (one stage, ranks talking through NCCL; see `model::DecodeGraphs`).
    pub graphs: bool,
    /// Fault injection for tests: rank `.0` panics in step `.1` (counting from 0).
    pub panic_at: Option<(usize, u64)>,
}

/// Which group of ranks a communicator connects: the tensor-parallel
/// ranks of one stage, or the stages of one tensor-parallel rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Tp { stage: usize },
    Pp { tp_rank: usize },
}

impl Group {
    /// This group's index among a layout's `pp + tp` groups (TP groups first).
    pub fn index(self, layout: Layout) -> usize {
        match self {
            Group::Tp { stage } => stage,
            Group::Pp { tp_rank } => layout.pp + tp_rank,
        }
    }
}

/// A rank's place in one of its groups.
#[derive(Clone, Copy, Debug)]
pub struct Membership {
    pub group: Group,
    pub rank: usize,
    pub size: usize,
}

/// Joins a group on the rank's own thread, with its loaded backend.
pub type Connect<B> = dyn Fn(&B, Membership) -> Result<Box<dyn Communicator<<B as Backend>::Tensor>>, String> + Send + Sync;

/// How the ranks of a split model exchange tensors.
pub enum Transport<B: Backend> {
    /// Threads of this process, through host memory: any backend, and
    /// several ranks may share one device.
    InProcess,
    /// Each rank joins its groups of more than one rank with this (NCCL,
    /// for ranks on distinct GPUs), once every rank has loaded its shard,
    /// so a rank that fails to load leaves no peer waiting in a join.
    Connect(Box<Connect<B>>),
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
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    Remote(String),
}

/// One step's outcome from a worker: the reporting rank's output, or why
/// it failed.
pub(super) type StepResult = Result<StepOutput, String>;

pub struct Workers {
    config: ModelConfig,
    pub(super) jobs: Vec<Sender<Arc<ForwardBatch>>>,
    pub(super) results: Receiver<StepResult>,
    threads: Vec<JoinHandle<()>>,
    /// Summed over ranks.
    decode_weight_bytes: usize,
    /// Steps that may be in flight.
    depth: usize,
    busy: BusyTimes,
    /// Set after the first failed step: the groups are broken for good.
    broken: Option<String>,
    /// Rows the last submitted step samples (what its successor's
    /// [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) ids may name).
    last_sampled_rows: usize,
    /// The other nodes serving the model, if any.
    pub(super) nodes: Nodes,
    /// Threads passing the followers' results on (on the leader).
    readers: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one thread per rank; each builds its shard with
    /// `load(rank, shard)` (on its own thread, so a device context is
    /// created where it is used), allocates its KV cache, then joins its
    /// groups through `transport`. Returns once every rank is ready.
    pub fn spawn<B, F>(config: ModelConfig, options: WorkerOptions, load: F, transport: Transport<B>) -> Result<Self, WorkersError>
    where
        B: Backend + 'static,
        B::Tensor: HostStaging,
        F: Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync + 'static,
    {
        let world = options.layout.world_size();
        Self::spawn_on(config, options, Arc::new(load), transport, 0..world, Nodes::Alone)
    }

    /// Starts this node's ranks (`local`), in step with the other `nodes`.
    pub(super) fn spawn_on<B>(
        config: ModelConfig,
        options: WorkerOptions,
        load: Arc<Load<B>>,
        transport: Transport<B>,
        local: Range<usize>,
        mut nodes: Nodes,
    ) -> Result<Self, WorkersError>
    where
        B: Backend + 'static,
        B::Tensor: HostStaging,
    {
        let layout = options.layout;
        layout.validate(&config)?;
        let stages = layout.stage_layers(&config, options.pp_layers.as_deref())?;
        let Layout { tp, pp } = layout;
        let mut tp_groups: Vec<Vec<InProcessComm>> = (0..pp).map(|_| in_process_group(tp)).collect();
        let mut pp_groups: Vec<Vec<InProcessComm>> = (0..tp).map(|_| in_process_group(pp)).collect();
        let connect: Option<Arc<Connect<B>>> = match transport {
            Transport::InProcess => None,
            Transport::Connect(connect) => Some(Arc::from(connect)),
        };
        let link = |endpoint: InProcessComm, group: Group| match &connect {
            Some(connect) if endpoint.size() > 1 => Link::Join(
                connect.clone(),
                Membership {
                    group,
                    rank: endpoint.rank(),
                    size: endpoint.size(),
                },
            ),
            _ => Link::Endpoint(endpoint),
        };
        let busy: BusyTimes = Arc::new((0..tp * pp).map(|_| AtomicU64::new(0)).collect());
        let (result_tx, results) = channel();
        let (ready_tx, ready) = channel();
        let (mut jobs, mut starts, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        // Ranks in reverse so each group's endpoints pop off in rank order from the back.
        for rank in (0..tp * pp).rev() {
            let (stage, tp_rank) = (rank / tp, rank % tp);
            let tp_endpoint = tp_groups[stage].pop().expect("one endpoint per TP rank");
            let pp_endpoint = pp_groups[tp_rank].pop().expect("one endpoint per stage");
            if !local.contains(&rank) {
                continue;
            }
            let (job_tx, job_rx) = channel();
            let (start_tx, start_rx) = channel();
            let worker = Worker {
                rank,
                shard: Shard {
                    tp_rank,
                    tp,
                    layers: stages[stage].clone(),
                    first_stage: stage == 0,
                    last_stage: stage == pp - 1,
                },
                tp_link: link(tp_endpoint, Group::Tp { stage }),
                pp_link: link(pp_endpoint, Group::Pp { tp_rank }),
                options: options.clone(),
                busy: busy.clone(),
                load: load.clone(),
                jobs: job_rx,
                start: start_rx,
                results: result_tx.clone(),
                ready: ready_tx.clone(),
            };
            jobs.push(job_tx);
            starts.push(start_tx);
            let thread = std::thread::Builder::new()
                .name(format!("shardline-rank-{rank}"))
                .spawn(move || worker.run())
                .expect("spawning a worker thread");
            threads.push(thread);
        }
        jobs.reverse();
        drop(ready_tx);
        // Every rank on every node loads, then every rank joins its groups.
        let decode_weight_bytes = nodes.loaded(await_ranks(&ready, local.len()))?;
        for start in starts {
            let _ = start.send(());
        }
        nodes.joined(await_ranks(&ready, local.len()))?;
        let readers = nodes.relay_results(&result_tx);
        drop(result_tx);
        Ok(Workers {
            config,
            jobs,
            results,
            threads,
            decode_weight_bytes,
            depth: if options.micro_batching { pp } else { 1 },
            busy,
            broken: None,
            last_sampled_rows: 0,
            nodes,
            readers,
        })
    }
}

/// Waits for `n` ranks to report a phase done; sums what they report.
fn await_ranks(ready: &Receiver<Readiness>, n: usize) -> Result<usize, WorkersError> {
    let mut total = 0;
    for _ in 0..n {
        match ready.recv() {
            Ok(Ok(value)) => total += value,
            Ok(Err((rank, message))) => return Err(WorkersError::Load { rank, message }),
            Err(_) => {
                return Err(WorkersError::Load {
                    rank: 0,
                    message: "a worker stopped while starting".into(),
                })
            }
        }
    }
    Ok(total)
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

    /// Tensor-parallel ranks each sample the step's tokens and keep them;
    /// pipeline stages keep a micro-batch each in flight instead.
    fn lookahead(&self) -> bool {
        self.depth == 1
    }

    fn submit(&mut self, batch: ForwardBatch) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Device(why.clone()));
        }
        // A pipeline's first stage holds none of the last stage's tokens.
        let held = if self.lookahead() { self.last_sampled_rows } else { 0 };
        self.last_sampled_rows = rows_sampled_after(&batch, held)?;
        let batch = Arc::new(batch);
        if let Err(why) = self.nodes.send_step(&batch) {
            return Err(self.break_with(why));
        }
        if !self.jobs.iter().all(|j| j.send(batch.clone()).is_ok()) {
            return Err(self.break_with("a worker has stopped".into()));
        }
        Ok(())
    }

    fn collect(&mut self, out: &mut StepOutput) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Device(why.clone()));
        }
        match self.results.recv() {
            Ok(Ok(done)) => {
                *out = done;
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

    /// Closes every rank's job queue and waits for its thread to end.
    pub(super) fn stop_ranks(&mut self) {
        self.jobs.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
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
        self.nodes.close();
        self.stop_ranks();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

pub(super) type Load<B> = dyn Fn(usize, Shard) -> Result<Qwen2ForCausalLM<B>, String> + Send + Sync;
