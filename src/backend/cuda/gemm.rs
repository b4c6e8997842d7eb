//! Dense matmuls through cuBLAS: `out [n, outs] = x [n, in] · wᵀ` for
//! row-major `x` and `w [outs, in]`, with f32 output and f32 accumulation.
//!
//! cuBLAS is column-major, where row-major `w` reads as `wᵀ [in, outs]` and
//! `x` as `xᵀ [in, n]`; so the product asked of it is `op(A)·B` with
//! `A = wᵀ` transposed: `outᵀ [outs, n] = w · xᵀ`, which is row-major `out`.

use super::{count_launch, driver_error};
use crate::backend::{BackendError, Result};
use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::ffi::c_void;
use std::sync::Arc;

/// cuBLAS's workspace, owned here and set once: a GEMM recorded into a
/// CUDA graph then uses this buffer at replay instead of allocating one
/// inside the capture (32 MiB is what cuBLAS asks for on Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
    _workspace: CudaSlice<u8>,
}

/// The two weight dtypes a GEMM takes, with activations of the same type.
pub enum Operands<'a> {
    Bf16 { w: &'a CudaSlice<bf16>, x: &'a CudaSlice<bf16> },
    F32 { w: &'a CudaSlice<f32>, x: &'a CudaSlice<f32> },
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only checks whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(BackendError::Device("libcublas cannot be loaded (LD_LIBRARY_PATH?)".into()));
        }
        let handle = CudaBlas::new(stream.clone()).map_err(|e| BackendError::Device(format!("creating a cuBLAS handle: {e}")))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(driver_error("allocating cuBLAS's workspace"))?;
        {
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the buffer lives as long as the handle (both in `Blas`),
            // and the handle's stream is the one it was allocated on.
            unsafe { sys::cublasSetWorkspace_v2(*handle.handle(), ptr as *mut c_void, WORKSPACE_BYTES) }
                .result()
                .map_err(|e| BackendError::Device(format!("setting cuBLAS's workspace: {e}")))?;
        }
        Ok(Blas {
            handle,
            stream,
            _workspace: workspace,
        })
    }

    /// `out [n, outs] = x [n, in] · wᵀ`, overwriting `out`, or adding to it
    /// with `accumulate`.
    pub fn matmul(
        &self,
        operands: Operands<'_>,
        out: &mut CudaSlice<f32>,
        n: usize,
        inner: usize,
        outs: usize,
        accumulate: bool,
    ) -> Result<()> {
        let stream = &self.stream;
        stream
            .context()
            .bind_to_thread()
            .map_err(driver_error("binding the GPU to this thread"))?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let (c, _out_sync) = out.device_ptr_mut(stream);
        let dims = |v: usize, name: &str| {
            i32::try_from(v).map_err(|_| BackendError::Device(format!("GEMM {name} = {v} exceeds cuBLAS's 32-bit sizes")))
        };
        let (m, n, k) = (dims(outs, "outs")?, dims(n, "n")?, dims(inner, "inner")?);
        let (a, b, a_sync, b_sync, dtype) = match operands {
            Operands::Bf16 { w, x } => {
                let (a, a_sync) = w.device_ptr(stream);
                let (b, b_sync) = x.device_ptr(stream);
                (a, b, a_sync, b_sync, sys::cudaDataType::CUDA_R_16BF)
            }
            Operands::F32 { w, x } => {
                let (a, a_sync) = w.device_ptr(stream);
                let (b, b_sync) = x.device_ptr(stream);
                (a, b, a_sync, b_sync, sys::cudaDataType::CUDA_R_32F)
            }
        };
        count_launch();
        // SAFETY: a is [outs, in], b is [n, in] and c is [n, outs], all on this
        // handle's stream, as the dimensions passed say.
        let status = unsafe {
            blas::gemm_ex(
                *self.handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                dtype,
                k,
                b as *const c_void,
                dtype,
                k,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                m,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        drop((a_sync, b_sync));
        status.map_err(|e| BackendError::Device(format!("cuBLAS GEMM [{n}, {k}] · [{m}, {k}]ᵀ: {e}")))?;
        stream.context().check_err().map_err(driver_error("after a GEMM"))
    }
}
