//! Saved state of a reproducible suspend: clocks rounded up to whole
//! epochs, XSAVE header bits that do not change what is restored.
//!
//! A restored guest's clocks (KVM's kvmclock and each vCPU's TSC) continue
//! from the values in the state it was restored from, and at a suspend they
//! hold how long it ran since: a few hundred milliseconds that vary from
//! run to run. A build that wants the same launch VM from the same inputs
//! saves instead `origin + k × EPOCH`, with k the smallest whole number of
//! epochs not shorter than what the guest ran (0 if it did not run). The
//! guest, resumed from that state, sees its clock jump forward by less than
//! one epoch, as if it had been suspended for that long; time never runs
//! backwards. Runs whose guest time straddles a multiple of the epoch round
//! to different values (docs/SCRIPTS.md says so).

/// The epoch: 2^36 ns, about 68.7 s.
pub const EPOCH_NS: u64 = 1 << 36;

/// Every vCPU's TSC at boot: 2^40 ticks (minutes at GHz rates), fixed so
/// the guest's time does not depend on the host's uptime. Not 0 or any
/// value within a second of it: KVM takes a host write that close to the
/// TSC it expects as "keep in step with the other vCPUs", which for a new
/// VM means the host's TSC. Later vCPUs, written within a second, are kept
/// in step with the first.
pub const BOOT_TSC: u64 = 1 << 40;

/// IA32_TSC, the MSR that holds a vCPU's time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;

/// The clocks a VM was restored with (the values in its state blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockOrigin {
    /// kvmclock, ns.
    pub clock_ns: u64,
    /// Each vCPU's TSC, in vCPU order (None where the state had none).
    pub tsc: Vec<Option<u64>>,
    /// TSC ticks per ms.
    pub tsc_khz: u32,
}

/// Clocks to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clocks {
    /// kvmclock, ns.
    pub clock_ns: u64,
    /// Each vCPU's TSC.
    pub tsc: Vec<Option<u64>>,
}

/// Epochs the guest ran: the smallest k with k × EPOCH ≥ its time since
/// `origin` on kvmclock. (Not on the TSC: some hosts ignore the TSC a VMM
/// restores, and the guest then reads the host's, whatever its uptime.)
fn epochs(origin: &ClockOrigin, now: &Clocks) -> u64 {
    now.clock_ns
        .saturating_sub(origin.clock_ns)
        .div_ceil(EPOCH_NS)
}

/// The clocks to save for a reproducible suspend of a VM restored with
/// `origin` whose clocks are now `now`. Saturates instead of overflowing.
pub fn clocks(origin: &ClockOrigin, now: &Clocks) -> Clocks {
    let k = epochs(origin, now);
    let ns = k.saturating_mul(EPOCH_NS);
    let ticks = (ns as u128 * origin.tsc_khz as u128 / 1_000_000).min(u64::MAX as u128) as u64;
    Clocks {
        clock_ns: origin.clock_ns.saturating_add(ns),
        tsc: now
            .tsc
            .iter()
            .enumerate()
            .map(|(i, t)| match origin.tsc.get(i).copied().flatten() {
                Some(o) => Some(o.saturating_add(ticks)),
                None => *t,
            })
            .collect(),
    }
}

/// Byte offset of XSTATE_BV (the XSAVE header's first field) in the
/// XSAVE area.
const XSTATE_BV: usize = 512;

/// x87 and SSE: the components whose bit in XSTATE_BV canonical state sets.
const LEGACY_COMPONENTS: u64 = 0b11;

/// Sets the x87 and SSE bits of an XSAVE area's XSTATE_BV where XCR0
/// enables them. Whether the host's last XSAVE found them in their initial
/// configuration (bit clear) depends on host timing, but it changes nothing
/// that is restored: KVM_GET_XSAVE writes the initial values for a
/// component whose bit is clear, and XRSTOR of those values with the bit
/// set gives the same registers. A short `area` is left as it is.
pub fn xsave_header(area: &mut [u8], xcr0: u64) {
    let Some(bv) = area.get_mut(XSTATE_BV..XSTATE_BV + 8) else {
        return;
    };
    let mut v = u64::from_le_bytes(bv.try_into().expect("8 bytes"));
    v |= xcr0 & LEGACY_COMPONENTS;
    bv.copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const KHZ: u32 = 2_300_000;

    fn origin() -> ClockOrigin {
        ClockOrigin {
            clock_ns: 5_000_000_000,
            tsc: vec![Some(1_000_000_000_000), Some(1_000_000_000_100)],
            tsc_khz: KHZ,
        }
    }

    fn after(ms: u64) -> Clocks {
        let ticks = ms * KHZ as u64;
        Clocks {
            clock_ns: 5_000_000_000 + ms * 1_000_000,
            tsc: vec![
                Some(1_000_000_000_000 + ticks),
                Some(1_000_000_000_100 + ticks + 7),
            ],
        }
    }

    #[test]
    fn runs_of_different_lengths_within_an_epoch_save_the_same_clocks() {
        let o = origin();
        let a = clocks(&o, &after(345));
        let b = clocks(&o, &after(467));
        let c = clocks(&o, &after(60_000));
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.clock_ns, 5_000_000_000 + EPOCH_NS);
        let ticks = EPOCH_NS as u128 * KHZ as u128 / 1_000_000;
        assert_eq!(a.tsc[0], Some(1_000_000_000_000 + ticks as u64));
        // Each vCPU keeps its own offset from vCPU 0.
        assert_eq!(a.tsc[1], Some(1_000_000_000_100 + ticks as u64));
    }

    #[test]
    fn time_never_goes_backwards() {
        let o = origin();
        for ms in [0, 1, 68_000, 68_719, 68_720, 100_000, 1_000_000] {
            let now = after(ms);
            let c = clocks(&o, &now);
            assert!(c.clock_ns >= now.clock_ns, "{ms} ms: kvmclock");
            assert!(c.tsc[0] >= now.tsc[0], "{ms} ms: TSC");
            assert!(c.clock_ns - now.clock_ns < EPOCH_NS, "{ms} ms: jump");
        }
        // A TSC the host did not restore (the host's own, hours ahead)
        // does not change the result.
        let mut now = after(10);
        now.tsc[0] = Some(1_000_000_000_000 + 36_000_000 * KHZ as u64);
        assert_eq!(clocks(&o, &now), clocks(&o, &after(10)));
    }

    #[test]
    fn a_guest_that_did_not_run_keeps_its_clocks() {
        let o = origin();
        let c = clocks(&o, &after(0));
        assert_eq!(c.clock_ns, o.clock_ns);
        assert_eq!(c.tsc, o.tsc);
    }

    #[test]
    fn xsave_headers_differing_in_legacy_bits_become_equal() {
        let mut a = vec![0u8; 4096];
        let mut b = a.clone();
        a[XSTATE_BV] = 0b110; // SSE and AVX in use, x87 in its initial state
        b[XSTATE_BV] = 0b111;
        xsave_header(&mut a, 0b111);
        xsave_header(&mut b, 0b111);
        assert_eq!(a, b);
        assert_eq!(a[XSTATE_BV], 0b111);
        // Components XCR0 does not enable stay clear; AVX is not touched.
        let mut c = vec![0u8; 4096];
        xsave_header(&mut c, 0b001);
        assert_eq!(c[XSTATE_BV], 0b001);
        let mut short = vec![0u8; 515];
        xsave_header(&mut short, 0b111);
        assert_eq!(short, vec![0u8; 515]);
    }

    #[test]
    fn extreme_values_saturate() {
        let o = ClockOrigin {
            clock_ns: u64::MAX - 5,
            tsc: vec![Some(u64::MAX - 1), None],
            tsc_khz: u32::MAX,
        };
        let now = Clocks {
            clock_ns: u64::MAX,
            tsc: vec![Some(u64::MAX), Some(42)],
        };
        let c = clocks(&o, &now);
        assert_eq!(c.clock_ns, u64::MAX);
        assert_eq!(c.tsc, vec![Some(u64::MAX), Some(42)]);
    }
}
