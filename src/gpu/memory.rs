//! Device memory: owned allocations and arenas.
//!
//! The weights arena is filled once at load. The scratch arena serves one forward pass: a range
//! comes back to it when the last tensor holding it drops, and later requests reuse it (best fit,
//! neighbours merged), so a forward needs about its live working set, not the sum of all its
//! intermediates. Everything runs on one stream, so a range freed while kernels that read it are
//! still queued is only rewritten by kernels queued after them. The same request sequence gets the
//! same addresses (what CUDA graph capture needs). A reset frees everything at once and bumps the
//! arena's epoch; a tensor allocated before it refuses to hand out its address.
//!
//! A CUDA graph (gpu/graph.rs) replays the captured kernels on the addresses they had at capture,
//! so the ranges its work used must stay out of everyone else's hands while it lives: the arena
//! records the ranges handed out during a capture, the graph keeps the leases still alive at its
//! end (its outputs), and the rest of the recorded ranges, free by then, are carved out of the
//! free ranges into a `Reserved` set that goes back when the graph's pool drops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

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
    /// Set once the memory was given back (`given_back`): why its address may not be read.
    given_back: Option<Arc<str>>,
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
        Ok(DeviceMem { alloc: DeviceAlloc::new(bytes, what)?, offset: 0, bytes, lease: None, given_back: None })
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
        Ok(DeviceMem {
            alloc: self.alloc.clone(),
            offset: self.offset + offset,
            bytes,
            lease: self.lease.clone(),
            given_back: self.given_back.clone(),
        })
    }

    /// This memory as a stand-in that no longer holds its arena range: once every other view of
    /// the range is gone too, the arena hands the range out again. The stand-in keeps the size
    /// (a tensor's shape stays readable), but reading its address is an error saying `why`.
    pub fn given_back(&self, why: &str) -> DeviceMem {
        DeviceMem { lease: None, given_back: Some(why.into()), ..self.clone() }
    }

    pub fn ptr(&self) -> Result<u64> {
        if let Some(why) = &self.given_back {
            return Err(Error::Internal(why.to_string()));
        }
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
    /// While a CUDA graph is captured: what the capture was handed.
    recording: Option<Recording>,
}

/// The ranges (offset, size) handed out since recording began, and those the pool's earlier
/// captures reserved (returned to the free ranges for this capture to reuse); the leases made.
#[derive(Default)]
struct Recording {
    ranges: Vec<(usize, usize)>,
    leases: Vec<Weak<Lease>>,
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
        if let Some(r) = self.recording.as_mut() {
            r.ranges.push((offset, size));
        }
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

    /// Starts recording with `earlier` (reserved ranges) returned to the free ranges and recorded,
    /// so the end of the recording reserves their free parts again. False when a recording is
    /// under way already (it takes `earlier` over).
    fn start_recording(&mut self, earlier: Vec<(usize, usize)>) -> bool {
        for &(offset, size) in &earlier {
            self.free(offset, size);
        }
        match self.recording.as_mut() {
            Some(r) => {
                r.ranges.extend(earlier);
                false
            }
            None => {
                self.recording = Some(Recording { ranges: earlier, leases: Vec::new() });
                true
            }
        }
    }

    /// Ends the recording: the leases it made, and the free parts of its ranges, reserved.
    fn finish_recording(&mut self) -> (Vec<Weak<Lease>>, Vec<(usize, usize)>) {
        let recording = self.recording.take().unwrap_or_default();
        (recording.leases, self.reserve_free_parts(&recording.ranges))
    }

    /// Takes the free parts of `ranges` (free ranges below the top, anything above it) out of
    /// circulation and returns them, merged and by offset. The parts in use stay with their leases.
    fn reserve_free_parts(&mut self, ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let mut taken = Vec::new();
        for (start, end) in merged(ranges) {
            // Free ranges below the top that overlap [start, end): keep what lies outside it.
            let first = self.free.range(..start).next_back().map_or(start, |(&off, _)| off);
            let overlapping: Vec<(usize, usize)> =
                self.free.range(first..end).map(|(&o, &l)| (o, l)).filter(|&(o, l)| o + l > start).collect();
            for (off, len) in overlapping {
                self.free.remove(&off);
                let (lo, hi) = (off.max(start), (off + len).min(end));
                if off < lo {
                    self.free.insert(off, lo - off);
                }
                if hi < off + len {
                    self.free.insert(hi, off + len - hi);
                }
                taken.push((lo, hi - lo));
            }
            // Above the top: the top rises to `end`; a gap below `start` becomes a free range.
            if end > self.top {
                let from = start.max(self.top);
                if from > self.top {
                    self.free.insert(self.top, from - self.top);
                }
                taken.push((from, end - from));
                self.top = end;
            }
        }
        let taken = merged(&taken).into_iter().map(|(s, e)| (s, e - s)).collect::<Vec<_>>();
        self.used += taken.iter().map(|&(_, len)| len).sum::<usize>();
        self.peak = self.peak.max(self.used);
        self.window_peak = self.window_peak.max(self.used);
        taken
    }
}

/// (offset, size) ranges as sorted, disjoint [start, end) spans, overlapping and touching ones merged.
fn merged(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = ranges.iter().filter(|r| r.1 > 0).map(|&(o, l)| (o, o + l)).collect();
    spans.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Arena ranges kept out of circulation for the CUDA graphs of one pool (gpu/graph.rs): what their
/// captures used that no live tensor holds. Returned to the arena on drop, unless it was reset.
pub struct Reserved {
    state: Arc<Mutex<ArenaState>>,
    epoch_counter: Arc<AtomicU64>,
    epoch: u64,
    ranges: Vec<(usize, usize)>,
}

impl Reserved {
    /// False once the arena was reset: the ranges are no longer held.
    pub fn holds(&self) -> bool {
        self.epoch_counter.load(Ordering::Acquire) == self.epoch
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.ranges.is_empty() || !self.holds() {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            for &(offset, size) in &self.ranges {
                st.free(offset, size);
            }
        }
    }
}

/// The leases a capture made that were still alive at its end: the graph holds them, so their
/// ranges (which each replay rewrites) stay out of circulation while it lives.
pub struct CapturedLeases(Vec<Arc<Lease>>);

impl CapturedLeases {
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|l| l.size).sum()
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
        let lease = Arc::new(Lease {
            state: self.state.clone(),
            epoch_counter: self.epoch.clone(),
            epoch: self.epoch.load(Ordering::Acquire),
            arena: self.name,
            offset,
            size,
        });
        if let Some(r) = st.recording.as_mut() {
            r.leases.push(Arc::downgrade(&lease));
        }
        Ok(DeviceMem { alloc: self.alloc.clone(), offset, bytes, lease: Some(lease), given_back: None })
    }

    /// Starts recording what is handed out, for a CUDA graph capture. `earlier`, the ranges the
    /// pool's earlier captures reserved, go back to the free ranges: this capture may reuse them,
    /// since a pool's graphs replay one at a time on one stream.
    pub(crate) fn begin_recording(&self, earlier: Option<Reserved>) -> Result<()> {
        // Emptied before the lock is taken: dropping a Reserved with ranges locks the state.
        let earlier = match earlier {
            Some(r) if !Arc::ptr_eq(&r.state, &self.state) => {
                return Err(Error::Internal(format!("ranges of another arena handed to the '{}' arena", self.name)));
            }
            Some(mut r) if r.holds() => std::mem::take(&mut r.ranges),
            _ => Vec::new(),
        };
        if !self.state().start_recording(earlier) {
            return Err(Error::Internal(format!("a second CUDA graph capture recorded on the '{}' arena", self.name)));
        }
        Ok(())
    }

    /// Ends the recording: the leases made since that are still alive, and the rest of the ranges
    /// recorded (free now) taken out of circulation.
    pub(crate) fn end_recording(&self) -> (CapturedLeases, Reserved) {
        let (leases, ranges) = self.state().finish_recording();
        let leases = leases.iter().filter_map(Weak::upgrade).collect();
        let reserved = Reserved {
            state: self.state.clone(),
            epoch_counter: self.epoch.clone(),
            epoch: self.epoch.load(Ordering::Acquire),
            ranges,
        };
        (CapturedLeases(leases), reserved)
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
    use super::{ArenaState, merged};

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

    /// What a capture's replays write must stay out of later requests until the reservation goes.
    #[test]
    fn a_capture_reserves_its_free_ranges_and_gives_them_back() {
        let (mut st, cap) = (ArenaState::default(), 10_000);
        let input = st.take(100, cap).unwrap(); // a static input, made before the capture
        assert!(st.start_recording(Vec::new()));
        let a = st.take(200, cap).unwrap();
        let b = st.take(300, cap).unwrap();
        st.free(a, 200); // an intermediate that died mid-capture ...
        let c = st.take(150, cap).unwrap(); // ... and its range reused within the capture
        let out = st.take(50, cap).unwrap(); // the output, still held at the end
        st.free(b, 300);
        st.free(c, 150);
        assert_eq!((input, a, b, c, out), (0, 100, 300, 100, 250));
        let (_, reserved) = st.finish_recording();
        // Everything recorded but the live output: [100, 250) and [300, 600), the top kept at 600.
        assert_eq!(reserved, vec![(100, 150), (300, 300)]);
        assert!(st.recording.is_none());
        assert_eq!((st.used, st.top), (100 + 50 + 450, 600));
        // Later requests go around the reserved ranges and the output.
        let later = st.take(1000, cap).unwrap();
        assert_eq!(later, 600);
        st.free(later, 1000);
        // The output dropped and the reservation returned: one free arena again.
        st.free(out, 50);
        for (offset, size) in reserved {
            st.free(offset, size);
        }
        st.free(input, 100);
        assert_eq!((st.used, st.top, st.free.len()), (0, 0, 0));
    }

    #[test]
    fn a_pools_next_capture_reuses_and_extends_the_reservation() {
        let (mut st, cap) = (ArenaState::default(), 10_000);
        assert!(st.start_recording(Vec::new()));
        let a = st.take(400, cap).unwrap();
        st.free(a, 400); // the top falls back to 0: the reservation must raise it again
        assert_eq!(st.top, 0);
        let (_, first) = st.finish_recording();
        assert_eq!((first.clone(), st.top), (vec![(0, 400)], 400));
        // Eager work between the captures stays clear of the reservation.
        let eager = st.take(100, cap).unwrap();
        assert_eq!(eager, 400);
        // The second capture of the pool may use the first's ranges, and needs more.
        assert!(st.start_recording(first));
        let b = st.take(300, cap).unwrap();
        let c = st.take(200, cap).unwrap();
        assert_eq!((b, c), (0, 500));
        st.free(b, 300);
        st.free(c, 200);
        // A recording under way refuses a second one (and keeps the ranges handed over).
        assert!(!st.start_recording(vec![]));
        let (_, second) = st.finish_recording();
        assert_eq!(second, vec![(0, 400), (500, 200)]);
        assert_eq!((st.top, st.used), (700, 700));
        for (offset, size) in second {
            st.free(offset, size);
        }
        st.free(eager, 100);
        assert_eq!((st.used, st.top, st.free.len()), (0, 0, 0));
    }

    #[test]
    fn reserving_above_the_top_leaves_the_gap_free() {
        let mut st = ArenaState::default();
        let a = st.take(100, 1000).unwrap();
        let b = st.take(100, 1000).unwrap();
        let c = st.take(100, 1000).unwrap();
        st.free(c, 100);
        st.free(b, 100);
        // Only [200, 300) recorded (a range freed since): [100, 200) stays free below the new top.
        assert_eq!(st.reserve_free_parts(&[(200, 100)]), vec![(200, 100)]);
        assert_eq!((st.top, st.free.get(&100)), (300, Some(&100)));
        assert_eq!(st.take(100, 1000), Some(100));
        // A range that is in use is not reserved.
        assert_eq!(st.reserve_free_parts(&[(a, 100)]), vec![]);
        assert_eq!(merged(&[(5, 5), (0, 5), (20, 1), (0, 0)]), vec![(0, 10), (20, 21)]);
    }
}
