//! A [`Communicator`] over NCCL, for ranks on distinct GPUs. An NCCL
//! communicator belongs to the thread that made it (it is not `Send`): each
//! rank joins on its own worker thread, with the unique id rank 0 made
//! ([`new_id`]) handed to the others.

use super::{CudaBackend, CudaTensor};
use crate::backend::{BackendError, Result};
use crate::parallel::Communicator;
pub use cudarc::nccl::Id;
use cudarc::nccl::{Comm, ReduceOp};
use std::cell::{Ref, RefCell};

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

/// An id's bytes, to send to ranks in other processes.
pub fn id_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

/// The id [`id_bytes`] gave.
pub fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    let internal: [u8; 128] = bytes
        .try_into()
        .map_err(|_| BackendError::Comm(format!("an NCCL id is 128 bytes, not {}", bytes.len())))?;
    Ok(Id::uninit(internal.map(|b| b as std::ffi::c_char)))
}

pub struct NcclComm {
    /// Taken (and so aborted, which dropping does) when this rank fails.
    comm: RefCell<Option<Comm>>,
    rank: usize,
    size: usize,
}

impl NcclComm {
    /// Joins group `id` as `rank` of `size`, on `backend`'s stream, so
    /// transfers queue in order with the rank's kernels. Blocks until every
    /// rank has joined.
    pub fn join(backend: &CudaBackend, rank: usize, size: usize, id: Id) -> Result<Self> {
        let comm = Comm::from_rank(backend.stream.clone(), rank, size, id).map_err(nccl_error("joining the group"))?;
        Ok(NcclComm {
            comm: RefCell::new(Some(comm)),
            rank,
            size,
        })
    }

    fn comm(&self) -> Result<Ref<'_, Comm>> {
        Ref::filter_map(self.comm.borrow(), Option::as_ref)
            .map_err(|_| BackendError::Comm(format!("rank {} has left its NCCL group", self.rank)))
    }
}

impl Communicator<CudaTensor> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut CudaTensor) -> Result<()> {
        self.comm()?
            .all_reduce_in_place(&mut **buf.data_mut(), &ReduceOp::Sum)
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
        self.comm()?
            .all_gather(&*input.data, &mut **output.data_mut())
            .map(|_| ())
            .map_err(nccl_error("all_gather"))
    }

    fn send(&self, buf: &CudaTensor, to: usize) -> Result<()> {
        self.comm()?.send(&*buf.data, to as i32).map_err(nccl_error("send"))
    }

    fn recv(&self, buf: &mut CudaTensor, from: usize) -> Result<()> {
        self.comm()?
            .recv(&mut **buf.data_mut(), from as i32)
            .map(|_| ())
            .map_err(nccl_error("recv"))
    }

    fn barrier(&self) -> Result<()> {
        let comm = self.comm()?;
        let mut token = comm
            .stream()
            .alloc_zeros::<f32>(1)
            .map_err(|e| BackendError::Comm(format!("barrier: {e}")))?;
        comm.all_reduce_in_place(&mut token, &ReduceOp::Sum)
            .map_err(nccl_error("barrier"))?;
        comm.stream().synchronize().map_err(|e| BackendError::Comm(format!("barrier: {e}")))
    }

    /// NCCL's collectives and sends are kernels on the rank's stream.
    fn records_in_graphs(&self) -> bool {
        true
    }

    /// Aborts this rank's communicator (NCCL cannot wake a peer already
    /// waiting in a collective on its GPU; later calls here are errors).
    fn abort(&self, _why: &str) {
        self.comm.borrow_mut().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_survives_its_bytes_and_a_wrong_length_is_an_error() {
        let bytes: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        assert_eq!(id_bytes(&id_from_bytes(&bytes).unwrap()), bytes);
        let err = id_from_bytes(&bytes[..100]).unwrap_err().to_string();
        assert!(err.contains("an NCCL id is 128 bytes, not 100"), "{err}");
    }
}
