//! Where weights come from: a Hugging Face safetensors checkpoint (one file or
//! sharded, memory-mapped) or deterministic random weights of the right shapes
//! (`--load-format dummy`, for benchmarks without a download).
//!
//! Every failure names the file and the problem, so a user can fix it.

mod dummy;
mod safetensors;

pub use self::dummy::DummyWeights;
pub use self::safetensors::SafetensorsCheckpoint;

use crate::backend::{BackendError, DType, HostTensor};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture {architecture:?}; shardline runs Qwen2ForCausalLM models")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: no weights found: expected model.safetensors or model.safetensors.index.json (or use --load-format dummy)")]
    NoWeights { path: PathBuf },
    #[error("{path}: not a valid safetensors file: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {name:?} has dtype {dtype}; supported dtypes are bf16, f16 and f32")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: {message}")]
    BadArgument { path: PathBuf, message: String },
    #[error("uploading weights: {0}")]
    Backend(#[from] BackendError),
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io { path: path.into(), source }
    }

    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        LoadError::Json { path: path.into(), source }
    }

    pub(crate) fn invalid_config(path: &Path, message: String) -> Self {
        LoadError::InvalidConfig {
            path: path.into(),
            message,
        }
    }
}

/// A source of named tensors of known shape.
pub trait WeightSource {
    /// The tensor `name`, which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError>;

    /// Whether the source holds `name` (for optional tensors such as an untied LM head).
    fn contains(&self, name: &str) -> bool;

    /// The dtype tensor `name` is stored in.
    fn dtype(&self, name: &str) -> Result<DType, LoadError>;

    /// Rows `rows` of tensor `name` (which must have `shape`) and, for a
    /// matrix, only columns `cols`: one tensor-parallel rank's slice.
    /// Sources that can read a slice alone (memory-mapped files) override
    /// this, so a rank never holds more than its share.
    fn tensor_slice(&self, name: &str, shape: &[usize], rows: Range<usize>, cols: Option<Range<usize>>) -> Result<HostTensor, LoadError> {
        let rows = self.tensor(name, shape)?.slice_rows(rows);
        Ok(match cols {
            Some(cols) => rows.slice_cols(cols),
            None => rows,
        })
    }
}

/// How `--model` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadFormat {
    /// Safetensors weights from the model folder.
    #[default]
    Safetensors,
    /// Random weights of the config's shapes, deterministic by seed.
    Dummy,
}

/// The paths a `--model` argument names: the folder holding the files and its
/// `config.json`. A path to a `.json` file is taken as the config itself.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl ModelPaths {
    pub fn resolve(model: &Path) -> Result<Self, LoadError> {
        if model.is_dir() {
            return Ok(ModelPaths {
                dir: model.into(),
                config: model.join("config.json"),
            });
        }
        if model.extension().is_some_and(|e| e == "json") && model.is_file() {
            let dir = model.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(ModelPaths { dir, config: model.into() });
        }
        Err(LoadError::io(
            model,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder or config.json"),
        ))
    }
}

pub(crate) fn dtype_from_safetensors(dtype: ::safetensors::Dtype) -> Option<DType> {
    match dtype {
        ::safetensors::Dtype::F32 => Some(DType::F32),
        ::safetensors::Dtype::F16 => Some(DType::F16),
        ::safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}
