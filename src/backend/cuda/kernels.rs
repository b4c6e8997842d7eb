//! The kernel sources, and their compilation to PTX by NVRTC. Each file is
//! compiled with `kernels/common.cuh` (block reductions) in front, and with
//! the headers of ours it names (`#include "…"`, [`OWN_HEADERS`]) written
//! in, so the binary carries every kernel's whole text.
//!
//! NVRTC needs the CUDA headers the kernels include ([`HEADERS`]) on its
//! include path: the CUDA toolkit's `include` folder, or the one the pip
//! packages `nvidia-cuda-runtime` and `nvidia-cuda-crt` fill.
//! [`include_dirs`] looks in `SHARDLINE_CUDA_INCLUDE` (folders separated by
//! `:`), then `$CUDA_HOME/include` and `/usr/local/cuda/include`.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::path::{Path, PathBuf};

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
    kernel!("embedding.cu", ["embedding_bf16", "embedding_f32"]),
    kernel!("rms_norm.cu", ["rms_norm_f32", "rms_norm_bf16", "rms_norm_rows_f32"]),
    kernel!("activation.cu", ["silu_mul_f32"]),
    kernel!("kv_cache.cu", ["rope_write_kv_bf16"]),
    kernel!(
        "attention.cu",
        ["paged_attention_bf16_d32", "paged_attention_bf16_d64", "paged_attention_bf16_d128"]
    ),
    kernel!(
        "linear.cu",
        [
            "matvec_bf16",
            "matvec_f32",
            "matvec_swiglu_bf16",
            "matvec_swiglu_f32",
            "matvec_qkv_rope_bf16",
            "matvec_qkv_rope_f32"
        ]
    ),
    kernel!("elementwise.cu", ["add_f32", "add_bias_f32", "cast_f32_bf16", "lay_out_vocab_f32"]),
    kernel!("sampling.cu", ["sample_f32"]),
];

/// Helpers (block reductions, constants) prepended to every kernel file.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Headers in `kernels/` that a kernel file may include (the emulated
/// driver's build and `benches/kernel_sass.py` find them on their include path).
pub const OWN_HEADERS: &[(&str, &str)] = &[
    ("row_select.cuh", include_str!("../../../kernels/row_select.cuh")),
    ("split_rows.cuh", include_str!("../../../kernels/split_rows.cuh")),
];

/// What NVRTC compiles for `kernel`: [`COMMON`], then its file with each
/// `#include` of one of [`OWN_HEADERS`] replaced by that header's text.
pub fn full_source(kernel: &KernelSource) -> String {
    let mut text = format!("{COMMON}\n");
    for line in kernel.source.lines() {
        let own = line
            .strip_prefix("#include \"")
            .and_then(|rest| rest.strip_suffix('"'))
            .and_then(|name| OWN_HEADERS.iter().find(|(file, _)| *file == name));
        text.push_str(own.map_or(line, |(_, header)| header));
        text.push('\n');
    }
    text
}

/// Whether the NVRTC library can be loaded (compiling needs no GPU).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the shared library; nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The CUDA headers the kernels include, directly or through `mma.h`.
pub const HEADERS: [&str; 3] = ["cuda_bf16.h", "cuda_pipeline_primitives.h", "crt/mma.h"];

/// Folders to search for CUDA headers, those that hold any of [`HEADERS`].
pub fn include_dirs() -> Vec<PathBuf> {
    let from_env = std::env::var("SHARDLINE_CUDA_INCLUDE").unwrap_or_default();
    let cuda_home = std::env::var("CUDA_HOME").map(|h| PathBuf::from(h).join("include")).ok();
    from_env
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .chain(cuda_home)
        .chain([PathBuf::from("/usr/local/cuda/include")])
        .filter(|dir| HEADERS.iter().any(|h| dir.join(h).exists()))
        .collect()
}

/// The [`HEADERS`] none of `dirs` holds.
pub fn missing_headers(dirs: &[PathBuf]) -> Vec<&'static str> {
    HEADERS
        .into_iter()
        .filter(|h| !dirs.iter().any(|dir| dir.join(h).exists()))
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
    compile_ptx_with_opts(full_source(kernel), options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!("{}: {}", kernel.file, log.to_string_lossy()),
        other => format!("{}: {other:?}", kernel.file),
    })
}

/// Where compiled PTX is kept between runs: `SHARDLINE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/shardline/kernels`, else `~/.cache/shardline/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SHARDLINE_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("shardline").join("kernels"))
}

/// The cache file of `kernel` for `arch`, named by a hash of its full source
/// and the architecture, so an edited kernel never reads a stale entry.
pub fn cache_path(dir: &Path, kernel: &KernelSource, arch: &str) -> PathBuf {
    let key = format!("{}\0{arch}", full_source(kernel));
    let stem = kernel.file.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{:016x}.ptx", crate::rng::fnv1a(key.as_bytes())))
}

/// Compiles `kernel` for `arch`, or (with `read_cache`) reads the PTX an
/// earlier run left in the `cache` folder; returns whether it came from there. A cache
/// that cannot be written costs a recompile next time, nothing more.
pub fn compile_cached(kernel: &KernelSource, arch: &'static str, cache: Option<&Path>, read_cache: bool) -> Result<(Ptx, bool), String> {
    let path = cache.map(|dir| cache_path(dir, kernel, arch));
    if let Some(text) = path.as_ref().filter(|_| read_cache).and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok((Ptx::from_src(text), true));
    }
    if !nvrtc_available() {
        return Err(format!(
            "{}: libnvrtc cannot be loaded to compile it (LD_LIBRARY_PATH?)",
            kernel.file
        ));
    }
    let includes = include_dirs();
    let missing = missing_headers(&includes);
    if !missing.is_empty() {
        return Err(format!(
            "{}: {} not found; set SHARDLINE_CUDA_INCLUDE or CUDA_HOME to a CUDA include folder \
             (pip install nvidia-cuda-runtime nvidia-cuda-crt fills one)",
            kernel.file,
            missing.join(", ")
        ));
    }
    let ptx = compile(kernel, arch, &includes)?;
    if let Some(path) = path {
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
            let partial = path.with_extension(format!("{}.partial", std::process::id()));
            std::fs::write(&partial, ptx.to_src())?;
            std::fs::rename(&partial, &path)
        });
        if let Err(e) = written {
            eprintln!("shardline: could not cache {} in {}: {e}", kernel.file, path.display());
        }
    }
    Ok((ptx, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_headers_are_written_into_the_files_that_include_them() {
        for kernel in KERNELS {
            let text = full_source(kernel);
            assert!(text.starts_with(COMMON), "{}", kernel.file);
            assert!(
                !text.lines().any(|l| l.starts_with("#include \"")),
                "{} keeps an #include of ours",
                kernel.file
            );
        }
        let sampling = KERNELS.iter().find(|k| k.file == "sampling.cu").expect("sampling.cu");
        for (name, header) in OWN_HEADERS {
            assert!(sampling.source.contains(&format!("#include \"{name}\"")));
            assert!(full_source(sampling).contains(header));
        }
    }
}
