//! The CUDA backend. Its kernels (`kernels/*.cu`, one file per op family,
//! `<op>_<dtype>` entry points) are embedded in the binary and compiled by
//! NVRTC for the device's architecture. cudarc loads the CUDA libraries at
//! run time, so the same binary runs where there is no CUDA at all.

pub mod kernels;
