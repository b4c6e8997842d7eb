//! What this process knows of its GPUs apart from any backend: how many
//! there are, their memory and copy bandwidth, whether their architecture
//! runs our kernels, and the launches and waits of every CUDA backend.

use super::{alloc_error, driver_error, open_stream};
use crate::backend::{BackendError, Result};
use cudarc::driver::{CudaContext, DriverError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Kernels queued (our launches and cuBLAS calls) by every CUDA backend of
/// this process, and the time their threads spent blocked waiting for a GPU.
static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static WAITED_NS: AtomicU64 = AtomicU64::new(0);

/// What the CUDA backends of this process have done so far; the difference
/// over a run of steps gives the kernels a step queues and the host time it
/// costs (its wall time less the waits).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Activity {
    pub launches: u64,
    pub waited: Duration,
}

pub fn activity() -> Activity {
    Activity {
        launches: LAUNCHES.load(Ordering::Relaxed),
        waited: Duration::from_nanos(WAITED_NS.load(Ordering::Relaxed)),
    }
}

pub(super) fn count_launch() {
    if !CAPTURING.get() {
        LAUNCHES.fetch_add(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// Whether this thread's stream is capturing a graph: what it queues
    /// then is recorded, not launched, and is counted when replayed.
    pub(super) static CAPTURING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `copy`, a copy to the host that waits for the stream, counting the
/// time as waited.
pub(super) fn wait_for(context: &str, copy: impl FnOnce() -> std::result::Result<(), DriverError>) -> Result<()> {
    let started = Instant::now();
    let done = copy().map_err(driver_error(context));
    WAITED_NS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    done
}

/// GPUs this process can use (`CUDA_VISIBLE_DEVICES` applies); 0 where the
/// driver library is missing or finds no device.
pub fn gpu_count() -> usize {
    // SAFETY: only tries to open the driver library; nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Free and total bytes of GPU `ordinal`'s memory, as its driver reports
/// them now (in its primary context, which counts among what is in use).
pub fn memory_info(ordinal: usize) -> Result<(usize, usize)> {
    HeldGpu::open(ordinal)?.memory_info()
}

/// A GPU's primary context, held open while this lives. The driver makes
/// a primary context on its first opening and tears it down at its last
/// closing; holding it keeps those who open the GPU meanwhile (a backend,
/// [`memory_info`]) from making it again.
pub struct HeldGpu(Arc<CudaContext>);

impl HeldGpu {
    pub fn open(ordinal: usize) -> Result<Self> {
        CudaContext::new(ordinal).map(HeldGpu).map_err(driver_error("opening the GPU"))
    }

    /// Free and total bytes of its memory now.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.0.mem_get_info().map_err(driver_error("reading the GPU's free memory"))
    }
}

/// The NVRTC virtual architecture for a compute capability; an unknown
/// newer GPU gets Hopper's PTX, which its driver compiles forward. The
/// kernels need bf16 tensor cores and cp.async: compute capability 8.0.
pub(super) fn arch_of((major, minor): (i32, i32)) -> Result<&'static str> {
    Ok(match (major, minor) {
        (m, _) if m < 8 => {
            return Err(BackendError::Device(format!(
                "a GPU of compute capability {major}.{minor}: shardline's kernels need 8.0 or later (Ampere, Ada, Hopper)"
            )))
        }
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (8, _) => "compute_80",
        _ => "compute_90",
    })
}

/// Device-to-device copy bandwidth of GPU `ordinal` in bytes/s, counting
/// bytes read and written: the best of ten copies of 1 GiB after a warm-up.
pub fn measure_copy_bandwidth(ordinal: usize) -> Result<f64> {
    let stream = open_stream(ordinal)?;
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes).map_err(alloc_error("a bandwidth probe", bytes))?;
    let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(alloc_error("a bandwidth probe", bytes))?;
    let mut copy = || -> Result<f64> {
        let started = std::time::Instant::now();
        stream.memcpy_dtod(&src, &mut dst).map_err(driver_error("copying on the device"))?;
        stream.synchronize().map_err(driver_error("synchronizing"))?;
        Ok(2.0 * bytes as f64 / started.elapsed().as_secs_f64())
    };
    copy()?;
    (0..10).map(|_| copy()).try_fold(0.0, |best, b| Ok(f64::max(best, b?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_before_ampere_are_refused_by_name() {
        assert_eq!(arch_of((8, 0)).unwrap(), "compute_80");
        assert_eq!(arch_of((8, 9)).unwrap(), "compute_89");
        assert_eq!(arch_of((9, 0)).unwrap(), "compute_90");
        assert_eq!(arch_of((10, 0)).unwrap(), "compute_90");
        let refused = arch_of((7, 5)).unwrap_err().to_string();
        assert!(refused.contains("7.5") && refused.contains("8.0 or later"), "{refused}");
    }
}
