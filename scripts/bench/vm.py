#!/usr/bin/env python3
"""Helpers for scripts/bench-vm.sh (not meant to be run by hand).

  vm.py resume ARGS...   row 2: run `dekimberlize --run`, read its VmRSS when
                         the control socket appears, ask the guest, stop it,
                         time the suspend; prints one JSON object
  vm.py get FILE EXPR    evaluate EXPR on the JSON in FILE (as `d`), print it
  vm.py report TSV OUT   write the Markdown section from the raw results
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def ask(sock_path, req, timeout=600):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock_path)
    f = s.makefile("rw")
    f.write(json.dumps(req) + "\n")
    f.flush()
    line = f.readline()
    s.close()
    if not line:
        raise RuntimeError(f"no answer to {req} on {sock_path}")
    return json.loads(line)


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # kB
    return out


def resume(argv):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--dek", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--ovl", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sock", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--console", required=True)
    p.add_argument("--stderr", required=True)
    p.add_argument("--check", default="", help="script to exec in the guest after the measurement")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)

    if os.path.exists(a.sock):
        os.unlink(a.sock)
    cmd = [a.dek, "--base", a.base, "-i", a.ovl, "-k", a.key, "-o", a.out,
           "--run", "--control", a.sock, "--stats-json", a.stats, "-q"]
    con = open(a.console, "wb")
    err = open(a.stderr, "wb")
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=con, stderr=err)
    deadline = t_start + a.timeout
    while not os.path.exists(a.sock):
        if proc.poll() is not None:
            raise SystemExit(f"dekimberlize exited with {proc.returncode} before its control "
                             f"socket appeared; stderr: {open(a.stderr).read().strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("timed out waiting for the control socket")
        time.sleep(0.001)
    t_sock = time.monotonic()
    st = proc_status(proc.pid)
    res = {
        "socket_after_ms": round((t_sock - t_start) * 1000, 1),
        "vmrss_kib": st.get("VmRSS"),
        "vmhwm_kib": st.get("VmHWM"),
        "rss_anon_kib": st.get("RssAnon"),
        "rss_file_kib": st.get("RssFile"),
    }
    # The socket may be bound a moment before it accepts; retry briefly.
    for i in range(200):
        try:
            status = ask(a.sock, {"cmd": "status"})
            break
        except (ConnectionRefusedError, FileNotFoundError):
            time.sleep(0.005)
    else:
        raise SystemExit("control socket never accepted a connection")
    res["status"] = status.get("status")
    res["ready"] = status.get("ready")
    if a.check:
        r = ask(a.sock, {"cmd": "exec", "script": a.check})
        res["check_status"] = r.get("status")
        res["check_output"] = r.get("output")
    t0 = time.monotonic()
    r = ask(a.sock, {"cmd": "stop"})
    t1 = time.monotonic()
    rc = proc.wait(timeout=a.timeout)
    t2 = time.monotonic()
    res["stop_answer"] = r
    res["stop_reply_ms"] = round((t1 - t0) * 1000, 1)
    res["stop_to_exit_ms"] = round((t2 - t0) * 1000, 1)
    res["exit"] = rc
    print(json.dumps(res))
    if rc != 0:
        raise SystemExit(f"dekimberlize exited with {rc}; stderr: {open(a.stderr).read().strip()}")


def get(argv):
    d = json.load(open(argv[0]))
    print(eval(argv[1], {}, {"d": d}))


# ---------------------------------------------------------------------------
# Report


def fmt_ms(v):
    if v >= 10000:
        return f"{v / 1000:.1f} s"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 100:
        return f"{v:.0f} ms"
    return f"{v:.1f} ms" if v != int(v) else f"{int(v)} ms"


def fmt_mib(kib):
    return f"{kib / 1024:.1f} MiB"


def report(argv):
    tsv, out = argv
    meta = {}
    vals = {}  # (row, key) -> [values in run order]
    with open(tsv) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            row, run, key, value = line.split("\t", 3)
            if row == "meta":
                meta[key] = value
                continue
            vals.setdefault((row, key), []).append(float(value))

    def series(row, key):
        v = vals.get((row, key))
        if not v:
            raise SystemExit(f"no values for {row}/{key} in {tsv}")
        return v

    def med(row, key):
        return statistics.median(series(row, key))

    def span(row, key, f):
        v = series(row, key)
        return f"{f(min(v))} – {f(max(v))}"

    L = []
    w = L.append
    w("<!-- bench-vm:begin -->")
    w("## MicroVM: base, resume, synthesis through a 100 Mbit/s pipe")
    w("")
    w(f"Measured by `scripts/bench-vm.sh` on {meta['date']}: {meta['nproc']} cores "
      f"({meta['cpu']}), {meta['mem']} RAM, Linux {meta['kernel']}.")
    w(f"Command: `{meta['command']}` ({meta['runs']} run(s) per measurement; "
      f"median, min – max over the runs).")
    w(f"Load average at start / end: {meta['load_start']} / {meta['load_end']}.")
    if meta.get("quick") == "1":
        w("**QUICK mode: smaller guests and overlays and one run each; a check of the script, "
          "not a result.**")
    w("")
    w("**This machine's KVM is nested** (`kvm_pvm`, page-table based, no VT-x/AMD-V; "
      "see `../shared/KVM-HERE.md`): the test guest runs at CPL 3 at native speed, "
      "but VM exits and memory-slot setup cost more than on bare metal. The machine was "
      "shared with other jobs during the run (see the load average), so times are noisy. "
      "Files are in the page cache (warm: the base and the overlay were just written).")
    w("")

    rate = float(meta["rate"])
    ovl3 = float(meta["r3_overlay_bytes"])
    xfer_ms = ovl3 / rate * 1000
    bound_ms = 1.1 * xfer_ms
    guest_kib = float(meta["r2_guest_mem_bytes"]) / 1024
    rss_target_kib = guest_kib / 10

    rows = []  # (what, median, span, target, ratio, result)

    def row(what, median_s, span_s, target_s="—", ratio_s="—", result="—"):
        rows.append((what, median_s, span_s, target_s, ratio_s, result))

    def verdict(ok):
        return "**PASS**" if ok else "**MISS**"

    m = med("base", "wall_ms")
    row(f"1. `kimberlize base --memory {meta['r1_memory']} --disk {meta['r1_disk']}`: "
        "wall time (boot to ready + suspend)",
        fmt_ms(m), span("base", "wall_ms", fmt_ms), "< 1 s", f"{m / 1000:.2f}", verdict(m < 1000))

    m = med("resume", "restore_to_first_instruction_ms")
    row(f"2a. resume a synthesised {meta['r2_guest_mem']} guest ({meta['r2_fill']} filled): "
        "VMDIR on disk to first guest instruction (`restore_to_first_instruction_ms`)",
        fmt_ms(m), span("resume", "restore_to_first_instruction_ms", fmt_ms), "< 50 ms",
        f"{m / 50:.2f}", verdict(m < 50))
    m = med("resume", "restore_to_answer_ms")
    row("2b. same: restore start to the guest's first answer (`first_answer_ms - restore_start_ms`)",
        fmt_ms(m), span("resume", "restore_to_answer_ms", fmt_ms))
    m = med("resume", "vmrss_kib")
    row(f"2c. same: dekimberlize VmRSS when the control socket appears "
        f"(guest memory {meta['r2_guest_mem']})",
        fmt_mib(m), span("resume", "vmrss_kib", fmt_mib),
        f"far below {fmt_mib(guest_kib)} (here: < 10 %, {fmt_mib(rss_target_kib)})",
        f"{m / rss_target_kib:.2f}", verdict(m < rss_target_kib))
    m = med("resume", "stop_to_exit_ms")
    row("2d. same: `{\"cmd\":\"stop\"}` to process exit (suspends back into OUT)",
        fmt_ms(m), span("resume", "stop_to_exit_ms", fmt_ms))

    m = med("pipe", "limited_sync_ms")
    row(f"3. synthesis through a pipe at 100 Mbit/s (`pv -L {int(rate)}`), "
        f"{ovl3 / 1e6:.1f} MB overlay, durable (fsynced): start to exit",
        fmt_ms(m), span("pipe", "limited_sync_ms", fmt_ms),
        f"≤ 1.1 × transfer = {fmt_ms(bound_ms)}",
        f"{m / bound_ms:.2f} ({m / xfer_ms:.2f} × transfer)", verdict(m <= bound_ms))
    m = med("pipe", "limited_nosync_ms")
    row("3'. same with `--no-sync` (soft state)",
        fmt_ms(m), span("pipe", "limited_nosync_ms", fmt_ms),
        f"(≤ {fmt_ms(bound_ms)}, not the target row)",
        f"{m / bound_ms:.2f} ({m / xfer_ms:.2f} × transfer)", "—")
    m = med("pipe", "unlimited_sync_ms")
    row("3''. same overlay, unlimited (`-i app.ovl`), durable",
        fmt_ms(m), span("pipe", "unlimited_sync_ms", fmt_ms))
    m = med("pipe", "unlimited_nosync_ms")
    row("3'''. same overlay, unlimited, `--no-sync`",
        fmt_ms(m), span("pipe", "unlimited_nosync_ms", fmt_ms))
    row("context: the original Kimberley prototype at 100 Mbit/s, overlays of 64 – 197 MB",
        "60 – 90 s", "—")

    w("| measurement | median | min – max | target | ratio (median / target) | result |")
    w("|---|---|---|---|---|---|")
    for r in rows:
        w("| " + " | ".join(r) + " |")
    w("")

    w(f"Row 3 in detail (the PASS/MISS row is the durable one, the default; `--no-sync` is "
      f"shown because a cloudlet's launch VM is soft state). Overlay: {int(ovl3)} bytes, "
      f"transfer time at exactly 12.5 MB/s {fmt_ms(xfer_ms)}; "
      f"launch VM {meta['r3_guest']}; install script {meta['r3_fill']}. "
      "`--stats-json` of the limited durable runs (ms from start):")
    w("")
    w("| stat | median | min – max |")
    w("|---|---|---|")
    for k in ("receive_ms", "apply_ms", "total_ms"):
        w(f"| `{k}` | {fmt_ms(med('pipe', 'lim_' + k))} | {span('pipe', 'lim_' + k, fmt_ms)} |")
    w(f"| dekimberlize max RSS (GNU time) | {fmt_mib(med('pipe', 'lim_maxrss_kib'))} | "
      f"{span('pipe', 'lim_maxrss_kib', fmt_mib)} |")
    w("")
    w("`apply_ms` close to `receive_ms` means segments were applied while the rest was still "
      "arriving; `total_ms` includes the final checks, fsync and rename.")
    w("")
    w(f"Row 2: base `--memory {meta['r2_guest_mem']} --disk {meta['vm_disk']}`, overlay "
      f"{int(float(meta['r2_overlay_bytes']))} bytes ({meta['r2_fill']}), synthesised with "
      "`dekimberlize -i app.ovl ... --run --control SOCK --stats-json S.json` "
      f"(synthesis {fmt_ms(med('resume', 'synth_total_ms'))} median). VmRSS read from "
      "`/proc/PID/status` as soon as the socket exists; peak VmHWM then "
      f"{fmt_mib(med('resume', 'vmhwm_kib'))} (synthesis included). Row 1 peak RSS "
      f"(GNU time): {fmt_mib(med('base', 'maxrss_kib'))}.")
    w("<!-- bench-vm:end -->")
    with open(out, "w") as f:
        f.write("\n".join(L) + "\n")
    # also echo the table for the terminal
    print("\n".join(L))


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"resume": resume, "get": get, "report": report}[cmd](rest)
