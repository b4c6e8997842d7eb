//! The thread of one rank of a split model (`super::workers`): it loads
//! its shard and KV cache, joins its groups once every rank has loaded,
//! then runs each step's batch as it comes, queueing the next step on its
//! device before it waits for the last one's tokens. A failure or a panic
//! breaks its groups and is reported, so no peer waits on it.

use super::workers::{BusyTimes, Connect, Load, Membership, StepResult, WorkerOptions};
use crate::backend::{Backend, BackendError, HostStaging};
use crate::model::{Collectives, DecodeGraphs, ForwardBatch, Pending, Shard, StepOutput};
use crate::parallel::{Communicator, InProcessComm};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A rank's report after loading (its decode weight bytes) and after
/// joining its groups (0), or why it failed.
pub(super) type Readiness = Result<usize, (usize, String)>;

/// A rank's way into one of its groups.
pub(super) enum Link<B: Backend> {
    /// Made for it already.
    Endpoint(InProcessComm),
    /// To join on its own thread, once every rank has loaded.
    Join(Arc<Connect<B>>, Membership),
}

impl<B: Backend> Link<B>
where
    B::Tensor: HostStaging,
{
    fn open(self, backend: &B) -> Result<Box<dyn Communicator<B::Tensor>>, String> {
        match self {
            Link::Endpoint(endpoint) => Ok(Box::new(endpoint)),
            Link::Join(connect, membership) => connect(backend, membership),
        }
    }
}

pub(super) struct Worker<B: Backend> {
    pub rank: usize,
    pub shard: Shard,
    pub tp_link: Link<B>,
    pub pp_link: Link<B>,
    pub options: WorkerOptions,
    pub busy: BusyTimes,
    pub load: Arc<Load<B>>,
    pub jobs: Receiver<Arc<ForwardBatch>>,
    /// Closed without a message when another rank failed to load.
    pub start: Receiver<()>,
    pub results: Sender<StepResult>,
    pub ready: Sender<Readiness>,
}

impl<B> Worker<B>
where
    B: Backend,
    B::Tensor: HostStaging,
{
    pub fn run(self) {
        let rank = self.rank;
        let (results, ready) = (self.results.clone(), self.ready.clone());
        // Each rank computes on its own share of the cores, as it would on
        // its own device (the CPU backend's parallel loops use this pool).
        let world = self.shard.tp * self.options.layout.pp;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads((cores / world).max(1))
            .thread_name(move |i| format!("shardline-rank-{rank}-{i}"))
            .build();
        // A panic while starting unwinds through `serve`, dropping this
        // rank's endpoints, which fails its peers instead of hanging them.
        let outcome = catch_unwind(AssertUnwindSafe(|| match &pool {
            Ok(pool) => pool.install(|| self.serve()),
            Err(_) => self.serve(),
        }));
        if let Err(panic) = outcome {
            let why = format!("worker rank {rank} panicked: {}", panic_message(panic));
            let _ = ready.send(Err((rank, why.clone())));
            let _ = results.send(Err(why));
        }
    }

    fn serve(self) {
        let rank = self.rank;
        let (blocks, block_size) = (self.options.num_kv_blocks, self.options.block_size);
        let loaded = (self.load)(rank, self.shard.clone()).and_then(|model| {
            let graphs = (self.options.graphs && self.options.layout.pp == 1)
                .then(|| DecodeGraphs::new(blocks, block_size, model.config().max_position_embeddings));
            let cache_blocks = graphs.as_ref().map_or(blocks, DecodeGraphs::cache_blocks);
            let caches = model
                .alloc_kv_caches(model.kv_cache_shape(cache_blocks, block_size))
                .map_err(|e| e.to_string())?;
            Ok((model, caches, graphs))
        });
        let (model, mut caches, mut graphs) = match loaded {
            Ok(loaded) => loaded,
            Err(message) => {
                let _ = self.ready.send(Err((rank, message)));
                return;
            }
        };
        let _ = self.ready.send(Ok(model.decode_weight_bytes()));
        if self.start.recv().is_err() {
            return;
        }
        let joined = self
            .tp_link
            .open(model.backend())
            .and_then(|tp| Ok((tp, self.pp_link.open(model.backend())?)));
        let (tp, pp) = match joined {
            Ok(comms) => comms,
            Err(message) => {
                let _ = self.ready.send(Err((rank, format!("joining its groups: {message}"))));
                return;
            }
        };
        let _ = self.ready.send(Ok(0));
        let reports = self.shard.last_stage && self.shard.tp_rank == 0;
        let comms = Collectives { tp: &*tp, pp: &*pp };
        let blocked = || tp.waited() + pp.waited();
        let fail = |why: String| {
            tp.abort(&why);
            pp.abort(&why);
            let _ = self.results.send(Err(why));
        };
        // Waits for a queued step's tokens and returns what it reports.
        let finish = |(pending, mut out): (Pending<B>, StepOutput)| match computed(&self.busy[rank], blocked, rank, || {
            model.finish(pending, &mut out)
        }) {
            Ok(()) if reports => _ = self.results.send(Ok(out)),
            Ok(()) => {}
            Err(why) => fail(why),
        };
        // The step queued on the device whose tokens are still to come:
        // where the next job is already waiting, it is queued behind this
        // one before this one is finished, so the device goes on.
        let mut held = None;
        let finish_held = |held: &mut Option<_>| {
            if let Some(queued) = held.take() {
                finish(queued);
            }
        };
        for step in 0u64.. {
            let batch = match self.jobs.try_recv() {
                Ok(batch) => batch,
                Err(TryRecvError::Empty) => {
                    finish_held(&mut held);
                    match self.jobs.recv() {
                        Ok(batch) => batch,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            let queued = computed(&self.busy[rank], blocked, rank, || {
                if self.options.panic_at == Some((rank, step)) {
                    panic!("injected fault in step {step}");
                }
                let mut out = StepOutput::default();
                let pending = model.queue(graphs.as_mut(), &batch, &mut caches, Some(&comms), &mut out)?;
                Ok((pending, out))
            });
            finish_held(&mut held);
            match queued {
                Ok(queued) => held = Some(queued),
                Err(why) => fail(why),
            }
        }
        finish_held(&mut held);
    }
}

/// Runs a rank's `work`, a panic caught (with the communicators still
/// open, so peers learn what it was), adding its time less what the rank
/// spent `blocked` on its peers to its computing time.
fn computed<T>(
    busy: &AtomicU64,
    blocked: impl Fn() -> Duration,
    rank: usize,
    work: impl FnOnce() -> Result<T, BackendError>,
) -> Result<T, String> {
    let (started, waited) = (Instant::now(), blocked());
    let outcome = catch_unwind(AssertUnwindSafe(work));
    let computing = started.elapsed().saturating_sub(blocked() - waited);
    busy.fetch_add(computing.as_nanos() as u64, Ordering::Relaxed);
    match outcome {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(format!("worker rank {rank}: {e}")),
        Err(panic) => Err(format!("worker rank {rank} panicked: {}", panic_message(panic))),
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}
