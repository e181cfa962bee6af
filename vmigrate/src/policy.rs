//! The convergence policy, as pure functions: what the pause window will
//! cost if the guest stopped now (every part of it, from measured costs),
//! and whether to stop and copy, throttle, or run another round.

use serde::Serialize;

/// What the user asked for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Downtime target, milliseconds.
    pub downtime_ms: f64,
    /// Most pre-copy rounds after round 0.
    pub max_rounds: u32,
}

/// Measured costs of the parts of the pause window (milliseconds unless
/// named otherwise).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Costs {
    /// Pausing the vCPU (probe at the start).
    pub pause_ms: f64,
    /// Saving vCPU and device state, disks flushed (probe at the start).
    pub state_ms: f64,
    /// The last dirty-log fetch.
    pub fetch_ms: f64,
    /// Size of the state blob (probe).
    pub state_bytes: u64,
    /// Bytes per second the link carried in the last round.
    pub link_bps: f64,
    /// Milliseconds per dirty chunk streamed (read, compress, seal, send,
    /// receive, write): the slower of the CPU's and the link's rate.
    pub chunk_ms: f64,
    /// Milliseconds a round costs whatever its size (batching, flushes).
    pub round_fixed_ms: f64,
    /// Receiver: milliseconds to re-hash one 1 MiB digest block.
    pub hash_block_ms: f64,
    /// Receiver: committing the directory and restoring the guest to its
    /// first instruction (its probe).
    pub receiver_fixed_ms: f64,
    /// One network round trip.
    pub rtt_ms: f64,
}

/// The predicted pause window, by part.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Estimate {
    /// Pause + state save + last dirty fetch.
    pub source_ms: f64,
    /// Streaming the final dirty chunks.
    pub final_chunks_ms: f64,
    /// Sending the state blob.
    pub state_send_ms: f64,
    /// Receiver: re-hashing touched digest blocks.
    pub hash_ms: f64,
    /// Receiver: commit and restore.
    pub receiver_ms: f64,
    /// Confirmation round trip.
    pub rtt_ms: f64,
    /// The sum.
    pub total_ms: f64,
}

/// Predicts the pause window if the guest stopped with `dirty_chunks`
/// chunks left that touch `touched_blocks` 1 MiB digest blocks.
pub fn estimate(c: &Costs, dirty_chunks: u64, touched_blocks: u64) -> Estimate {
    let source_ms = c.pause_ms + c.state_ms + c.fetch_ms;
    let final_chunks_ms = c.round_fixed_ms + dirty_chunks as f64 * c.chunk_ms;
    let state_send_ms = if c.link_bps > 0.0 {
        c.state_bytes as f64 / c.link_bps * 1000.0
    } else {
        0.0
    };
    let hash_ms = touched_blocks as f64 * c.hash_block_ms;
    let e = Estimate {
        source_ms,
        final_chunks_ms,
        state_send_ms,
        hash_ms,
        receiver_ms: c.receiver_fixed_ms,
        rtt_ms: c.rtt_ms,
        total_ms: 0.0,
    };
    Estimate {
        total_ms: e.source_ms
            + e.final_chunks_ms
            + e.state_send_ms
            + e.hash_ms
            + e.receiver_ms
            + e.rtt_ms,
        ..e
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The predicted pause window fits the target.
    Converged,
    /// `--max-rounds` reached.
    RoundLimit,
    /// The dirty rate stopped falling while the link keeps up: more rounds
    /// would not shrink the final copy.
    StoppedFalling,
}

impl StopReason {
    /// As in `--stats-json`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Converged => "converged",
            StopReason::RoundLimit => "round limit",
            StopReason::StoppedFalling => "dirty rate stopped falling",
        }
    }
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Pause the guest and send the rest.
    Stop(StopReason),
    /// Run another round, with this vCPU throttle (percent, 0 = none).
    Continue {
        /// The throttle to set.
        throttle: u32,
    },
}

/// The state after a round.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// Pre-copy rounds done after round 0.
    pub round: u32,
    /// Dirty chunks (pages and disk blocks) now.
    pub dirty_chunks: u64,
    /// 1 MiB digest blocks they touch.
    pub touched_blocks: u64,
    /// Bytes per second the guest dirtied since the last fetch.
    pub dirty_rate: f64,
    /// Bytes per second of chunks the whole pipeline carried last round.
    pub carry_rate: f64,
    /// The dirty rate after the previous round (0 for none).
    pub prev_dirty_rate: f64,
    /// The throttle in force.
    pub throttle: u32,
}

/// Highest throttle.
pub const MAX_THROTTLE: u32 = 99;

/// Decides after a round: stop when the predicted window fits the target
/// or the round limit is reached; otherwise auto-converge (a round that
/// dirtied more than half of what the pipeline carried raises the throttle
/// by a step, 20% then +10% as QEMU does, or at once to the throttle that
/// brings the guest's unthrottled rate down to half the carry rate,
/// whichever is higher); without a throttle, stop when the dirty rate no
/// longer falls and the link keeps up.
pub fn decide(l: &Limits, c: &Costs, o: &Observation) -> (Decision, Estimate) {
    let e = estimate(c, o.dirty_chunks, o.touched_blocks);
    if e.total_ms <= l.downtime_ms {
        return (Decision::Stop(StopReason::Converged), e);
    }
    if o.round >= l.max_rounds {
        return (Decision::Stop(StopReason::RoundLimit), e);
    }
    let high = o.dirty_rate > 0.5 * o.carry_rate;
    if high && o.throttle < MAX_THROTTLE {
        let guest_rate = o.dirty_rate / (1.0 - f64::from(o.throttle) / 100.0);
        let needed = (100.0 * (1.0 - 0.5 * o.carry_rate / guest_rate))
            .ceil()
            .clamp(0.0, f64::from(MAX_THROTTLE)) as u32;
        let step = if o.throttle == 0 { 20 } else { o.throttle + 10 };
        return (
            Decision::Continue {
                throttle: step.max(needed).min(MAX_THROTTLE),
            },
            e,
        );
    }
    if o.throttle == 0
        && !high
        && o.round >= 2
        && o.prev_dirty_rate > 0.0
        && o.dirty_rate >= o.prev_dirty_rate * 0.95
    {
        return (Decision::Stop(StopReason::StoppedFalling), e);
    }
    (
        Decision::Continue {
            throttle: o.throttle,
        },
        e,
    )
}

/// Number of distinct 1 MiB digest blocks the sorted chunk indices touch.
pub fn touched_blocks(sorted_chunks: &[u64], chunks_per_block: u64) -> u64 {
    let mut n = 0;
    let mut last = None;
    for &c in sorted_chunks {
        let b = c / chunks_per_block;
        if last != Some(b) {
            n += 1;
            last = Some(b);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Costs {
        Costs {
            pause_ms: 0.5,
            state_ms: 2.0,
            fetch_ms: 1.0,
            state_bytes: 100_000,
            link_bps: 100e6,
            chunk_ms: 0.01,
            round_fixed_ms: 0.5,
            hash_block_ms: 0.5,
            receiver_fixed_ms: 8.0,
            rtt_ms: 0.2,
        }
    }

    fn obs() -> Observation {
        Observation {
            round: 1,
            dirty_chunks: 100,
            touched_blocks: 2,
            dirty_rate: 1e6,
            carry_rate: 500e6,
            prev_dirty_rate: 0.0,
            throttle: 0,
        }
    }

    const L: Limits = Limits {
        downtime_ms: 50.0,
        max_rounds: 30,
    };

    #[test]
    fn estimate_sums_every_part() {
        let e = estimate(&costs(), 1000, 4);
        assert_eq!(e.source_ms, 3.5);
        assert!((e.final_chunks_ms - 10.5).abs() < 1e-9);
        assert!((e.state_send_ms - 1.0).abs() < 1e-9);
        assert_eq!(e.hash_ms, 2.0);
        assert_eq!(e.receiver_ms, 8.0);
        assert!((e.total_ms - (3.5 + 10.5 + 1.0 + 2.0 + 8.0 + 0.2)).abs() < 1e-9);
    }

    #[test]
    fn converges_only_when_the_whole_window_fits() {
        // 100 chunks: 1 ms of streaming, but the fixed parts count too.
        assert_eq!(
            decide(&L, &costs(), &obs()).0,
            Decision::Stop(StopReason::Converged)
        );
        let mut c = costs();
        c.receiver_fixed_ms = 48.0; // the chunks alone would fit; the whole window does not
        assert!(matches!(
            decide(&L, &c, &obs()).0,
            Decision::Continue { .. }
        ));
        // Touched digest blocks are part of the window.
        let mut o = obs();
        o.touched_blocks = 100;
        assert!(matches!(
            decide(&L, &costs(), &o).0,
            Decision::Continue { .. }
        ));
    }

    #[test]
    fn round_limit_and_throttle_steps() {
        let mut o = obs();
        o.dirty_chunks = 1_000_000;
        o.dirty_rate = 300e6; // more than half of what the pipeline carries
        assert_eq!(
            decide(&L, &costs(), &o).0,
            Decision::Continue { throttle: 20 }
        );
        o.throttle = 20;
        o.dirty_rate = 260e6;
        // +10 would be 30; the guest's own rate (325 MB/s) needs 24 -> 30.
        assert_eq!(
            decide(&L, &costs(), &o).0,
            Decision::Continue { throttle: 30 }
        );
        o.dirty_rate = 2000e6; // needs far more than a step
        let Decision::Continue { throttle } = decide(&L, &costs(), &o).0 else {
            panic!()
        };
        assert!(throttle > 80, "{throttle}");
        o.round = 30;
        assert_eq!(
            decide(&L, &costs(), &o).0,
            Decision::Stop(StopReason::RoundLimit)
        );
    }

    #[test]
    fn stops_when_dirtying_no_longer_falls() {
        let mut o = obs();
        o.dirty_chunks = 1_000_000;
        o.round = 2;
        o.dirty_rate = 10e6;
        o.prev_dirty_rate = 10e6;
        assert_eq!(
            decide(&L, &costs(), &o).0,
            Decision::Stop(StopReason::StoppedFalling)
        );
        o.prev_dirty_rate = 20e6; // still falling
        assert_eq!(
            decide(&L, &costs(), &o).0,
            Decision::Continue { throttle: 0 }
        );
    }

    #[test]
    fn touched_blocks_counts_distinct_blocks() {
        assert_eq!(touched_blocks(&[], 256), 0);
        assert_eq!(touched_blocks(&[0, 1, 255, 256, 1000, 1023, 1024], 256), 4);
    }
}
