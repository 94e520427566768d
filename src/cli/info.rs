//! `celframe info`: the device, and each compiled kernel's resources as ptxas reported them.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, KERNEL_MODULES};

pub fn run() -> Result<()> {
    let mut text = String::new();
    if Gpu::is_available() {
        let gpu = Gpu::from_env()?;
        let i = gpu.info();
        writeln!(
            text,
            "device {}: {} (sm_{}{}), {} SMs, {} MiB L2, {} GiB",
            i.ordinal,
            i.name,
            i.compute_capability.0,
            i.compute_capability.1,
            i.multiprocessors,
            i.l2_bytes >> 20,
            i.total_memory >> 30
        )
        .unwrap();
    } else {
        text.push_str("no CUDA device on this machine (kernels are compiled in and listed below)\n");
    }
    writeln!(text, "{:<28} {:>6} {:>8} {:>7} {:>8}", "kernel (sm_90a)", "regs", "smem B", "stack", "spills").unwrap();
    for m in KERNEL_MODULES {
        for r in m.sm90_resources {
            let (name, regs, smem, stack, spills) =
                (r.name, r.registers, r.static_smem_bytes, r.stack_bytes, r.spill_bytes);
            writeln!(text, "{name:<28} {regs:>6} {smem:>8} {stack:>7} {spills:>8}").unwrap();
        }
    }
    // A closed pipe (`celframe info | head`) is not an error worth reporting.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Io { context: "writing to stdout".into(), source: e })
        }
        _ => Ok(()),
    }
}
