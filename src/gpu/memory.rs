//! Device memory: owned allocations and arenas.
//!
//! The weights arena is filled once at load. The scratch arena serves one forward pass: a range
//! comes back to it when the last tensor holding it drops, and later requests reuse it (best fit,
//! neighbours merged), so a forward needs about its live working set, not the sum of all its
//! intermediates. Everything runs on one stream, so a range freed while kernels that read it are
//! still queued is only rewritten by kernels queued after them. The same request sequence gets the
//! same addresses (what CUDA graph capture needs). A reset frees everything at once and bumps the
//! arena's epoch; a tensor allocated before it refuses to hand out its address.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, result, sys};

use crate::error::{Error, Result};

/// One cuMemAlloc'd block, freed on drop. It holds the context it was allocated in, so the
/// context outlives every allocation whatever order their owners drop in.
pub struct DeviceAlloc {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    context: Arc<CudaContext>,
}

impl DeviceAlloc {
    pub fn new(bytes: usize, what: &str) -> Result<Arc<DeviceAlloc>> {
        let context = super::device::current_context()?;
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            Error::Cuda(format!("cuMemAlloc of {bytes} bytes ({:.2} GiB) for {what}: {e:?}", bytes as f64 / GIB))
        })?;
        Ok(Arc::new(DeviceAlloc { ptr, bytes, context }))
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // The context may not be current on this thread any more (a Gpu made later elsewhere).
        let _ = self.context.bind_to_thread();
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A byte range of device memory that keeps its allocation alive.
#[derive(Clone)]
pub struct DeviceMem {
    alloc: Arc<DeviceAlloc>,
    offset: usize,
    bytes: usize,
    /// The arena range this memory came from (None for owned memory); shared by clones.
    lease: Option<Arc<Lease>>,
}

/// An arena range in use; returned to the arena's free ranges when dropped (unless the arena was
/// reset since).
struct Lease {
    state: Arc<Mutex<ArenaState>>,
    epoch_counter: Arc<AtomicU64>,
    epoch: u64,
    arena: &'static str,
    offset: usize,
    size: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.epoch_counter.load(Ordering::Acquire) != self.epoch {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            st.free(self.offset, self.size);
        }
    }
}

impl DeviceMem {
    pub fn owned(bytes: usize, what: &str) -> Result<DeviceMem> {
        Ok(DeviceMem { alloc: DeviceAlloc::new(bytes, what)?, offset: 0, bytes, lease: None })
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `bytes` bytes of this memory from `offset` on: a view that writes through to the same
    /// device bytes and keeps the whole range (and its arena lease) alive, like a clone.
    pub fn range(&self, offset: usize, bytes: usize) -> Result<DeviceMem> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(Error::Internal(format!(
                "device range {offset}..+{bytes} outside a {}-byte allocation",
                self.bytes
            )));
        }
        Ok(DeviceMem { alloc: self.alloc.clone(), offset: self.offset + offset, bytes, lease: self.lease.clone() })
    }

    pub fn ptr(&self) -> Result<u64> {
        if let Some(lease) = &self.lease
            && lease.epoch_counter.load(Ordering::Acquire) != lease.epoch
        {
            return Err(Error::Cuda(format!(
                "a tensor from the '{}' arena was used after the arena was reset",
                lease.arena
            )));
        }
        debug_assert!(self.offset + self.bytes <= self.alloc.bytes);
        Ok(self.alloc.ptr + self.offset as u64)
    }
}

/// Ranges of one device allocation: a bump pointer plus the free ranges below it.
pub struct Arena {
    name: &'static str,
    alloc: Arc<DeviceAlloc>,
    state: Arc<Mutex<ArenaState>>,
    epoch: Arc<AtomicU64>,
}

#[derive(Default)]
struct ArenaState {
    /// End of the highest range ever handed out since the last reset.
    top: usize,
    /// Bytes in use (handed out and not yet returned).
    used: usize,
    peak: usize,
    /// The most bytes in use since the last `take_window_peak`.
    window_peak: usize,
    /// Free ranges below `top`, by offset, never adjacent (merged on free).
    free: BTreeMap<usize, usize>,
}

impl ArenaState {
    /// Best fit among the free ranges (the smallest that holds `size`), else the top.
    fn take(&mut self, size: usize, capacity: usize) -> Option<usize> {
        let best = self.free.iter().filter(|&(_, &len)| len >= size).min_by_key(|&(&off, &len)| (len, off));
        let offset = match best.map(|(&off, &len)| (off, len)) {
            Some((off, len)) => {
                self.free.remove(&off);
                if len > size {
                    self.free.insert(off + size, len - size);
                }
                off
            }
            None if self.top + size <= capacity => {
                self.top += size;
                self.top - size
            }
            None => return None,
        };
        self.used += size;
        self.peak = self.peak.max(self.used);
        self.window_peak = self.window_peak.max(self.used);
        Some(offset)
    }

    fn take_window_peak(&mut self) -> usize {
        std::mem::replace(&mut self.window_peak, self.used)
    }

    fn free(&mut self, offset: usize, size: usize) {
        self.used -= size;
        let (mut start, mut end) = (offset, offset + size);
        if let Some((&prev, &len)) = self.free.range(..start).next_back()
            && prev + len == start
        {
            self.free.remove(&prev);
            start = prev;
        }
        if let Some(&len) = self.free.get(&end) {
            self.free.remove(&end);
            end += len;
        }
        if end == self.top {
            self.top = start;
        } else {
            self.free.insert(start, end - start);
        }
    }
}

/// Every allocation starts on this boundary (covers 16-byte vectors and cuBLASLt's alignment wishes).
pub const ARENA_ALIGN: usize = 256;

impl Arena {
    pub fn new(name: &'static str, capacity: usize) -> Result<Arena> {
        Ok(Arena {
            name,
            alloc: DeviceAlloc::new(capacity, name)?,
            state: Arc::new(Mutex::new(ArenaState::default())),
            epoch: Arc::new(AtomicU64::new(0)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ArenaState> {
        // A panic while holding the lock cannot leave the state half-updated in a harmful way.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceMem> {
        if bytes > self.alloc.bytes {
            return Err(Error::Input(format!(
                "{bytes} bytes ({:.2} GiB) asked of the '{}' arena, which holds {:.2} GiB in all",
                bytes as f64 / GIB,
                self.name,
                self.alloc.bytes as f64 / GIB
            )));
        }
        let size = bytes.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let mut st = self.state();
        let Some(offset) = st.take(size, self.alloc.bytes) else {
            return Err(Error::Cuda(format!(
                "the '{}' arena is full: {} bytes asked, {} of {} in use ({} free below the top in {} ranges)",
                self.name,
                bytes,
                st.used,
                self.alloc.bytes,
                st.top - st.used,
                st.free.len()
            )));
        };
        let lease = Lease {
            state: self.state.clone(),
            epoch_counter: self.epoch.clone(),
            epoch: self.epoch.load(Ordering::Acquire),
            arena: self.name,
            offset,
            size,
        };
        Ok(DeviceMem { alloc: self.alloc.clone(), offset, bytes, lease: Some(Arc::new(lease)) })
    }

    /// Frees everything at once; tensors from before the reset become unusable.
    pub fn reset(&self) {
        let mut st = self.state();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let (peak, window_peak) = (st.peak, st.window_peak);
        *st = ArenaState { peak, window_peak, ..Default::default() };
    }

    /// Bytes held by live tensors.
    pub fn used(&self) -> usize {
        self.state().used
    }
    /// The most bytes held at once since the arena was made.
    pub fn peak(&self) -> usize {
        self.state().peak
    }
    /// The most bytes held at once since the last call (or since the arena was made); the next
    /// window starts at what is held now.
    pub fn take_window_peak(&self) -> usize {
        self.state().take_window_peak()
    }
    pub fn capacity(&self) -> usize {
        self.alloc.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::ArenaState;

    #[test]
    fn freed_ranges_are_reused_best_fit_and_merged() {
        let mut st = ArenaState::default();
        let cap = 1000;
        let a = st.take(100, cap).unwrap();
        let b = st.take(200, cap).unwrap();
        let c = st.take(100, cap).unwrap();
        assert_eq!((a, b, c), (0, 100, 300));
        st.free(b, 200);
        // Best fit: a 150 request goes into the 200 hole and leaves 50 of it free.
        assert_eq!(st.take(150, cap), Some(100));
        assert_eq!(st.free.get(&250), Some(&50));
        // Freeing the neighbours merges them into one range; the top range shrinks the top.
        st.free(a, 100);
        st.free(100, 150);
        assert_eq!(st.free.get(&0), Some(&300));
        st.free(c, 100);
        assert!(st.free.is_empty());
        assert_eq!((st.top, st.used, st.peak), (0, 0, 400));
        // Too big for what is left is refused, not clamped.
        assert_eq!(st.take(1001, cap), None);
    }

    #[test]
    fn window_peaks_start_at_what_is_held() {
        let mut st = ArenaState::default();
        let a = st.take(300, 1000).unwrap();
        let b = st.take(200, 1000).unwrap();
        st.free(b, 200);
        assert_eq!(st.take_window_peak(), 500);
        // The next window: 300 still held, 100 more at most.
        let c = st.take(100, 1000).unwrap();
        st.free(c, 100);
        st.free(a, 300);
        assert_eq!(st.take_window_peak(), 400);
        assert_eq!(st.take_window_peak(), 0);
        assert_eq!(st.peak, 500);
    }
}
