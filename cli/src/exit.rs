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
/// `vmctl` could not get an answer, or got a refusal (`timeout(1)`'s
/// convention: any other code of `vmctl exec` is the script's status).
pub const VMCTL_FAILED: u8 = 125;

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
    meaning: "usage error (bad arguments)",
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

const OVERLAY_TOOLS: &[Code] = &[
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
];
const VMIGRATE: &[Code] = &[C_SUCCESS, C_ERROR, C_USAGE, C_AUTH, C_EXISTS, C_VMDIR, C_VM];

/// The codes `tool` can exit with.
pub fn table(tool: Tool) -> &'static [Code] {
    match tool {
        Tool::Kimberlize | Tool::Dekimberlize => OVERLAY_TOOLS,
        Tool::Vmigrate => VMIGRATE,
        Tool::Vmctl => VMCTL,
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
