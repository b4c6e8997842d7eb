//! Helpers shared by the integration tests: fixture paths, reading the
//! Hugging Face reference tensors, loading fixture models on the CPU backend.

#![allow(dead_code)] // each test binary uses its own subset

pub mod chat;
pub mod engine;
pub mod http;
pub mod ops;
pub mod sampled;
pub mod split;

use safetensors::SafeTensors;
use shardline::backend::cpu::CpuBackend;
use shardline::backend::DType;
use shardline::generation::Generator;
use shardline::loader::LoadFormat;
use shardline::model_dir::{self, LoadedModel, ModelOptions};
use std::path::{Path, PathBuf};

/// The repository root: `SHARDLINE_REPO` where test binaries built on one
/// machine run in a copy of the repository on another (tests/gpu-check.sh).
pub fn repo() -> PathBuf {
    std::env::var_os("SHARDLINE_REPO").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The `shardline` binary: `SHARDLINE_BIN` where it was carried elsewhere.
pub fn shardline_bin() -> PathBuf {
    std::env::var_os("SHARDLINE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_shardline")), PathBuf::from)
}

/// Whether a CUDA GPU is visible for the GPU tests; where none is, they
/// skip, saying so, unless `SHARDLINE_REQUIRE_GPU` is set (on a GPU
/// machine, or the emulated driver), where a skip would hide a test.
pub fn gpu_visible() -> bool {
    let visible = shardline::backend::cuda::gpu_count() > 0;
    match (visible, std::env::var_os("SHARDLINE_REQUIRE_GPU").is_some()) {
        (true, _) => true,
        (false, true) => panic!("SHARDLINE_REQUIRE_GPU is set but no CUDA GPU is visible"),
        (false, false) => {
            eprintln!("skipped: no CUDA GPU visible");
            false
        }
    }
}

/// GPU `ordinal`, with every output buffer filled with NaN before a kernel
/// writes it, so an element a kernel leaves unwritten shows.
pub fn poisoned_gpu(ordinal: usize) -> shardline::backend::cuda::CudaBackend {
    let mut gpu = shardline::backend::cuda::CudaBackend::new(ordinal).expect("opening the GPU");
    gpu.poison_outputs();
    gpu
}

/// A vendored test model: `tiny-chat` lives in `models/`, the others in `tests/fixtures/`.
pub fn model_dir(name: &str) -> PathBuf {
    match name {
        "tiny-chat" => repo().join("models/tiny-chat"),
        _ => repo().join("tests/fixtures").join(name),
    }
}

pub fn reference_path(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name).join("reference.safetensors")
}

pub fn options(dir: &Path) -> ModelOptions {
    ModelOptions {
        model: dir.into(),
        load_format: LoadFormat::Safetensors,
        seed: 0,
        dummy_dtype: DType::BF16,
    }
}

pub fn load(name: &str) -> LoadedModel<CpuBackend> {
    model_dir::open(CpuBackend::default(), &options(&model_dir(name))).unwrap()
}

pub fn generator(name: &str, capacity: usize) -> Generator {
    Generator::new(load(name).model, capacity).unwrap()
}

/// The reference tensors of a fixture, by name.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(name: &str) -> Self {
        Reference {
            bytes: std::fs::read(reference_path(name)).unwrap(),
        }
    }

    fn view(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("reference has no {key}"));
        (t.shape().to_vec(), t.data().to_vec())
    }

    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).unwrap().names().contains(&key)
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        let (_, data) = self.view(key);
        data.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    }

    /// `(rows, cols, values)` of an f32 matrix.
    pub fn matrix(&self, key: &str) -> (usize, usize, Vec<f32>) {
        let (shape, data) = self.view(key);
        let values = data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        (shape[0], shape[1], values)
    }
}

/// ‖ours − ref‖ / ‖ref‖ over one row; ‖ours‖ where the reference is all zeros.
pub fn relative_error(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    match norm {
        0.0 => diff.sqrt(),
        _ => (diff / norm).sqrt(),
    }
}

/// Asserts each row of `ours` is within `tolerance` of the matching row of `reference`.
pub fn assert_rows_close(ours: &[f32], reference: &[f32], cols: usize, tolerance: f64, what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: row counts differ");
    for (row, (a, b)) in ours.chunks(cols).zip(reference.chunks(cols)).enumerate() {
        let err = relative_error(a, b);
        assert!(err < tolerance, "{what}: position {row} relative error {err:.2e} ≥ {tolerance:.0e}");
    }
}

pub fn prompt_keys(reference: &Reference) -> Vec<String> {
    (0..)
        .map(|i| format!("prompt{i}"))
        .take_while(|p| reference.has(&format!("{p}.input_ids")))
        .collect()
}
