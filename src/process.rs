//! Child processes that must not outlive this one.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Has the kernel send `signal` to the child when the thread that spawns it dies (prctl
/// PR_SET_PDEATHSIG: the "parent" is that thread, so spawn from a thread that outlives the
/// child's work), so a SIGKILLed render leaves no child working on unwatched. A parent that died
/// between the fork and the prctl is caught by comparing the parent pid: the spawn then fails.
pub(crate) fn dies_with_its_parent(command: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH)); // the parent is gone
            }
            Ok(())
        });
    }
}
