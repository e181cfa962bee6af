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
const VMIGRATE: &[Code] = &[C_SUCCESS, C_ERROR, C_USAGE, C_AUTH, C_EXISTS, C_VMDIR, C_VM];

/// The codes `tool` can exit with.
pub fn table(tool: Tool) -> &'static [Code] {
    match tool {
        Tool::Kimberlize | Tool::Dekimberlize => OVERLAY_TOOLS,
        Tool::Vmigrate => VMIGRATE,
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
