//! How ranks exchange tensors: a [`Communicator`] per group of ranks (the
//! tensor-parallel ranks of one stage, or the stages of one TP rank), with
//! NCCL's semantics: every rank calls a collective with a buffer of the same
//! size, and a `recv` names its sender and knows the size to expect.
//!
//! [`in_process_group`] connects ranks that are threads of one process through
//! host memory. A rank that fails (drops its endpoint while panicking, or
//! calls [`InProcessComm::abort`]) fails every peer's pending and future
//! calls, so no worker waits forever on a dead one.

use crate::backend::{BackendError, HostStaging, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Collectives and point-to-point transfers over buffers of type `Buf`
/// (`[f32]` in host memory; device buffers for a GPU backend).
pub trait Communicator<Buf: ?Sized> {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum over ranks (summed in
    /// rank order, so every rank holds bit-identical results).
    fn all_reduce_sum(&self, buf: &mut Buf) -> Result<()>;
    /// `output` (`size` × `input`'s length) becomes every rank's `input`, in
    /// rank order.
    fn all_gather(&self, input: &Buf, output: &mut Buf) -> Result<()>;
    fn send(&self, buf: &Buf, to: usize) -> Result<()>;
    /// Fills `buf` with the next buffer `from` sent to this rank.
    fn recv(&self, buf: &mut Buf, from: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Leaves the group after a failure, so peers are not left waiting on
    /// this rank where the transport can tell them.
    fn abort(&self, why: &str);
    /// Time spent blocked on peers so far; zero where transfers are
    /// queued on a device and never block the caller.
    fn waited(&self) -> Duration {
        Duration::ZERO
    }
    /// Whether its transfers are device work a recorded graph can hold
    /// (NCCL's are; host memory's are not).
    fn records_in_graphs(&self) -> bool {
        false
    }
}

/// The endpoints of an in-process group of `size` threads: hand endpoint
/// `r` to rank `r`'s thread.
pub fn in_process_group(size: usize) -> Vec<InProcessComm> {
    let shared = Arc::new(Shared {
        size,
        state: Mutex::new(State {
            arrived: 0,
            generation: 0,
            failed: None,
            slots: vec![Vec::new(); size],
            mail: HashMap::new(),
        }),
        wake: Condvar::new(),
    });
    (0..size)
        .map(|rank| InProcessComm {
            rank,
            shared: shared.clone(),
            waited_ns: AtomicU64::new(0),
        })
        .collect()
}

pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Nanoseconds this endpoint spent blocked, waiting for peers.
    waited_ns: AtomicU64,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Ranks waiting at the current barrier.
    arrived: usize,
    /// Barriers completed so far.
    generation: u64,
    /// Why the group broke, once a rank failed.
    failed: Option<String>,
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Vec<f32>>,
    /// Sent but not yet received buffers, by (from, to).
    mail: HashMap<(usize, usize), VecDeque<Vec<f32>>>,
}

impl InProcessComm {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Marks the group failed: every peer's pending and later calls return
    /// an error naming this rank.
    pub fn abort(&self, why: &str) {
        let mut state = self.lock();
        state.failed.get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
        self.shared.wake.notify_all();
    }

    /// The barrier: returns once every rank has arrived.
    fn wait_all(&self) -> Result<()> {
        let mut state = self.lock();
        Self::check(&state)?;
        state.arrived += 1;
        if state.arrived == self.shared.size {
            state.arrived = 0;
            state.generation += 1;
            self.shared.wake.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        while state.generation == generation {
            Self::check(&state)?;
            state = self.wait(state);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A peer that panicked while holding the lock left consistent state
        // (every update is a single assignment); its failure is reported
        // through `failed`.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let started = Instant::now();
        let guard = self.shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        self.waited_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        guard
    }

    /// Total time this endpoint has spent blocked on its peers.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }

    fn check(state: &State) -> Result<()> {
        match &state.failed {
            Some(why) => Err(BackendError::Comm(why.clone())),
            None => Ok(()),
        }
    }

    /// Puts this rank's buffer in its slot, waits for all, and lets `read`
    /// see every slot; a second barrier keeps slots until all have read.
    fn exchange(&self, input: Vec<f32>, read: impl FnOnce(&[Vec<f32>]) -> Result<()>) -> Result<()> {
        let len = input.len();
        {
            let mut state = self.lock();
            Self::check(&state)?;
            state.slots[self.rank] = input;
        }
        self.wait_all()?;
        {
            let state = self.lock();
            Self::check(&state)?;
            if let Some(other) = state.slots.iter().position(|s| s.len() != len) {
                return Err(BackendError::Comm(format!(
                    "rank {} sent {} values to a collective where rank {} sent {}",
                    other,
                    state.slots[other].len(),
                    self.rank,
                    len
                )));
            }
            read(&state.slots)?;
        }
        self.wait_all()
    }
}

impl<T: HostStaging + ?Sized> Communicator<T> for InProcessComm {
    fn rank(&self) -> usize {
        InProcessComm::rank(self)
    }

    fn size(&self) -> usize {
        InProcessComm::size(self)
    }

    fn all_reduce_sum(&self, buf: &mut T) -> Result<()> {
        if self.shared.size == 1 {
            return Ok(());
        }
        let mut input = Vec::new();
        buf.copy_to_host(&mut input)?;
        self.exchange(input, |slots| {
            let mut sum = slots[0].clone();
            for slot in &slots[1..] {
                sum.iter_mut().zip(slot).for_each(|(b, s)| *b += s);
            }
            buf.copy_from_host(&sum)
        })
    }

    fn all_gather(&self, input: &T, output: &mut T) -> Result<()> {
        if output.len() != input.len() * self.shared.size {
            return Err(BackendError::Comm(format!(
                "all_gather of {} values over {} ranks into {} values",
                input.len(),
                self.shared.size,
                output.len()
            )));
        }
        let mut mine = Vec::new();
        input.copy_to_host(&mut mine)?;
        self.exchange(mine, |slots| output.copy_from_host(&slots.concat()))
    }

    fn send(&self, buf: &T, to: usize) -> Result<()> {
        let mut values = Vec::new();
        buf.copy_to_host(&mut values)?;
        let mut state = self.lock();
        Self::check(&state)?;
        state.mail.entry((self.rank, to)).or_default().push_back(values);
        self.shared.wake.notify_all();
        Ok(())
    }

    fn recv(&self, buf: &mut T, from: usize) -> Result<()> {
        let mut state = self.lock();
        let data = loop {
            Self::check(&state)?;
            if let Some(data) = state.mail.get_mut(&(from, self.rank)).and_then(VecDeque::pop_front) {
                break data;
            }
            state = self.wait(state);
        };
        drop(state);
        if data.len() != buf.len() {
            return Err(BackendError::Comm(format!(
                "rank {} expected {} values from rank {from}, which sent {}",
                self.rank,
                buf.len(),
                data.len()
            )));
        }
        buf.copy_from_host(&data)
    }

    fn barrier(&self) -> Result<()> {
        self.wait_all()
    }

    fn abort(&self, why: &str) {
        InProcessComm::abort(self, why)
    }

    fn waited(&self) -> Duration {
        InProcessComm::waited(self)
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort("its thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
    fn on_ranks<T: Send + 'static>(size: usize, f: impl Fn(usize, InProcessComm) -> T + Send + Sync + 'static) -> Vec<thread::Result<T>> {
        let f = Arc::new(f);
        let handles: Vec<_> = in_process_group(size)
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = f.clone();
                thread::spawn(move || f(rank, comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    }

    #[test]
    fn all_reduce_and_all_gather_agree_on_every_rank() {
        let results = on_ranks(4, |rank, comm| {
            let mut out = Vec::new();
            for round in 0..50 {
                let mut buf = vec![rank as f32 + round as f32, 1.0];
                comm.all_reduce_sum(&mut buf[..]).unwrap();
                let mut gathered = vec![0.0; 8];
                comm.all_gather(&[rank as f32, -(rank as f32)][..], &mut gathered[..]).unwrap();
                out.push((buf, gathered));
            }
            out
        });
        for result in results {
            for (round, (sum, gathered)) in result.unwrap().into_iter().enumerate() {
                assert_eq!(sum, vec![6.0 + 4.0 * round as f32, 4.0]);
                assert_eq!(gathered, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]);
            }
        }
    }

    #[test]
    fn send_and_recv_pass_a_pipeline_in_order() {
        let results = on_ranks(3, |rank, comm| {
            let mut got = Vec::new();
            for step in 0..20 {
                let mut buf = vec![0.0; 2];
                if rank == 0 {
                    buf = vec![step as f32, 0.0];
                } else {
                    comm.recv(&mut buf[..], rank - 1).unwrap();
                    buf[1] += 1.0;
                }
                if rank + 1 < comm.size() {
                    comm.send(&buf[..], rank + 1).unwrap();
                }
                got.push(buf);
            }
            comm.wait_all().unwrap();
            got
        });
        let last = results.into_iter().last().unwrap().unwrap();
        assert_eq!(last, (0..20).map(|s| vec![s as f32, 2.0]).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_rank_fails_its_peers_instead_of_hanging_them() {
        let results = on_ranks(3, |rank, comm| {
            if rank == 1 {
                panic!("worker 1 dies");
            }
            let mut buf = [1.0];
            let reduced = comm.all_reduce_sum(&mut buf[..]);
            let received = comm.recv(&mut buf[..], 1);
            (reduced.is_err(), received.is_err())
        });
        assert!(results[1].is_err());
        for rank in [0, 2] {
            assert_eq!(results[rank].as_ref().unwrap(), &(true, true));
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let results = on_ranks(2, |rank, comm| {
            let mut buf = vec![0.0; rank + 1];
            comm.all_reduce_sum(&mut buf[..]).is_err()
        });
        assert!(results.into_iter().all(|r| r.unwrap()));
        let comm = in_process_group(2).remove(0);
        assert!(comm.all_gather(&[1.0][..], &mut [0.0; 3][..]).is_err());
    }
}
