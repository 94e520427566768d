//! Device memory: owned allocations and bump arenas.
//!
//! The weights arena is filled once at load. The scratch arena serves one forward pass and is
//! reset afterwards, so a whole step reuses the same addresses (what CUDA graph capture needs).
//! A reset bumps the arena's epoch; a tensor allocated before it refuses to hand out its address.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};

/// One cuMemAlloc'd block, freed on drop.
pub struct DeviceAlloc {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceAlloc {
    pub fn new(bytes: usize, what: &str) -> Result<Arc<DeviceAlloc>> {
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| Error::Cuda(format!("cuMemAlloc of {bytes} bytes for {what}: {e:?}")))?;
        Ok(Arc::new(DeviceAlloc { ptr, bytes }))
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // Freeing can only fail if the context is already gone; nothing useful to do then.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A byte range of device memory that keeps its allocation alive.
#[derive(Clone)]
pub struct DeviceMem {
    alloc: Arc<DeviceAlloc>,
    offset: usize,
    bytes: usize,
    /// (arena epoch counter, epoch at allocation) for arena-backed memory.
    epoch: Option<(Arc<AtomicU64>, u64, &'static str)>,
}

impl DeviceMem {
    pub fn owned(bytes: usize, what: &str) -> Result<DeviceMem> {
        Ok(DeviceMem { alloc: DeviceAlloc::new(bytes, what)?, offset: 0, bytes, epoch: None })
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn ptr(&self) -> Result<u64> {
        if let Some((counter, epoch, arena)) = &self.epoch
            && counter.load(Ordering::Acquire) != *epoch
        {
            return Err(Error::Cuda(format!("a tensor from the '{arena}' arena was used after the arena was reset")));
        }
        debug_assert!(self.offset + self.bytes <= self.alloc.bytes);
        Ok(self.alloc.ptr + self.offset as u64)
    }
}

/// A bump allocator over one device allocation.
pub struct Arena {
    name: &'static str,
    alloc: Arc<DeviceAlloc>,
    used: AtomicUsize,
    peak: AtomicUsize,
    epoch: Arc<AtomicU64>,
}

/// Every allocation starts on this boundary (covers 16-byte vectors and cuBLASLt's alignment wishes).
pub const ARENA_ALIGN: usize = 256;

impl Arena {
    pub fn new(name: &'static str, capacity: usize) -> Result<Arena> {
        Ok(Arena {
            name,
            alloc: DeviceAlloc::new(capacity, name)?,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            epoch: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceMem> {
        let size = bytes.div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let offset = self.used.fetch_add(size, Ordering::AcqRel);
        if offset + size > self.alloc.bytes {
            self.used.fetch_sub(size, Ordering::AcqRel);
            return Err(Error::Cuda(format!(
                "the '{}' arena is full: {} bytes asked, {} of {} in use",
                self.name, bytes, offset, self.alloc.bytes
            )));
        }
        self.peak.fetch_max(offset + size, Ordering::AcqRel);
        Ok(DeviceMem {
            alloc: self.alloc.clone(),
            offset,
            bytes,
            epoch: Some((self.epoch.clone(), self.epoch.load(Ordering::Acquire), self.name)),
        })
    }

    /// Frees everything at once; tensors from before the reset become unusable.
    pub fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.used.store(0, Ordering::Release);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }
    pub fn capacity(&self) -> usize {
        self.alloc.bytes
    }
}
