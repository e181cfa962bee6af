//! Exit codes: one table per tool, shared by `main`, `--help` and the man pages.

/// A documented exit code.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: u8,
    pub meaning: &'static str,
}

/// The tools that document exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Kimberlize,
    Dekimberlize,
    Vmigrate,
    Vmctl,
    Kimberlized,
}

pub const SUCCESS: u8 = 0;
pub const ERROR: u8 = 1;
pub const USAGE: u8 = 2;
pub const CORRUPT: u8 = 3;
pub const AUTH: u8 = 4;
pub const WRONG_BASE: u8 = 5;
pub const EXISTS: u8 = 6;
pub const VMDIR: u8 = 7;
pub const MISMATCH: u8 = 8;
pub const VM: u8 = 9;
/// `kimberlize fetch`: the cache already held everything (nothing new).
pub const NOTHING_NEW: u8 = 10;
/// Content from a registry did not match its digest (tampered, or
/// corrupted on the way), or a base VM in the cache no longer matched its
/// identity and digests: it was removed from the cache.
pub const TAMPERED: u8 = 11;
/// `vmctl` could not get an answer, or got a refusal (`timeout(1)`'s
/// convention: any other code of `vmctl exec` is the script's status).
pub const VMCTL_FAILED: u8 = 125;
/// 128 + SIGINT, what shells report for a process Ctrl-C killed.
pub const INTERRUPTED: u8 = 128 + libc::SIGINT as u8;
/// 128 + SIGPIPE, what shells report for a writer killed by a closed pipe.
pub const BROKEN_PIPE: u8 = 128 + libc::SIGPIPE as u8;
/// 128 + SIGTERM.
pub const TERMINATED: u8 = 128 + libc::SIGTERM as u8;

/// The exit code for a stop signal (SIGINT or SIGTERM).
pub fn for_signal(sig: libc::c_int) -> u8 {
    if sig == libc::SIGTERM {
        TERMINATED
    } else {
        INTERRUPTED
    }
}

const C_SUCCESS: Code = Code {
    code: SUCCESS,
    meaning: "success",
};
const C_ERROR: Code = Code {
    code: ERROR,
    meaning: "error (I/O, resources, anything not listed below)",
};
const C_USAGE: Code = Code {
    code: USAGE,
    meaning: "usage error: bad arguments or sizes, a missing key option, a malformed key or passphrase file, binary output to a terminal",
};
const C_CORRUPT: Code = Code {
    code: CORRUPT,
    meaning: "the overlay is truncated, corrupt, of an unknown version, or not an overlay",
};
const C_AUTH: Code = Code {
    code: AUTH,
    meaning: "authentication failed: wrong key or passphrase, or tampered data",
};
const C_WRONG_BASE: Code = Code {
    code: WRONG_BASE,
    meaning: "wrong base VM, or overlays given out of chain order / with a missing link",
};
const C_EXISTS: Code = Code {
    code: EXISTS,
    meaning: "the output already exists",
};
const C_VMDIR: Code = Code {
    code: VMDIR,
    meaning: "a VM directory is missing, unreadable or inconsistent",
};
const C_MISMATCH: Code = Code {
    code: MISMATCH,
    meaning: "the result does not match the digest the overlay promised",
};
const C_VM: Code = Code {
    code: VM,
    meaning: "the VM failed (no usable /dev/kvm, guest crash, timeout, script error)",
};
const C_NOTHING_NEW: Code = Code {
    code: NOTHING_NEW,
    meaning: "fetch: nothing new: the cache already held every reference's manifest and blobs (not a failure)",
};
const C_TAMPERED: Code = Code {
    code: TAMPERED,
    meaning: "a blob or manifest from the registry did not match its digest (tampered, or corrupted on the way), or a base VM in the cache no longer matched its identity and digests; it was removed from the cache",
};

const C_INTERRUPTED: Code = Code {
    code: INTERRUPTED,
    meaning: "interrupted by SIGINT (Ctrl-C): partial outputs were removed",
};
const C_BROKEN_PIPE: Code = Code {
    code: BROKEN_PIPE,
    meaning: "the output was cut: its reader went away (broken pipe)",
};
const C_TERMINATED: Code = Code {
    code: TERMINATED,
    meaning: "terminated by SIGTERM: partial outputs were removed",
};

const KIMBERLIZE: &[Code] = &[
    C_SUCCESS,
    C_ERROR,
    C_USAGE,
    C_CORRUPT,
    C_AUTH,
    C_WRONG_BASE,
    C_EXISTS,
    C_VMDIR,
    C_MISMATCH,
    C_VM,
    C_NOTHING_NEW,
    C_TAMPERED,
    C_INTERRUPTED,
    C_BROKEN_PIPE,
    C_TERMINATED,
];
// The same failures as kimberlize (it applies parent chains, runs VMs,
// reads from registries), without fetch's "nothing new".
const DEKIMBERLIZE: &[Code] = &[
    C_SUCCESS,
    C_ERROR,
    C_USAGE,
    C_CORRUPT,
    C_AUTH,
    C_WRONG_BASE,
    C_EXISTS,
    C_VMDIR,
    C_MISMATCH,
    C_VM,
    C_TAMPERED,
    C_INTERRUPTED,
    C_BROKEN_PIPE,
    C_TERMINATED,
];
// `run` and `recv` suspend a running VM on SIGINT/SIGTERM and exit 0; the
// codes 130/143 are for the other moments (`send`, a `recv` that holds no
// VM yet).
const VMIGRATE: &[Code] = &[
    C_SUCCESS,
    C_ERROR,
    C_USAGE,
    C_AUTH,
    C_EXISTS,
    C_VMDIR,
    C_VM,
    C_INTERRUPTED,
    C_BROKEN_PIPE,
    C_TERMINATED,
];
const VMCTL: &[Code] = &[
    Code {
        code: SUCCESS,
        meaning: "success (exec: the script exited 0)",
    },
    Code {
        code: 1,
        meaning: "exec: the script failed with status N, and vmctl exits N (1 to 255; a status \
                  outside that range exits 255); the JSON answer on stdout has the exact status \
                  and tells a script's 2 or 125 from the codes below",
    },
    Code {
        code: USAGE,
        meaning: "usage error (bad arguments; nothing was sent)",
    },
    Code {
        code: VMCTL_FAILED,
        meaning: "no answer (no socket, connection refused or closed, not JSON) or a refusal \
                  ({\"ok\":false,...}, printed on stdout, its error on stderr)",
    },
    C_INTERRUPTED,
    C_BROKEN_PIPE,
    C_TERMINATED,
];

// The daemon suspends its sessions' VMs on SIGINT/SIGTERM and exits 0.
const KIMBERLIZED: &[Code] = &[
    Code {
        code: SUCCESS,
        meaning: "stopped by SIGINT/SIGTERM, every running session's VM suspended into the state directory",
    },
    Code {
        code: ERROR,
        meaning: "error: the address cannot be bound, the state directory cannot be made private, TLS files unusable",
    },
    C_USAGE,
    C_VMDIR,
];

/// The codes `tool` can exit with.
pub fn table(tool: Tool) -> &'static [Code] {
    match tool {
        Tool::Kimberlize => KIMBERLIZE,
        Tool::Dekimberlize => DEKIMBERLIZE,
        Tool::Vmigrate => VMIGRATE,
        Tool::Vmctl => VMCTL,
        Tool::Kimberlized => KIMBERLIZED,
    }
}

/// The table as text for `--help` ("EXIT STATUS:" and one line per code).
pub fn render(tool: Tool) -> String {
    let mut s = String::from("EXIT STATUS:");
    for c in table(tool) {
        s.push_str(&format!("\n  {:>3}  {}", c.code, c.meaning));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimberley_formats::Error;
    use std::path::PathBuf;

    /// The library's classification lands on the documented codes.
    #[test]
    fn library_errors_map_to_the_tables() {
        let io = || std::io::Error::other("x");
        for (e, code) in [
            (Error::io("x", io()), ERROR),
            (Error::Invalid("x".into()), ERROR),
            (Error::Usage("x".into()), USAGE),
            (Error::Empty, CORRUPT),
            (Error::NotAnOverlay, CORRUPT),
            (Error::Truncated("x".into()), CORRUPT),
            (Error::Corrupt("x".into()), CORRUPT),
            (Error::Auth("x".into()), AUTH),
            (Error::Key("x".into()), AUTH),
            (Error::WrongBase("x".into()), WRONG_BASE),
            (Error::Chain("x".into()), WRONG_BASE),
            (Error::Exists(PathBuf::from("x")), EXISTS),
            (
                Error::VmDir {
                    path: PathBuf::from("x"),
                    why: "x".into(),
                },
                VMDIR,
            ),
            (Error::Mismatch("x".into()), MISMATCH),
        ] {
            assert_eq!(e.exit_code(), code as i32, "{e:?}");
            for t in [Tool::Kimberlize, Tool::Dekimberlize] {
                assert!(table(t).iter().any(|c| c.code == code), "{t:?} {code}");
            }
        }
    }

    #[test]
    fn every_table_lists_the_signal_and_pipe_codes() {
        assert_eq!((INTERRUPTED, BROKEN_PIPE, TERMINATED), (130, 141, 143));
        assert_eq!(for_signal(libc::SIGINT), 130);
        assert_eq!(for_signal(libc::SIGTERM), 143);
        for t in [Tool::Kimberlize, Tool::Dekimberlize, Tool::Vmigrate] {
            for code in [SUCCESS, ERROR, USAGE, INTERRUPTED, BROKEN_PIPE, TERMINATED] {
                assert!(table(t).iter().any(|c| c.code == code), "{t:?} {code}");
            }
            let r = render(t);
            assert!(
                r.contains("130") && r.contains("141") && r.contains("143"),
                "{r}"
            );
        }
    }
}
