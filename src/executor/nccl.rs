//! Ranks on distinct GPUs joining their groups through NCCL: one unique id
//! per group of a layout, and the [`Transport`] that has each rank join its
//! groups under them on its own thread.

use super::{Membership, Transport};
use crate::backend::cuda::nccl::{self, NcclComm};
use crate::backend::cuda::{CudaBackend, CudaTensor};
use crate::backend::BackendError;
use crate::parallel::{Communicator, Layout};

/// One NCCL id per group of `layout` (TP groups first, as [`super::Group::index`] counts).
pub fn nccl_ids(layout: Layout) -> Result<Vec<nccl::Id>, BackendError> {
    (0..layout.tp + layout.pp).map(|_| nccl::new_id()).collect()
}

/// Each rank joins its groups through NCCL, group `g` under `ids[g]`.
pub fn nccl_transport(layout: Layout, ids: Vec<nccl::Id>) -> Transport<CudaBackend> {
    Transport::Connect(Box::new(move |backend: &CudaBackend, member: Membership| {
        let id = ids[member.group.index(layout)];
        let comm = NcclComm::join(backend, member.rank, member.size, id).map_err(|e| e.to_string())?;
        Ok(Box::new(comm) as Box<dyn Communicator<CudaTensor>>)
    }))
}
