//! CUDA graphs: a forward's kernels recorded once from the rank's stream
//! and replayed as one launch, so a decode step costs the host one graph
//! launch instead of hundreds of kernel launches. Capture is thread-local:
//! another rank capturing or allocating on its own thread does not spoil it.

use super::{count_launch, driver_error, CudaBackend, CAPTURING};
use crate::backend::{BackendError, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

/// A recorded graph, instantiated for launch on the backend's stream.
pub struct CudaGraph(cudarc::driver::CudaGraph);

// SAFETY: CUDA lets any thread use a graph and its executable as long as
// calls on it are serialized; a `CudaGraph` is owned by one rank's model
// and used only by the thread that runs that rank (it is not `Sync`).
unsafe impl Send for CudaGraph {}

impl CudaBackend {
    /// Records what `record` queues on the stream. The capture always ends,
    /// so an error inside `record` leaves the stream usable.
    pub(super) fn capture_graph(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error("starting a graph capture"))?;
        CAPTURING.set(true);
        let recorded = record();
        CAPTURING.set(false);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        match graph.map_err(driver_error("ending a graph capture"))? {
            Some(graph) => Ok(CudaGraph(graph)),
            None => Err(BackendError::Device("a graph capture recorded nothing".into())),
        }
    }

    pub(super) fn replay_graph(&self, graph: &CudaGraph) -> Result<()> {
        count_launch();
        graph.0.launch().map_err(driver_error("launching a graph"))
    }
}
