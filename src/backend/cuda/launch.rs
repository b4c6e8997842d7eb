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

/// More device pointers than any kernel takes.
const MAX_POINTERS: usize = 16;

/// Whether kernels on a GPU of this compute capability are launched
/// programmatically: Hopper and later, unless `SHARDLINE_NO_PDL` is set.
pub(super) fn programmatic_launches((major, _minor): (i32, i32)) -> bool {
    major >= 9 && std::env::var_os("SHARDLINE_NO_PDL").is_none_or(|v| v.is_empty() || v == "0")
}

/// One launch's arguments, in the order the kernel declares them.
pub(super) struct KernelArgs<'a> {
    stream: &'a CudaStream,
    function: &'a CudaFunction,
    /// The device addresses passed, boxed so the pointers to them in
    /// `params` stay valid as the builder moves.
    pointers: Box<[u64; MAX_POINTERS]>,
    used: usize,
    params: Vec<*mut c_void>,
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
                args.params.push(self as *const $t as *mut c_void);
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

    fn push_pointer(&mut self, address: sys::CUdeviceptr) {
        assert!(self.used < MAX_POINTERS, "a kernel with more than {MAX_POINTERS} buffer arguments");
        self.pointers[self.used] = address;
        self.params.push(&mut self.pointers[self.used] as *mut u64 as *mut c_void);
        self.used += 1;
    }
}

impl CudaBackend {
    /// The arguments of a launch of kernel `name`.
    pub(super) fn kernel_args(&self, name: &'static str) -> KernelArgs<'_> {
        KernelArgs {
            stream: &self.stream,
            function: self.function(name),
            pointers: Box::new([0; MAX_POINTERS]),
            used: 0,
            params: Vec::with_capacity(24),
            borrows: PhantomData,
        }
    }

    /// Queues `args` on the stream; the error names the kernel.
    /// A launch of no blocks (an empty tensor) does nothing.
    pub(super) fn launch(&self, name: &str, mut args: KernelArgs<'_>, config: LaunchConfig) -> Result<()> {
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
        self.stream.context().bind_to_thread().map_err(driver_error(name))?;
        // SAFETY: each caller passes the arguments its kernel declares, with
        // buffers of the sizes the launch shape reads and writes; `params`
        // points into `args`, which lives past the call (the driver copies
        // the values at launch).
        unsafe { sys::cuLaunchKernelEx(&launch, args.function.cu_function(), args.params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(driver_error(name))
    }
}
