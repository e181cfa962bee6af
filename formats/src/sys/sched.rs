//! Thread scheduling priority (`setpriority(2)` on the calling thread).

/// Gives the calling thread the lowest scheduling priority (nice 19), for
/// background work that must not slow the threads that matter. Best effort.
pub fn lower_priority() {
    // SAFETY: setpriority takes only integers; on Linux, PRIO_PROCESS with
    // who = 0 applies to the calling thread alone.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}
