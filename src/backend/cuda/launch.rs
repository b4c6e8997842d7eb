//! Kernel launches. Arguments are gathered as the driver takes them and
//! queued with `cuLaunchKernelEx`, on GPUs of compute capability 9.0 and
//! later with programmatic stream serialization: a kernel may then start
//! while the one before it drains, fetch its weights, and wait for its
//! inputs in the kernel itself (`wait_for_previous_kernels` in
//! `kernels/common.cuh`, which every kernel calls before it reads an
//! activation or writes anything). A decode step's kernels are short (a
//! few µs each for the 7B shape's mat-vecs), so the gap and ramp between
//! two of them is a real share of the step; `SHARDLINE_NO_PDL=1` launches
//! them one after another, for comparison.

use super::{count_launch, driver_error, CudaBackend, Scratch};
use crate::backend::Result;
use cudarc::driver::sys::{self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig};
use std::ffi::c_void;
use std::marker::PhantomData;

/// Whether kernels on a GPU of this compute capability are launched
/// programmatically: Hopper and later, unless `SHARDLINE_NO_PDL` (its
/// value `no_pdl`) is set to anything but empty or 0.
pub(super) fn programmatic_launches((major, _minor): (i32, i32), no_pdl: Option<&std::ffi::OsStr>) -> bool {
    major >= 9 && no_pdl.is_none_or(|v| v.is_empty() || v == "0")
}

/// One argument as the driver takes it: a device address (held here) or a
/// pointer to a scalar the caller holds.
enum Param {
    Address(sys::CUdeviceptr),
    Scalar(*const c_void),
}

/// One launch's arguments, in the order the kernel declares them.
pub(super) struct KernelArgs<'a> {
    stream: &'a CudaStream,
    function: &'a CudaFunction,
    params: Vec<Param>,
    borrows: PhantomData<&'a ()>,
}

/// A value a kernel takes as an argument: a device buffer (its address)
/// or a scalar.
pub(super) trait KernelArg {
    fn push_to<'a>(&'a self, args: &mut KernelArgs<'a>);
}

impl<T> KernelArg for CudaSlice<T> {
    fn push_to<'a>(&'a self, args: &mut KernelArgs<'a>) {
        let (address, _) = self.device_ptr(args.stream);
        args.push_pointer(address);
    }
}

impl<T> KernelArg for CudaView<'_, T> {
    fn push_to<'a>(&'a self, args: &mut KernelArgs<'a>) {
        let (address, _) = self.device_ptr(args.stream);
        args.push_pointer(address);
    }
}

impl<T> KernelArg for Scratch<T> {
    fn push_to<'a>(&'a self, args: &mut KernelArgs<'a>) {
        (**self).push_to(args);
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push_to<'a>(&'a self, args: &mut KernelArgs<'a>) {
                args.params.push(Param::Scalar(self as *const $t as *const c_void));
            }
        }
    )*};
}
scalar_arg!(i32, u32, u64, usize, f32);

impl<'a> KernelArgs<'a> {
    /// An argument the kernel reads.
    pub(super) fn arg<A: KernelArg + ?Sized>(&mut self, value: &'a A) -> &mut Self {
        value.push_to(self);
        self
    }

    /// A buffer the kernel writes: borrowed mutably until the launch, so
    /// it cannot also be passed as an input.
    pub(super) fn out<A: KernelArg + ?Sized>(&mut self, buffer: &'a mut A) -> &mut Self {
        buffer.push_to(self);
        self
    }

    /// An optional buffer the kernel reads: a null pointer where absent.
    pub(super) fn arg_or_null<A: KernelArg + ?Sized>(&mut self, value: Option<&'a A>) -> &mut Self {
        match value {
            Some(v) => self.arg(v),
            None => self.null(),
        }
    }

    /// An optional buffer the kernel writes: a null pointer where absent.
    pub(super) fn out_or_null<A: KernelArg + ?Sized>(&mut self, buffer: Option<&'a mut A>) -> &mut Self {
        match buffer {
            Some(b) => self.out(b),
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut Self {
        self.push_pointer(0);
        self
    }

    fn push_pointer(&mut self, address: sys::CUdeviceptr) {
        self.params.push(Param::Address(address));
    }
}

impl CudaBackend {
    /// The arguments of a launch of kernel `name`.
    pub(super) fn kernel_args(&self, name: &'static str) -> KernelArgs<'_> {
        KernelArgs {
            stream: &self.stream,
            function: self.function(name),
            params: Vec::with_capacity(24),
            borrows: PhantomData,
        }
    }

    /// Queues `args` on the stream; the error names the kernel.
    /// A launch of no blocks (an empty tensor) does nothing.
    pub(super) fn launch(&self, name: &str, args: KernelArgs<'_>, config: LaunchConfig) -> Result<()> {
        let (x, y, z) = config.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return Ok(());
        }
        count_launch();
        // SAFETY: a zeroed launch attribute value is valid; one field is set.
        let mut attribute = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: unsafe { std::mem::zeroed::<CUlaunchAttributeValue>() },
        };
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let (block_x, block_y, block_z) = config.block_dim;
        let launch = CUlaunchConfig {
            gridDimX: x,
            gridDimY: y,
            gridDimZ: z,
            blockDimX: block_x,
            blockDimY: block_y,
            blockDimZ: block_z,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: u32::from(self.programmatic),
        };
        // Pointers to each value, into `args` (addresses) or the caller's
        // scalars, both alive past the call (the driver copies the values).
        let mut params: Vec<*mut c_void> = (args.params.iter())
            .map(|p| match p {
                Param::Address(address) => address as *const sys::CUdeviceptr as *mut c_void,
                Param::Scalar(value) => *value as *mut c_void,
            })
            .collect();
        self.stream.context().bind_to_thread().map_err(driver_error(name))?;
        // SAFETY: each caller passes the arguments its kernel declares, with
        // buffers of the sizes the launch shape reads and writes.
        unsafe { sys::cuLaunchKernelEx(&launch, args.function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(driver_error(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn hopper_launches_programmatically_unless_told_not_to() {
        assert!(programmatic_launches((9, 0), None));
        assert!(programmatic_launches((10, 0), Some(OsStr::new("0"))));
        assert!(programmatic_launches((9, 0), Some(OsStr::new(""))));
        assert!(!programmatic_launches((9, 0), Some(OsStr::new("1"))));
        assert!(!programmatic_launches((8, 9), None), "griddepcontrol needs compute capability 9.0");
    }
}
