//! NVTX ranges around named regions, visible in Nsight Systems. Without the NVTX library (no
//! profiler attached, or no CUDA at all) a range costs nothing and does nothing.

use std::sync::OnceLock;

use cudarc::nvtx;

fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| unsafe { nvtx::sys::is_culib_present() })
}

/// Pushes a range on creation and pops it on drop.
pub struct Range {
    active: bool,
}

pub fn range(name: &str) -> Range {
    let active = available();
    if active {
        nvtx::result::range_push(name);
    }
    Range { active }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.active {
            nvtx::result::range_pop();
        }
    }
}
