//! Progress on stderr (a bar on a terminal, log lines with `--progress=plain`), the one-line summaries, and the one formatter of sizes, rates and times.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use kimberley_formats::progress::{Progress, Snapshot};

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `n` bytes in the binary unit that fits its magnitude: `512 B`,
/// `12.3 MiB`, `487 MiB`, `1.0 GiB` (three significant digits at most,
/// never `0.0 MiB`).
pub fn bytes(n: u64) -> String {
    human(n as f64, "")
}

/// A throughput: `bytes` in `elapsed`, e.g. `487 MiB/s`.
pub fn rate(bytes: u64, elapsed: Duration) -> String {
    per_sec(bytes as f64 / elapsed.as_secs_f64().max(1e-3))
}

/// Bytes per second, e.g. `1.2 GiB/s`.
pub fn per_sec(v: f64) -> String {
    human(v, "/s")
}

fn human(v: f64, suffix: &str) -> String {
    let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
    if v < 1023.5 {
        return format!("{v:.0} B{suffix}");
    }
    let mut k = 0;
    let mut x = v;
    while x >= 1023.95 && k + 1 < UNITS.len() {
        x /= 1024.0;
        k += 1;
    }
    if x < 99.95 {
        format!("{x:.1} {}{suffix}", UNITS[k])
    } else {
        format!("{x:.0} {}{suffix}", UNITS[k])
    }
}

/// A duration for people: `340 ms`, `2.1 s`, `3 min 05 s`, `1 h 02 min`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 59_950 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        let s = (d.as_secs_f64().round()) as u64;
        if s < 3600 {
            format!("{} min {:02} s", s / 60, s % 60)
        } else {
            format!("{} h {:02} min", s / 3600, s % 3600 / 60)
        }
    }
}

/// `--progress`: how a run reports its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal (not with -q); nothing but the summary otherwise.
    Auto,
    /// A bar (drawn only when stderr is a terminal).
    Bar,
    /// Log lines for cron and CI: elapsed time, stage, bytes and
    /// throughput, at most one a second.
    Plain,
    /// No progress (the summary still, unless -q).
    None,
}

/// What [`Reporter`] draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Draw {
    Nothing,
    Bar,
    Plain,
}

fn draw_for(mode: ProgressMode, quiet: bool, terminal: bool) -> Draw {
    match mode {
        ProgressMode::Auto if !quiet && terminal => Draw::Bar,
        ProgressMode::Auto | ProgressMode::None => Draw::Nothing,
        ProgressMode::Bar => Draw::Bar,
        ProgressMode::Plain => Draw::Plain,
    }
}

/// Reports a [`Progress`] on stderr until dropped: one bar for the whole
/// run (a spinner with the stage's name until the total is planned), or
/// plain log lines.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    bar: Option<ProgressBar>,
}

impl Reporter {
    /// Starts reporting `p` as `mode` says (`quiet`: -q).
    pub fn start(p: Arc<Progress>, mode: ProgressMode, quiet: bool) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let draw = draw_for(mode, quiet, std::io::stderr().is_terminal());
        let s = stop.clone();
        let (bar, thread) = match draw {
            Draw::Nothing => (None, None),
            Draw::Bar => {
                let bar =
                    ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
                bar.set_style(spinner_style());
                bar.enable_steady_tick(Duration::from_millis(100));
                let b = bar.clone();
                let t = std::thread::spawn(move || draw_bar(&p, &b, &s));
                (Some(bar), Some(t))
            }
            Draw::Plain => {
                let t = std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut last: Option<(Instant, Snapshot)> = None;
                    loop {
                        let stopping = s.load(Ordering::Relaxed);
                        let snap = p.snapshot();
                        let due = match &last {
                            None => !snap.stage.is_empty(),
                            Some((at, prev)) => {
                                at.elapsed() >= Duration::from_secs(1) && *prev != snap
                            }
                        };
                        if due && !stopping {
                            let working = p.planned_at().map(|t| t.elapsed());
                            eprintln!("{}", plain_line(t0.elapsed(), working, &snap));
                            last = Some((Instant::now(), snap));
                        }
                        if stopping {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
                (None, Some(t))
            }
        };
        Reporter { stop, thread, bar }
    }

    /// Prints `line` on stderr without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// One `--progress=plain` line: `[2.1 s] diffing: 512 MiB of 1.0 GiB
/// (50%), 244 MiB/s` (`elapsed`: since the start; `working`: since the
/// total was planned, for the rate).
fn plain_line(elapsed: Duration, working: Option<Duration>, s: &Snapshot) -> String {
    let took = working.unwrap_or(elapsed);
    let mut l = format!("[{}] {}", duration(elapsed), s.stage);
    match s.total {
        Some(total) if total > 0 => {
            let _ = write!(
                l,
                ": {} of {} ({}%), {}",
                bytes(s.done),
                bytes(total),
                s.done.min(total) * 100 / total,
                rate(s.done, took)
            );
        }
        _ if s.done > 0 => {
            let _ = write!(l, ": {}, {}", bytes(s.done), rate(s.done, took));
        }
        _ => {}
    }
    l
}

fn key(
    f: fn(&ProgressState) -> String,
) -> impl Fn(&ProgressState, &mut dyn std::fmt::Write) + Send + Sync + Clone + 'static {
    move |s, w| {
        let _ = w.write_str(&f(s));
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} {took}")
        .expect("valid template")
        .with_key("took", key(|s| duration(s.elapsed())))
}

/// The bar, from `start` (when the run's total was planned): the rate
/// and the time left are the averages since then (indicatif's estimate
/// jumps when a stage skips holes, and would count the spinner's time).
fn bar_style(start: Instant) -> ProgressStyle {
    let left = move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let took = start.elapsed().as_secs_f64();
        let rest = s.len().unwrap_or(0).saturating_sub(s.pos()) as f64;
        let text = match s.pos() {
            0 => "?".to_string(),
            done => duration(Duration::from_secs_f64(rest * took / done as f64)),
        };
        let _ = w.write_str(&text);
    };
    let speed = move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = w.write_str(&rate(s.pos(), start.elapsed()));
    };
    ProgressStyle::with_template("{msg:>14} [{bar:30}] {done}/{all} {speed} eta {left}")
        .expect("valid template")
        .progress_chars("=> ")
        .with_key("done", key(|s| bytes(s.pos())))
        .with_key("all", key(|s| bytes(s.len().unwrap_or(0))))
        .with_key("speed", speed)
        .with_key("left", left)
}

/// Follows `p` on `bar`: a spinner until the run's total is planned, then
/// one bar of that fixed length to the end.
fn draw_bar(p: &Progress, bar: &ProgressBar, stop: &AtomicBool) {
    let mut sized = false;
    let mut stage = String::new();
    while !stop.load(Ordering::Relaxed) {
        let s = p.snapshot();
        // The bar's first draw carries its stage's name: it waits for
        // the first stage after the total is planned.
        if let (Some(total), false, false) = (s.total, sized, s.stage.is_empty()) {
            bar.disable_steady_tick();
            bar.set_message(s.stage.clone());
            stage = s.stage.clone();
            bar.set_length(total);
            bar.set_style(bar_style(p.planned_at().unwrap_or_else(Instant::now)));
            sized = true;
        }
        // The position first: a new stage's name is drawn with its count.
        if sized {
            bar.set_position(s.done);
        }
        if s.stage != stage {
            bar.set_message(s.stage.clone());
            stage = s.stage;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_table() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1, "1 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (10 * 1024 - 1, "10.0 KiB"),
            (12_897_485, "12.3 MiB"),
            (99 << 20, "99.0 MiB"),
            (100 << 20, "100 MiB"),
            (487 << 20, "487 MiB"),
            ((1 << 20) - 1, "1.0 MiB"),
            ((1 << 30) - (1 << 10), "1.0 GiB"),
            (1 << 30, "1.0 GiB"),
            (20 * (1 << 20), "20.0 MiB"),
            (5 << 40, "5.0 TiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for &(n, want) in cases {
            assert_eq!(bytes(n), want, "{n} bytes");
        }
    }

    #[test]
    fn rates_pick_their_unit_too() {
        let s = Duration::from_secs(1);
        assert_eq!(rate(0, s), "0 B/s");
        assert_eq!(rate(500, s), "500 B/s");
        // 0.02 GiB/s is 20.5 MiB/s.
        assert_eq!(rate(21_474_836, s), "20.5 MiB/s");
        assert_eq!(rate(1 << 30, Duration::from_millis(2100)), "488 MiB/s");
        assert_eq!(rate(3 << 30, s), "3.0 GiB/s");
        // A run too short to time does not divide by zero.
        assert_eq!(rate(1 << 20, Duration::ZERO), "1000 MiB/s");
    }

    #[test]
    fn durations_table() {
        let cases: &[(u64, &str)] = &[
            (0, "0 ms"),
            (340, "340 ms"),
            (999, "999 ms"),
            (1000, "1.0 s"),
            (2140, "2.1 s"),
            (59_940, "59.9 s"),
            (59_960, "1 min 00 s"),
            (185_000, "3 min 05 s"),
            (3_720_000, "1 h 02 min"),
        ];
        for &(ms, want) in cases {
            assert_eq!(duration(Duration::from_millis(ms)), want, "{ms} ms");
        }
    }

    #[test]
    fn modes() {
        use ProgressMode::*;
        assert_eq!(draw_for(Auto, false, true), Draw::Bar);
        assert_eq!(draw_for(Auto, true, true), Draw::Nothing);
        assert_eq!(draw_for(Auto, false, false), Draw::Nothing);
        assert_eq!(draw_for(Plain, false, false), Draw::Plain);
        assert_eq!(draw_for(Plain, true, false), Draw::Plain);
        assert_eq!(draw_for(None, false, true), Draw::Nothing);
        assert_eq!(draw_for(Bar, false, false), Draw::Bar);
    }

    #[test]
    fn plain_lines() {
        let s = Snapshot {
            stage: "diffing".into(),
            done: 512 << 20,
            total: Some(1 << 30),
        };
        assert_eq!(
            plain_line(Duration::from_secs(3), Some(Duration::from_secs(2)), &s),
            "[3.0 s] diffing: 512 MiB of 1.0 GiB (50%), 256 MiB/s"
        );
        let spin = Snapshot {
            stage: "install script".into(),
            done: 0,
            total: None,
        };
        assert_eq!(
            plain_line(Duration::from_millis(300), None, &spin),
            "[300 ms] install script"
        );
    }
}
