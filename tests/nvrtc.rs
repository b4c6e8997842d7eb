//! Every CUDA kernel compiles with NVRTC for Ampere and Hopper, and defines
//! the entry points the backend launches. Needs no GPU: only the NVRTC
//! library and the CUDA headers (`.ci/run` installs them from pip). Where
//! NVRTC is absent the test says so and passes.

use shardline::backend::cuda::kernels::{
    cache_path, compile, compile_cached, include_dirs, missing_headers, nvrtc_available, KernelSource, HEADERS, KERNELS,
};

/// Whether NVRTC can run here; CI sets SHARDLINE_CUDA_INCLUDE beside the
/// library, and there a missing NVRTC is a failure, not a skip.
fn nvrtc_here() -> bool {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("SHARDLINE_CUDA_INCLUDE").is_none(),
            "SHARDLINE_CUDA_INCLUDE is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH; .ci/run installs it)");
        return false;
    }
    true
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_here() {
        return;
    }
    let includes = include_dirs();
    let missing = missing_headers(&includes);
    assert!(missing.is_empty(), "{missing:?} not found: set SHARDLINE_CUDA_INCLUDE");
    for arch in ["compute_80", "compute_90"] {
        for kernel in KERNELS {
            let ptx = compile(kernel, arch, &includes).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let text = ptx.to_src();
            for entry in kernel.entry_points {
                assert!(text.contains(&format!(".entry {entry}(")), "{arch}: {} lacks {entry}", kernel.file);
            }
            // Every kernel waits for the one before (programmatic dependent
            // launch) where the instruction exists, from Hopper on.
            let waits = text.matches("griddepcontrol.wait").count();
            match arch {
                "compute_90" => assert!(waits >= kernel.entry_points.len(), "{arch}: {} waits {waits} times", kernel.file),
                _ => assert_eq!(waits, 0, "{arch}: {} has griddepcontrol", kernel.file),
            }
            // Attention multiplies on the tensor cores, fed by asynchronous copies.
            if kernel.file == "attention.cu" {
                for instruction in [
                    "wmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32",
                    "cp.async.cg.shared.global",
                ] {
                    assert!(text.contains(instruction), "{arch}: attention.cu has no {instruction}");
                }
            }
        }
    }
}

#[test]
fn headers_missing_from_every_folder_are_named() {
    let (bare, runtime) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(runtime.path().join("cuda_bf16.h"), "").unwrap();
    std::fs::write(runtime.path().join("cuda_pipeline_primitives.h"), "").unwrap();
    let dirs = |d: &[&tempfile::TempDir]| d.iter().map(|d| d.path().to_path_buf()).collect::<Vec<_>>();
    assert_eq!(missing_headers(&dirs(&[&bare])), HEADERS);
    // pip's nvidia-cuda-runtime without nvidia-cuda-crt.
    assert_eq!(missing_headers(&dirs(&[&bare, &runtime])), ["crt/mma.h"]);
    std::fs::create_dir(bare.path().join("crt")).unwrap();
    std::fs::write(bare.path().join("crt/mma.h"), "").unwrap();
    assert!(missing_headers(&dirs(&[&bare, &runtime])).is_empty());
}

#[test]
fn compiled_kernels_are_cached_by_content_and_a_bad_cache_only_costs_a_recompile() {
    if !nvrtc_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = &KERNELS[0];
    let (fresh, cached) = compile_cached(kernel, "compute_80", Some(dir.path()), true).unwrap();
    assert!(!cached);
    assert!(cache_path(dir.path(), kernel, "compute_80").exists());
    let (again, cached) = compile_cached(kernel, "compute_80", Some(dir.path()), true).unwrap();
    assert!(cached, "the second compile reads the cache");
    assert_eq!(again.to_src(), fresh.to_src());
    assert!(!compile_cached(kernel, "compute_80", Some(dir.path()), false).unwrap().1);
    // Another source or architecture is another entry.
    let edited = KernelSource {
        source: "extern \"C\" __global__ void edited() {}",
        ..*kernel
    };
    assert_ne!(
        cache_path(dir.path(), &edited, "compute_80"),
        cache_path(dir.path(), kernel, "compute_80")
    );
    assert_ne!(
        cache_path(dir.path(), kernel, "compute_90"),
        cache_path(dir.path(), kernel, "compute_80")
    );
    // A cache folder that cannot be made (under a file) still compiles.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (ptx, cached) = compile_cached(kernel, "compute_80", Some(&file.join("cache")), true).unwrap();
    assert!(!cached && ptx.to_src() == fresh.to_src());
}
