//! The activations of a forward being recorded into a graph, as ranges of
//! one device buffer the backend keeps. A stream-ordered allocation or
//! free made while recording becomes a graph node between two kernels, and
//! a programmatic edge (`launch.rs`) joins a kernel only to the kernel
//! node right before it; with the activations in the arena, a decode
//! graph is its kernels alone. Every graph shares the buffer (replays run
//! one at a time on the stream, and a graph's kernels in order), and a
//! range one op frees is reused by a later op of the same forward.
//!
//! The arena learns its size: a recording that does not fit takes the rest
//! from the stream as before and counts what it needed, and the next
//! recording starts on a buffer that large. A buffer given up stays alive
//! while a graph that uses it does: with decode graphs recorded smallest
//! bucket first, the buffers sum to under twice the largest step's peak
//! (stream-ordered graph memory could share pages between graphs instead).

use super::{alloc_error, CudaBackend};
use crate::backend::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Ranges start 256-byte aligned, as the driver's allocations do.
const ALIGN: usize = 256;

/// A buffer of activations: the stream's own, or a range of the arena.
pub struct Scratch<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    lease: Option<Lease>,
}

/// What a buffer made while recording holds of the arena: `bytes`
/// counted against its high-water mark, and the range at `offset` of
/// `buffer` unless the arena was full.
struct Lease {
    arena: Arc<Mutex<State>>,
    buffer: Option<Arc<CudaSlice<u8>>>,
    offset: usize,
    bytes: usize,
}

#[derive(Default)]
struct State {
    buffer: Option<Arc<CudaSlice<u8>>>,
    /// Free ranges of `buffer`, offset → length, coalesced.
    free: BTreeMap<usize, usize>,
    /// Bytes a recording holds now, in the arena or not, and at most.
    live: usize,
    peak: usize,
    /// Whether a buffer of this recording came from the stream.
    overflowed: bool,
    /// The buffer size the next recording starts on.
    wanted: usize,
}

/// The backend's arena; clones share it.
#[derive(Clone, Default)]
pub(super) struct Arena(Arc<Mutex<State>>);

impl<T> Scratch<T> {
    pub(super) fn owned(slice: CudaSlice<T>) -> Self {
        Scratch {
            slice: ManuallyDrop::new(slice),
            lease: None,
        }
    }
}

impl<T> Deref for Scratch<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for Scratch<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.lease.as_ref().is_some_and(|lease| lease.buffer.is_some()) {
            // The arena's memory is its buffer's to free; the lease gives
            // the range back as it drops, after this.
            true => drop(slice.leak()),
            false => drop(slice),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        state.live -= self.bytes;
        let current = state
            .buffer
            .as_ref()
            .zip(self.buffer.as_ref())
            .is_some_and(|(a, b)| Arc::ptr_eq(a, b));
        if current {
            state.release(self.offset, self.bytes);
        }
    }
}

impl State {
    /// The first free range of `bytes`, taken.
    fn take(&mut self, bytes: usize) -> Option<usize> {
        let (&offset, &len) = self.free.iter().find(|(_, &len)| len >= bytes)?;
        self.free.remove(&offset);
        if len > bytes {
            self.free.insert(offset + bytes, len - bytes);
        }
        Some(offset)
    }

    fn release(&mut self, offset: usize, bytes: usize) {
        let (mut start, mut len) = (offset, bytes);
        if let Some((&before, &before_len)) = self.free.range(..offset).next_back() {
            if before + before_len == offset {
                self.free.remove(&before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.free.remove(&(offset + bytes)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

/// How a recording went for the arena.
pub(super) enum Fit {
    /// Every buffer was a range of this arena buffer (the graph keeps it).
    Whole(Arc<CudaSlice<u8>>),
    /// Some came from the stream; the next recording's arena is larger.
    Overflowed,
}

impl Arena {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the buffer as large as recordings have shown they need,
    /// poisoned when `poison` (as the backend's outputs are).
    pub(super) fn begin(&self, stream: &Arc<CudaStream>, poison: bool) -> Result<()> {
        let mut state = self.state();
        let capacity = state.buffer.as_ref().map_or(0, |b| b.len());
        if state.wanted > capacity {
            let bytes = state.wanted;
            let mut buffer = stream
                .alloc_zeros::<u8>(bytes)
                .map_err(alloc_error("recorded activations", bytes))?;
            if poison {
                super::poison(stream, &mut buffer)?;
            }
            state.buffer = Some(Arc::new(buffer));
            state.free = BTreeMap::from([(0, bytes)]);
        }
        state.peak = state.live;
        state.overflowed = false;
        Ok(())
    }

    pub(super) fn end(&self) -> Fit {
        let mut state = self.state();
        if state.overflowed {
            // A quarter more, for ranges the first-fit leaves apart, and at
            // least twice the last: the buffers graphs still hold then sum
            // to under twice the newest.
            let capacity = state.buffer.as_ref().map_or(0, |b| b.len());
            state.wanted = (state.peak + state.peak / 4).next_multiple_of(1 << 20).max(2 * capacity);
        }
        match (&state.buffer, state.overflowed) {
            (Some(buffer), false) => Fit::Whole(buffer.clone()),
            _ => Fit::Overflowed,
        }
    }

    /// A buffer of `len` values (at least one) for a forward being
    /// recorded: a range of the arena, or `from_stream`'s where it has no
    /// room (its bytes count toward the arena's next size either way).
    pub(super) fn scratch<T>(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
        from_stream: impl FnOnce() -> Result<CudaSlice<T>>,
    ) -> Result<Scratch<T>> {
        let len = len.max(1);
        let bytes = (len * std::mem::size_of::<T>()).next_multiple_of(ALIGN);
        let mut lease = Lease {
            arena: self.0.clone(),
            buffer: None,
            offset: 0,
            bytes,
        };
        {
            let mut state = self.state();
            state.live += bytes;
            state.peak = state.peak.max(state.live);
            if let Some(buffer) = state.buffer.clone() {
                if let Some(offset) = state.take(bytes) {
                    (lease.offset, lease.buffer) = (offset, Some(buffer));
                }
            }
            state.overflowed |= lease.buffer.is_none();
        }
        let slice = match &lease.buffer {
            Some(buffer) => {
                let (base, _) = buffer.device_ptr(stream);
                // SAFETY: [offset, offset + bytes) of the buffer is this
                // lease's alone until it drops; the buffer outlives it (the
                // lease holds it), and the slice is leaked, never freed.
                unsafe { stream.upgrade_device_ptr::<T>(base + lease.offset as u64, len) }
            }
            None => from_stream()?,
        };
        Ok(Scratch {
            slice: ManuallyDrop::new(slice),
            lease: Some(lease),
        })
    }
}

impl CudaBackend {
    /// The arena in use while this thread records a graph.
    pub(super) fn recording_arena(&self) -> Option<&Arena> {
        super::CAPTURING.get().then_some(&self.arena)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_coalesce_and_the_first_fit_is_taken() {
        let mut state = State {
            free: BTreeMap::from([(0, 4096)]),
            ..Default::default()
        };
        let a = state.take(1024).unwrap();
        let b = state.take(1024).unwrap();
        let c = state.take(1024).unwrap();
        assert_eq!((a, b, c), (0, 1024, 2048));
        assert_eq!(state.take(2048), None, "only 1 KB is left at the end");
        state.release(b, 1024);
        assert_eq!(state.take(512), Some(1024), "the first hole fits");
        state.release(1024, 512);
        state.release(a, 1024);
        state.release(c, 1024);
        assert_eq!(state.free, BTreeMap::from([(0, 4096)]), "every range back makes one again");
    }
}
