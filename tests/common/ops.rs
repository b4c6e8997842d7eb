//! What the CUDA op tests share: a poisoned GPU, random weights and
//! activations on both backends, one-sequence batches, and the comparison of
//! a device tensor with the CPU backend's.

use half::bf16;
use shardline::backend::cpu::CpuTensor;
use shardline::backend::cuda::{CudaBackend, CudaTensor};
use shardline::backend::{Backend, DType, HostStaging, HostTensor};
use shardline::model::{ForwardBatch, Sampling};
use shardline::rng::Rng;
use shardline::sampling::RowSampling;

/// The bound for f32 paths.
pub const EXACT: f64 = 1e-5;

/// GPU 0 with its outputs poisoned (`super::poisoned_gpu`), where one is visible.
pub fn gpu() -> Option<CudaBackend> {
    super::gpu_visible().then(|| super::poisoned_gpu(0))
}

/// `n` values uniform in ±1.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::seeded(seed);
    (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// A weight uniform in ±1.
pub fn weight(shape: &[usize], dtype: DType, seed: u64) -> HostTensor {
    scaled_weight(shape, dtype, seed, 1.0)
}

/// Uniform in ±`scale`; a power of two keeps bf16 weights exact.
pub fn scaled_weight(shape: &[usize], dtype: DType, seed: u64, scale: f32) -> HostTensor {
    let values: Vec<f32> = random(shape.iter().product(), seed).iter().map(|v| v * scale).collect();
    match dtype {
        DType::BF16 => HostTensor {
            dtype,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        },
        _ => HostTensor::from_f32(shape.to_vec(), &values),
    }
}

/// The same `[rows, cols]` activations on both devices.
pub fn activations(gpu: &CudaBackend, rows: usize, cols: usize, seed: u64) -> (CpuTensor, CudaTensor) {
    let values = random(rows * cols, seed);
    let mut device = gpu.zeros(rows, cols).unwrap();
    device.copy_from_host(&values).unwrap();
    (CpuTensor::new(values, rows, cols), device)
}

/// One sequence of `ids` whose rows `rows` give logits, sampled as
/// `sampling` says (one per row, or none).
pub fn batch_of(ids: &[u32], rows: &[u32], sampling: Vec<RowSampling>) -> ForwardBatch {
    let blocks: Vec<u32> = (0..ids.len().div_ceil(16) as u32).collect();
    let mut batch = ForwardBatch::single(ids, 0, &blocks, 16, false);
    batch.logit_rows = rows.to_vec();
    if !sampling.is_empty() {
        batch.sampling = Sampling::Model {
            rows: sampling,
            logits: false,
        };
    }
    batch
}

/// The device tensor holds the CPU one's rows, within `tolerance` and all finite.
pub fn assert_close(cpu: &CpuTensor, gpu: &CudaBackend, device: &CudaTensor, tolerance: f64, what: &str) {
    let mut ours = Vec::new();
    gpu.to_host(device, &mut ours).unwrap();
    assert_eq!((device.rows(), device.cols()), (cpu.rows, cpu.cols), "{what}: shape");
    assert!(
        ours.iter().all(|v| v.is_finite()),
        "{what}: a value is not finite (an element left unwritten?)"
    );
    super::assert_rows_close(&ours, &cpu.data, cpu.cols, tolerance, what);
}
