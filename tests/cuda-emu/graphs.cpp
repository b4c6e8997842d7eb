// Stream capture and graphs in the emulated driver: a capturing stream
// records each operation queued on it instead of running it, and a launch
// of the instantiated graph runs the recorded operations in order. The
// memory a capture allocates belongs to the graph (its addresses stay put
// for every launch); a graph whose allocations are not all freed again may
// not be relaunched, as CUDA refuses it.
#include <algorithm>

#include "driver.h"

using namespace emu::driver;

int emu::submit(void* s, Operation op, NodeKind kind, bool programmatic) {
    auto* stream = static_cast<CUstream>(s);
    if (stream && stream->capture) {
        stream->capture->nodes.push_back(std::move(op));
        stream->capture->kinds.push_back(std::make_unique<CUgraphNode_st>(CUgraphNode_st{kind, programmatic}));
        return CUDA_SUCCESS;
    }
    return op();
}

EMU_EXPORT CUresult cuStreamBeginCapture(CUstream stream, CUstreamCaptureMode) {
    if (!stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (stream->capture) return CUDA_ERROR_ILLEGAL_STATE;
    stream->capture = new CUgraph_st();
    stream->invalidated = false;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
    if (!stream || !graph) return CUDA_ERROR_INVALID_VALUE;
    if (!stream->capture) return CUDA_ERROR_ILLEGAL_STATE;
    CUgraph_st* captured = stream->capture;
    stream->capture = nullptr;
    if (stream->invalidated) {
        delete captured;
        *graph = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *graph = captured;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    *status = !stream || !stream->capture ? CU_STREAM_CAPTURE_STATUS_NONE
              : stream->invalidated       ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                          : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphInstantiate(CUgraphExec* exec, CUgraph graph, unsigned long long flags) {
    if (!exec || !graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new CUgraphExec_st{graph->nodes, graph->memory, flags, false};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    if (stream && stream->capture) return CUDA_ERROR_NOT_SUPPORTED;
    const bool auto_free = exec->flags & CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
    if (exec->launched && !exec->memory->unfreed.empty() && !auto_free) {
        report("a graph relaunched while allocations of its last launch are unfreed");
        return CUDA_ERROR_INVALID_VALUE;
    }
    exec->launched = true;
    for (auto& node : exec->nodes) {
        const int r = node();
        if (r != CUDA_SUCCESS) return (CUresult)r;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphUpload(CUgraphExec exec, CUstream) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

EMU_EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    delete exec;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphGetNodes(CUgraph graph, CUgraphNode* nodes, size_t* count) {
    if (!graph || !count) return CUDA_ERROR_INVALID_VALUE;
    if (nodes) {
        *count = std::min(*count, graph->kinds.size());
        for (size_t i = 0; i < *count; ++i) nodes[i] = graph->kinds[i].get();
    } else {
        *count = graph->kinds.size();
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphNodeGetType(CUgraphNode node, CUgraphNodeType* type) {
    if (!node || !type) return CUDA_ERROR_INVALID_VALUE;
    switch (node->kind) {
        case emu::NodeKind::Kernel: *type = CU_GRAPH_NODE_TYPE_KERNEL; break;
        case emu::NodeKind::Memcpy: *type = CU_GRAPH_NODE_TYPE_MEMCPY; break;
        case emu::NodeKind::Memset: *type = CU_GRAPH_NODE_TYPE_MEMSET; break;
        case emu::NodeKind::MemAlloc: *type = CU_GRAPH_NODE_TYPE_MEM_ALLOC; break;
        case emu::NodeKind::MemFree: *type = CU_GRAPH_NODE_TYPE_MEM_FREE; break;
        case emu::NodeKind::EventRecord: *type = CU_GRAPH_NODE_TYPE_EVENT_RECORD; break;
    }
    return CUDA_SUCCESS;
}

// The chain's edges, each node to the next; programmatic from kernel to a
// programmatic kernel, as stream capture makes them.
EMU_EXPORT CUresult cuGraphGetEdges_v2(CUgraph graph, CUgraphNode* from, CUgraphNode* to, CUgraphEdgeData* data, size_t* count) {
    if (!graph || !count) return CUDA_ERROR_INVALID_VALUE;
    const size_t edges = graph->kinds.empty() ? 0 : graph->kinds.size() - 1;
    if (!from && !to) {
        *count = edges;
        return CUDA_SUCCESS;
    }
    *count = std::min(*count, edges);
    for (size_t i = 0; i < *count; ++i) {
        const CUgraphNode_st* before = graph->kinds[i].get();
        CUgraphNode_st* after = graph->kinds[i + 1].get();
        if (from) from[i] = graph->kinds[i].get();
        if (to) to[i] = after;
        if (!data) continue;
        data[i] = CUgraphEdgeData{};
        if (after->programmatic && before->kind == emu::NodeKind::Kernel) {
            data[i].type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
            data[i].from_port = CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC;
        }
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphDestroy(CUgraph graph) {
    if (!graph) return CUDA_ERROR_INVALID_HANDLE;
    delete graph;
    return CUDA_SUCCESS;
}

