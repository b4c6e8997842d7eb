//! Weight matrices in anonymous memory that asks the kernel for huge pages.
//!
//! Batch-1 decode streams every weight once per token. With 4 KiB pages the
//! hardware prefetchers stop at each page boundary and every page costs a TLB
//! walk; on 2 MiB pages the stream runs on (measured in `shardline bench`).
//! Where huge pages are unavailable the hint is ignored and nothing changes.

use memmap2::{Advice, MmapMut};
use std::marker::PhantomData;

pub struct WeightBuffer<T> {
    map: MmapMut,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: bytemuck::Pod> WeightBuffer<T> {
    /// Copies little-endian element bytes into a new page-aligned buffer.
    pub fn from_le_bytes(bytes: &[u8]) -> std::io::Result<Self> {
        let size = std::mem::size_of::<T>();
        assert_eq!(
            bytes.len() % size,
            0,
            "WeightBuffer: {} bytes is not a whole number of elements",
            bytes.len()
        );
        let mut map = MmapMut::map_anon(bytes.len().max(1))?;
        // A hint: ignored where transparent huge pages are off or unsupported.
        let _ = map.advise(Advice::HugePage);
        map[..bytes.len()].copy_from_slice(bytes);
        Ok(WeightBuffer {
            map,
            len: bytes.len() / size,
            _elem: PhantomData,
        })
    }

    pub fn as_slice(&self) -> &[T] {
        // The mapping is page-aligned, so aligned for any T.
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<T>()])
    }
}
