//! A [`Communicator`] over NCCL, for ranks on distinct GPUs. An NCCL
//! communicator belongs to the thread that made it (it is not `Send`): each
//! rank joins on its own worker thread, with the unique id rank 0 made
//! ([`new_id`]) handed to the others.

use super::{CudaBackend, CudaTensor};
use crate::backend::{BackendError, Result};
use crate::parallel::Communicator;
use cudarc::nccl::{Comm, Id, ReduceOp};

/// Whether libnccl can be loaded (cudarc opens it as `libnccl.so`).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to open the library; nothing is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_error(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> BackendError + '_ {
    move |e| BackendError::Comm(format!("NCCL {what}: {e:?}"))
}

/// A fresh group id, made once (by rank 0) and given to every rank.
pub fn new_id() -> Result<Id> {
    if !nccl_available() {
        return Err(BackendError::Comm("libnccl.so cannot be loaded (LD_LIBRARY_PATH?)".into()));
    }
    Id::new().map_err(nccl_error("making a unique id"))
}

pub struct NcclComm {
    comm: Comm,
}

impl NcclComm {
    /// Joins group `id` as `rank` of `size`, on `backend`'s stream, so
    /// transfers queue in order with the rank's kernels. Blocks until every
    /// rank has joined.
    pub fn join(backend: &CudaBackend, rank: usize, size: usize, id: Id) -> Result<Self> {
        let comm = Comm::from_rank(backend.stream.clone(), rank, size, id).map_err(nccl_error("joining the group"))?;
        Ok(NcclComm { comm })
    }
}

impl Communicator<CudaTensor> for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut CudaTensor) -> Result<()> {
        self.comm
            .all_reduce_in_place(&mut buf.data, &ReduceOp::Sum)
            .map(|_| ())
            .map_err(nccl_error("all_reduce"))
    }

    fn all_gather(&self, input: &CudaTensor, output: &mut CudaTensor) -> Result<()> {
        if output.data.len() != input.data.len() * self.size() {
            return Err(BackendError::Comm(format!(
                "all_gather of {} values over {} ranks into {} values",
                input.data.len(),
                self.size(),
                output.data.len()
            )));
        }
        self.comm
            .all_gather(&input.data, &mut output.data)
            .map(|_| ())
            .map_err(nccl_error("all_gather"))
    }

    fn send(&self, buf: &CudaTensor, to: usize) -> Result<()> {
        self.comm.send(&buf.data, to as i32).map_err(nccl_error("send"))
    }

    fn recv(&self, buf: &mut CudaTensor, from: usize) -> Result<()> {
        self.comm.recv(&mut buf.data, from as i32).map(|_| ()).map_err(nccl_error("recv"))
    }

    fn barrier(&self) -> Result<()> {
        let mut token = self
            .comm
            .stream()
            .alloc_zeros::<f32>(1)
            .map_err(|e| BackendError::Comm(format!("barrier: {e}")))?;
        self.comm
            .all_reduce_in_place(&mut token, &ReduceOp::Sum)
            .map_err(nccl_error("barrier"))?;
        self.comm
            .stream()
            .synchronize()
            .map_err(|e| BackendError::Comm(format!("barrier: {e}")))
    }
}
