//! CUDA graphs: a forward's kernels recorded once from the rank's stream
//! and replayed as one launch, so a decode step costs the host one graph
//! launch instead of hundreds of kernel launches. Capture is thread-local:
//! another rank capturing or allocating on its own thread does not spoil it.

use super::arena::Fit;
use super::{count_launch, driver_error, CudaBackend, CAPTURING};
use crate::backend::{BackendError, Result};
use cudarc::driver::sys::{self, CUgraphDependencyType, CUgraphEdgeData, CUgraphInstantiate_flags, CUgraphNodeType, CUstreamCaptureMode};
use cudarc::driver::CudaSlice;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// What recorded graphs hold: kernel nodes, memory nodes (allocations and
/// frees), the edges from one kernel to the next, and how many of those
/// are programmatic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCensus {
    pub graphs: u64,
    pub kernels: u64,
    pub memory: u64,
    pub kernel_edges: u64,
    pub programmatic_edges: u64,
}

impl std::ops::AddAssign for GraphCensus {
    fn add_assign(&mut self, o: GraphCensus) {
        self.graphs += o.graphs;
        self.kernels += o.kernels;
        self.memory += o.memory;
        self.kernel_edges += o.kernel_edges;
        self.programmatic_edges += o.programmatic_edges;
    }
}

static RECORDED: Mutex<GraphCensus> = Mutex::new(GraphCensus {
    graphs: 0,
    kernels: 0,
    memory: 0,
    kernel_edges: 0,
    programmatic_edges: 0,
});

/// The census of every graph the CUDA backends of this process recorded.
pub fn recorded_graphs() -> GraphCensus {
    *RECORDED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The nodes and edges of one recorded graph, as the driver reports them.
fn census(graph: &cudarc::driver::CudaGraph) -> Result<GraphCensus> {
    let g = graph.cu_graph();
    let query = driver_error("reading a recorded graph");
    let mut n = 0usize;
    // SAFETY: `g` is a live graph; the arrays hold the counts given.
    unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(&query)?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }
        .result()
        .map_err(&query)?;
    let mut counted = GraphCensus {
        graphs: 1,
        ..Default::default()
    };
    let mut kernels = HashSet::new();
    for &node in &nodes[..n] {
        let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        unsafe { sys::cuGraphNodeGetType(node, &mut kind) }.result().map_err(&query)?;
        match kind {
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => {
                kernels.insert(node);
            }
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC | CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => counted.memory += 1,
            _ => {}
        }
    }
    counted.kernels = kernels.len() as u64;
    let mut e = 0usize;
    let (no_nodes, no_data) = (std::ptr::null_mut(), std::ptr::null_mut());
    unsafe { sys::cuGraphGetEdges_v2(g, no_nodes, no_nodes, no_data, &mut e) }
        .result()
        .map_err(&query)?;
    let (mut from, mut to) = (vec![std::ptr::null_mut(); e], vec![std::ptr::null_mut(); e]);
    let none = CUgraphEdgeData {
        from_port: 0,
        to_port: 0,
        type_: 0,
        reserved: [0; 5],
    };
    let mut data = vec![none; e];
    unsafe { sys::cuGraphGetEdges_v2(g, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut e) }
        .result()
        .map_err(&query)?;
    let programmatic = CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    for i in 0..e {
        if kernels.contains(&from[i]) && kernels.contains(&to[i]) {
            counted.kernel_edges += 1;
            counted.programmatic_edges += u64::from(data[i].type_ == programmatic);
        }
    }
    Ok(counted)
}

/// A recorded graph, instantiated for launch on the backend's stream,
/// with the arena buffer its activations live in (`arena.rs`).
pub struct CudaGraph {
    graph: cudarc::driver::CudaGraph,
    _activations: Option<Arc<CudaSlice<u8>>>,
}

// SAFETY: CUDA lets any thread use a graph and its executable as long as
// calls on it are serialized; a `CudaGraph` is owned by one rank's model
// and used only by the thread that runs that rank (it is not `Sync`).
unsafe impl Send for CudaGraph {}

impl CudaBackend {
    /// Records what `record` queues on the stream, its activations in the
    /// arena. A first recording that finds the arena too small is made
    /// again on one as large as it needed; a second keeps the buffers it
    /// took from the stream (graph memory nodes, which only cost the
    /// programmatic edges next to them).
    pub(super) fn capture_graph(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        let mut tries = 0;
        loop {
            tries += 1;
            self.arena.begin(&self.stream, self.poison)?;
            let graph = self.capture_once(record)?;
            let activations = match self.arena.end() {
                Fit::Whole(buffer) => Some(buffer),
                Fit::Overflowed if tries == 1 => continue,
                Fit::Overflowed => None,
            };
            // Counted for the benchmarks; a driver that cannot say does not
            // cost the graph.
            if let Ok(counted) = census(&graph) {
                *RECORDED.lock().unwrap_or_else(|e| e.into_inner()) += counted;
            }
            return Ok(CudaGraph {
                graph,
                _activations: activations,
            });
        }
    }

    /// Records what `record` queues on the stream. The capture always ends,
    /// so an error inside `record` leaves the stream usable.
    fn capture_once(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error("starting a graph capture"))?;
        CAPTURING.set(true);
        let recorded = record();
        CAPTURING.set(false);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        match graph.map_err(driver_error("ending a graph capture"))? {
            Some(graph) => Ok(graph),
            None => Err(BackendError::Device("a graph capture recorded nothing".into())),
        }
    }

    pub(super) fn replay_graph(&self, graph: &CudaGraph) -> Result<()> {
        count_launch();
        graph.graph.launch().map_err(driver_error("launching a graph"))
    }
}
