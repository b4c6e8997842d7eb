//! The kernel sources, and their compilation to PTX by NVRTC. Each file is
//! compiled with `kernels/common.cuh` (block reductions) in front.
//!
//! NVRTC needs `cuda_bf16.h` on its include path: the CUDA toolkit's
//! `include` folder, or the one the pip package `nvidia-cuda-runtime` ships.
//! [`include_dirs`] looks in `SHARDLINE_CUDA_INCLUDE` (folders separated by
//! `:`), then `$CUDA_HOME/include` and `/usr/local/cuda/include`.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::path::PathBuf;

/// One kernel file and the entry points it defines.
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

macro_rules! kernel {
    ($file:literal, [$($entry:literal),+ $(,)?]) => {
        KernelSource {
            file: $file,
            source: include_str!(concat!("../../../kernels/", $file)),
            entry_points: &[$($entry),+],
        }
    };
}

pub const KERNELS: &[KernelSource] = &[
    kernel!("embedding.cu", ["embedding_bf16"]),
    kernel!("rms_norm.cu", ["rms_norm_bf16", "add_rms_norm_bf16"]),
    kernel!("rope.cu", ["rope_neox_f32"]),
    kernel!("activation.cu", ["silu_mul_f32"]),
    kernel!("kv_cache.cu", ["write_kv_bf16"]),
    kernel!("attention.cu", ["paged_attention_bf16"]),
    kernel!("sampling.cu", ["argmax_f32"]),
];

/// Helpers (block reductions, constants) prepended to every kernel file.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Whether the NVRTC library can be loaded (compiling needs no GPU).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the shared library; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Folders to search for CUDA headers, those that exist.
pub fn include_dirs() -> Vec<PathBuf> {
    let from_env = std::env::var("SHARDLINE_CUDA_INCLUDE").unwrap_or_default();
    let cuda_home = std::env::var("CUDA_HOME").map(|h| PathBuf::from(h).join("include")).ok();
    from_env
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .chain(cuda_home)
        .chain([PathBuf::from("/usr/local/cuda/include")])
        .filter(|dir| dir.join("cuda_bf16.h").exists())
        .collect()
}

/// Compiles one kernel file to PTX for a virtual architecture such as
/// `compute_90`; the error carries NVRTC's log.
pub fn compile(kernel: &KernelSource, arch: &'static str, include_dirs: &[PathBuf]) -> Result<Ptx, String> {
    let options = CompileOptions {
        arch: Some(arch),
        include_paths: include_dirs.iter().map(|d| d.display().to_string()).collect(),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(format!("{COMMON}\n{}", kernel.source), options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!("{}: {}", kernel.file, log.to_string_lossy()),
        other => format!("{}: {other:?}", kernel.file),
    })
}
