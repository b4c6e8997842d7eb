//! The CUDA backend. Its kernels (`kernels/*.cu`, one file per op family,
//! `<op>_<dtype>` entry points; `kernels/*.cuh`, what files share) are
//! embedded in the binary and compiled by NVRTC for the device's
//! architecture on first use, then cached on disk.
//! cudarc loads the CUDA libraries at run time, so the same binary runs
//! where there is no CUDA at all: [`gpu_count`] is 0 there.
//!
//! Activations are f32 on the device, as on the CPU. Weight matrices stay
//! bf16 (or f32; f16 is widened), vectors (norms, biases) are widened to f32
//! at load, and the KV cache is bf16. Small batches multiply through our
//! mat-vec kernel, which reads each weight once against f32 activations;
//! larger ones through cuBLAS with the activations rounded to bf16.

mod arena;
mod attention;
mod device;
mod gemm;
mod graph;
pub mod kernels;
mod launch;
mod matvec;
pub mod nccl;
mod ops;
mod sampling;
mod step;
mod timeline;

pub use arena::Scratch;
pub use device::{activity, gpu_count, measure_copy_bandwidth, memory_info, Activity, HeldGpu};
pub use gemm::WORKSPACE_BYTES as CUBLAS_WORKSPACE_BYTES;
pub use graph::{recorded_graphs, CudaGraph, GraphCensus};
pub use sampling::SampledFetch;
pub use step::CudaStep;
pub use timeline::{device_time, time_steps, DeviceTime};

use device::{arch_of, count_launch, wait_for, CAPTURING};

use super::{BackendError, DType, HostStaging, HostTensor, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, DriverError, LaunchConfig, ValidAsZeroBits,
};
use half::bf16;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Bytes a cached key or value takes: the KV cache is bf16.
pub const KV_CACHE_BYTES: usize = 2;

/// Bytes an element of a weight matrix of checkpoint dtype `dtype` takes
/// on the GPU: bf16 as it is, anything else widened to f32 (vectors, such
/// as norms and biases, are always f32).
pub fn weight_element_bytes(dtype: DType) -> usize {
    match dtype {
        DType::BF16 => 2,
        DType::F16 | DType::F32 => 4,
    }
}

/// A row-major `[rows, cols]` f32 matrix in device memory.
pub struct CudaTensor {
    data: Scratch<f32>,
    rows: usize,
    cols: usize,
    /// The same values rounded to bf16, where the kernel that wrote them
    /// wrote these too: a bf16 GEMM reads them instead of casting. Writing
    /// `data` through [`CudaTensor::data_mut`] drops them.
    rounded: Option<Scratch<bf16>>,
}

impl CudaTensor {
    /// The values, to write: any bf16 copy of them no longer holds.
    fn data_mut(&mut self) -> &mut Scratch<f32> {
        self.rounded = None;
        &mut self.data
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

enum WeightData {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

/// A parameter in device memory: a `[rows, cols]` matrix, or a vector
/// (`rows == 1`, always f32).
pub struct CudaWeight {
    data: WeightData,
    rows: usize,
    cols: usize,
}

impl WeightData {
    /// The entry point of a kernel with a variant per weight dtype.
    fn kernel(&self, bf16: &'static str, f32: &'static str) -> &'static str {
        match self {
            WeightData::Bf16(_) => bf16,
            WeightData::F32(_) => f32,
        }
    }

    /// Passes the weight as the launch's next argument.
    fn push_arg<'a>(&'a self, args: &mut launch::KernelArgs<'a>) {
        match self {
            WeightData::Bf16(v) => args.arg(v),
            WeightData::F32(v) => args.arg(v),
        };
    }
}

impl CudaWeight {
    /// The weight as an f32 vector or table (norms, biases, the RoPE table).
    fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            WeightData::F32(v) => Ok(v),
            WeightData::Bf16(_) => Err(BackendError::Device(format!("{what} must be an f32 weight"))),
        }
    }
}

/// One layer's paged KV cache: `[num_blocks · block_size, kv_heads, head_dim]` each, bf16.
pub struct CudaKvCache {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

/// Rows of a step's sampled tokens the device keeps for the next step's
/// [`crate::backend::PREVIOUS_SAMPLE`] ids (more than any step samples).
const PREVIOUS_ROWS: usize = 1 << 14;

/// One device, one stream: every op of a rank is queued in order on its
/// stream, and only copies to the host wait for it.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: gemm::Blas,
    functions: HashMap<&'static str, CudaFunction>,
    /// The GPU's streaming multiprocessors (how many blocks fill it).
    multiprocessors: usize,
    /// Page-locked buffers the sampled ids are copied into, for reuse.
    pinned: std::sync::Mutex<Vec<SampledFetch>>,
    /// Fill each buffer a kernel is to write with NaN first.
    poison: bool,
    timeline: timeline::Timeline,
    /// `[PREVIOUS_ROWS]`: the tokens the last sample picked, where the next
    /// step's embedding finds its `PREVIOUS_SAMPLE` ids.
    previous: CudaSlice<u32>,
    /// `[PREVIOUS_ROWS]`: the tokens of `previous` as the last step's
    /// embedding read them, at the rows its `PREVIOUS_SAMPLE` ids name:
    /// where the step's sampling rows find their coming tokens (`previous`
    /// itself is being rewritten by the other rows meanwhile).
    coming: CudaSlice<u32>,
    /// Zeros, one a block group of a split attention launch: each counts
    /// the group's finished splits, and the last sets it back to zero.
    arrivals: CudaSlice<u32>,
    /// What the blocks of a split sampling row leave for the last (`sampling.rs`).
    split_rows: sampling::SplitRows,
    /// Launch kernels programmatically (`launch.rs`).
    programmatic: bool,
    /// Multiply up to `MATVEC_MAX_TOKENS` tokens in the mat-vec kernels
    /// (off within [`CudaBackend::through_cublas`]).
    matvec: bool,
    /// The activations of forwards being recorded (`arena.rs`).
    arena: arena::Arena,
}

/// A stream on GPU `ordinal` (after `CUDA_VISIBLE_DEVICES`), in a context
/// without cudarc's per-buffer events: each user queues all its work on its
/// one stream and copies to the host synchronously.
fn open_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    let count = gpu_count();
    if ordinal >= count {
        return Err(BackendError::Device(match count {
            0 => "no CUDA GPU found (no driver library, or no visible device)".into(),
            n => format!("GPU {ordinal} requested but only {n} visible"),
        }));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error("opening the GPU"))?;
    // SAFETY: no buffer of this context is used on two streams.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().map_err(driver_error("creating a stream"))
}

impl CudaBackend {
    /// Opens GPU `ordinal` (after `CUDA_VISIBLE_DEVICES`) and loads every
    /// kernel, compiling those not in the disk cache.
    pub fn new(ordinal: usize) -> Result<Self> {
        let stream = open_stream(ordinal)?;
        let ctx = stream.context().clone();
        let capability = ctx.compute_capability().map_err(driver_error("reading the compute capability"))?;
        let arch = arch_of(capability)?;
        let mut functions = HashMap::new();
        for kernel in kernels::KERNELS {
            let cache = kernels::cache_dir();
            let (ptx, cached) = kernels::compile_cached(kernel, arch, cache.as_deref(), true).map_err(BackendError::Device)?;
            let module = match (ctx.load_module(ptx), cached) {
                (Ok(module), _) => module,
                // A cached PTX the driver refuses (made by another NVRTC): compile afresh.
                (Err(_), true) => {
                    let (ptx, _) = kernels::compile_cached(kernel, arch, cache.as_deref(), false).map_err(BackendError::Device)?;
                    ctx.load_module(ptx).map_err(driver_error(kernel.file))?
                }
                (Err(e), false) => return Err(driver_error(kernel.file)(e)),
            };
            for &entry in kernel.entry_points {
                functions.insert(entry, module.load_function(entry).map_err(driver_error(entry))?);
            }
        }
        attention::allow_shared_memory(&functions)?;
        let blas = gemm::Blas::new(stream.clone())?;
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error("reading the multiprocessor count"))? as usize;
        let previous = stream
            .alloc_zeros(PREVIOUS_ROWS)
            .map_err(alloc_error("the previous sample's tokens", PREVIOUS_ROWS * 4))?;
        let coming = stream
            .alloc_zeros(PREVIOUS_ROWS)
            .map_err(alloc_error("the step's coming tokens", PREVIOUS_ROWS * 4))?;
        let counters = attention::split_counters(multiprocessors);
        let arrivals = stream
            .alloc_zeros(counters)
            .map_err(alloc_error("attention's merge counters", counters * 4))?;
        let split_rows = sampling::SplitRows::new(&stream, multiprocessors)?;
        Ok(CudaBackend {
            stream,
            blas,
            functions,
            multiprocessors,
            pinned: std::sync::Mutex::new(Vec::new()),
            poison: false,
            timeline: Default::default(),
            previous,
            coming,
            arrivals,
            split_rows,
            programmatic: launch::programmatic_launches(capability, std::env::var_os("SHARDLINE_NO_PDL").as_deref()),
            matvec: true,
            arena: Default::default(),
        })
    }

    /// Whether a product of `tokens` tokens runs in the mat-vec kernels,
    /// which read each weight once for all of them, rather than in cuBLAS.
    pub fn through_matvec(&self, tokens: usize) -> bool {
        self.matvec && tokens <= matvec::MATVEC_MAX_TOKENS
    }

    /// `f` with every product sent through cuBLAS, the mat-vec kernels as
    /// they were after: `bench --kernels` times both sides of the hand-over.
    pub fn through_cublas<T>(&mut self, f: impl FnOnce(&Self) -> T) -> T {
        let matvec = std::mem::replace(&mut self.matvec, false);
        let out = f(self);
        self.matvec = matvec;
        out
    }

    /// Waits until the stream has run everything queued on it.
    pub fn synchronize(&self) -> Result<()> {
        wait_for("synchronizing the stream", || self.stream.synchronize())
    }

    /// From now on, every buffer a kernel is to write starts as NaN (all
    /// bits set, in f32 and bf16 alike), so a test can tell an element a
    /// kernel left unwritten from one it computed.
    pub fn poison_outputs(&mut self) {
        self.poison = true;
    }

    fn function(&self, name: &'static str) -> &CudaFunction {
        &self.functions[name]
    }

    /// `len` values, uninitialized, for a kernel to write every one of (the
    /// driver refuses empty allocations, so an empty one holds one unused value).
    fn alloc_for_kernel<T: DeviceRepr>(&self, len: usize, what: &str) -> Result<CudaSlice<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: every caller's kernel writes all `len` values before any is read.
        let mut slice = unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(alloc_error(what, bytes))?;
        if self.poison {
            poison(&self.stream, &mut slice)?;
        }
        Ok(slice)
    }

    /// As [`CudaBackend::alloc_for_kernel`], for a buffer that lives only
    /// during one forward: while this thread records a graph, a range of
    /// the arena. (Poisoned, the arena is NaN when made, not each range:
    /// a memset node between two kernels would part them.)
    fn scratch<T: DeviceRepr>(&self, len: usize, what: &str) -> Result<Scratch<T>> {
        match self.recording_arena() {
            Some(arena) => arena.scratch(&self.stream, len, || self.alloc_for_kernel(len, what)),
            None => Ok(Scratch::owned(self.alloc_for_kernel(len, what)?)),
        }
    }

    fn tensor(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        Ok(CudaTensor {
            data: self.scratch(rows * cols, what)?,
            rows,
            cols,
            rounded: None,
        })
    }

    fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, values: &[T], what: &str) -> Result<CudaSlice<T>> {
        let bytes = std::mem::size_of_val(values);
        match values.is_empty() {
            true => self.stream.alloc_zeros(1).map_err(alloc_error(what, bytes)),
            false => self.stream.clone_htod(values).map_err(alloc_error(what, bytes)),
        }
    }

    fn upload_weight(&self, host: &HostTensor) -> Result<WeightData> {
        let what = format!("a {:?} weight", host.shape);
        let vector = host.shape.len() < 2;
        Ok(match host.dtype {
            DType::BF16 if !vector => {
                // The bytes as they are (a little-endian host), copied only
                // where they are not aligned for bf16.
                let values: Cow<[bf16]> = bytemuck::try_cast_slice(&host.bytes).map_or_else(
                    |_| {
                        let mut aligned = vec![bf16::ZERO; host.bytes.len() / 2];
                        bytemuck::cast_slice_mut(&mut aligned).copy_from_slice(&host.bytes);
                        Cow::Owned(aligned)
                    },
                    Cow::Borrowed,
                );
                WeightData::Bf16(self.upload(&values, &what)?)
            }
            _ => WeightData::F32(self.upload(&host.to_f32(), &what)?),
        })
    }
}

impl HostStaging for CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }

    fn copy_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        let stream = self.data.stream();
        out.resize(self.len(), 0.0);
        if out.is_empty() {
            return Ok(());
        }
        wait_for("copying to the host", || {
            stream.memcpy_dtoh(&self.data.slice(..self.len()), out.as_mut_slice())?;
            stream.synchronize()
        })
    }

    fn copy_from_host(&mut self, values: &[f32]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let stream = self.data.stream().clone();
        stream
            .memcpy_htod(values, &mut **self.data_mut())
            .map_err(driver_error("copying from the host"))
    }
}

/// A launch of `blocks` blocks of `threads` threads with `shared` bytes of
/// dynamic shared memory.
fn grid(blocks: usize, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Enough blocks of 256 threads for a grid-strided loop over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).min(65_535), 256, 0)
}

/// Fills a buffer kernels are to write with 0xFF bytes (NaN as f32), in
/// stream order, so that a value no kernel wrote shows (tests ask for it,
/// [`CudaBackend::poison_outputs`]).
fn poison<T: DeviceRepr>(stream: &CudaStream, slice: &mut CudaSlice<T>) -> Result<()> {
    let bytes = slice.len() * std::mem::size_of::<T>();
    let (ptr, _written) = slice.device_ptr_mut(stream);
    // SAFETY: `ptr` holds `bytes` bytes, written in stream order.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.map_err(driver_error("poisoning an output"))
}

fn driver_error(context: &str) -> impl Fn(DriverError) -> BackendError + '_ {
    move |e| BackendError::Device(format!("CUDA error {context}: {e}"))
}

fn alloc_error(what: &str, bytes: usize) -> impl Fn(DriverError) -> BackendError + '_ {
    move |e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory {
            what: what.to_string(),
            bytes,
        },
        _ => BackendError::Device(format!("CUDA error allocating {bytes} bytes for {what}: {e}")),
    }
}
