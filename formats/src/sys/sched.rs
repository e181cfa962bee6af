//! Thread scheduling priority (`sched_setscheduler(2)` and `setpriority(2)`
//! on the calling thread).

/// Gives the calling thread the lowest scheduling priority, for background
/// work that must not slow the threads that matter: the `SCHED_IDLE`
/// policy, under which a waking thread of normal policy preempts it at
/// once and which gets a fifth of a nice-19 thread's share of a busy core;
/// nice 19 where that policy is refused. Best effort.
pub fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; on
    // Linux, pid 0 names the calling thread alone.
    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    if !idle {
        // SAFETY: setpriority takes only integers; on Linux, PRIO_PROCESS
        // with who = 0 applies to the calling thread alone.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_calling_thread_alone_gets_the_idle_policy() {
        std::thread::spawn(|| {
            super::lower_priority();
            // SAFETY: sched_getscheduler takes an integer; 0 is this thread.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
