#!/usr/bin/env python3
"""One timed early start for scripts/bench-early.sh.

usage: early.py run DEK BASE OVL KEY OUT SOCK STATS RATE CHECK [--no-early]
       early.py report RESULTS.jsonl OVERLAY_BYTES RATE CMD LOAD STAMP VERSIONS

`run`: pipes OVL through `pv -q -L RATE` into `DEK --base BASE -k KEY -o OUT
--run [--early-start] --control SOCK --stats-json STATS`, sends the guest the
script CHECK (exec) as soon as the control socket answers, and prints one
JSON line: the time from the start to the socket, to CHECK's answer, to the
committed VMDIR (the statistics file), and the statistics' early_start
object. Then it stops the VM and waits for DEK to exit.
`report`: the Markdown section from the JSON lines (medians, min-max).
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def ask(path, req, timeout=600):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(65536)
        if not b:
            break
        buf += b
    s.close()
    return json.loads(buf)


def run(argv):
    dek, base, ovl, key, out, sock, stats, rate, check = argv[:9]
    early = "--no-early" not in argv[9:]
    for p in (sock, stats):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [dek, "--base", base, "-k", key, "-o", out, "--run", "--control", sock,
           "--stats-json", stats, "-q"]
    if early:
        cmd.insert(cmd.index("--run") + 1, "--early-start")
    t0 = time.monotonic()
    pv = subprocess.Popen(["pv", "-q", "-L", rate, ovl], stdout=subprocess.PIPE)
    p = subprocess.Popen(cmd, stdin=pv.stdout, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    pv.stdout.close()
    while True:
        try:
            ask(sock, {"cmd": "status"}, timeout=5)
            break
        except OSError:
            if p.poll() is not None:
                sys.exit("dekimberlize exited: " + p.stderr.read().decode())
            time.sleep(0.005)
    t_sock = time.monotonic()
    r = ask(sock, {"cmd": "exec", "script": open(check).read()})
    t_answer = time.monotonic()
    if not r.get("ok") or r.get("status") != 0:
        sys.exit(f"check failed: {r}")
    while not os.path.exists(stats):
        if p.poll() is not None:
            sys.exit("dekimberlize exited: " + p.stderr.read().decode())
        time.sleep(0.005)
    t_commit = time.monotonic()
    pv.wait()
    # The statistics file is written whole by rename: read it once there.
    st = json.load(open(stats))
    ask(sock, {"cmd": "stop"})
    err = p.stderr.read().decode()
    if p.wait() != 0:
        sys.exit("dekimberlize failed: " + err)
    print(json.dumps({
        "early": early,
        "socket_s": t_sock - t0,
        "answer_s": t_answer - t0,
        "committed_s": t_commit - t0,
        "output": r["output"],
        "early_start": st.get("early_start"),
        "total_ms": st["times"]["total_ms"],
    }))


def report(argv):
    path, ovl_bytes, rate, cmd, load, stamp, versions = argv
    ovl_bytes, rate = int(ovl_bytes), int(rate)
    rows = [json.loads(l) for l in open(path) if l.strip()]
    transfer = ovl_bytes / rate
    E = [r for r in rows if r["early"]]
    F = [r for r in rows if not r["early"]]

    def med(rs, f):
        v = [f(r) for r in rs]
        return statistics.median(v), min(v), max(v)

    def cell(rs, f, fmt="{:.2f}"):
        m, lo, hi = med(rs, f)
        return f"{fmt.format(m)} ({fmt.format(lo)} – {fmt.format(hi)})"

    frac = lambda r: r["early_start"]["received_bytes_at_first_instruction"] / ovl_bytes
    out = []
    out.append("<!-- bench-early:begin -->")
    out.append("## Early start through a 100 Mbit/s pipe (`scripts/bench-early.sh`)")
    out.append("")
    out.append("_Written by `scripts/bench-early.sh`; rerun it rather than editing this section._")
    out.append("")
    out.append(f"- Command: `{cmd}`")
    out.append(f"- {stamp}, load average before the runs: {load}, 2 cores; {versions}")
    out.append("- Guest: the microVM, 1 GiB memory and 1 GiB disk. Install: the synthesis row's data "
               "(`fill t 120M 3 text`, `fill r 60M 4 random`, `disk-write 0 20M 5`) plus "
               "`fill hot 4M 6 text`; resume script `counter start`, `checksum hot`, `sleep 10`, "
               "`counter`. `kimberlize build --early-start` records the pages the resumed VM "
               "touches while it reruns the resume script (+500 ms) and writes a version-2 overlay "
               f"with them first: {ovl_bytes} bytes, {transfer:.2f} s at {rate} B/s.")
    out.append("- Each run: `pv -q -L RATE early.ovl | dekimberlize --run [--early-start] ...`; "
               "as soon as the control socket answers, `exec` of `checksum hot` (the resume "
               "script's checksum); times from the start of the pipe. Committed = the statistics "
               "file, written after the VMDIR is renamed into place.")
    out.append(f"- {len(E)} runs with --early-start, {len(F)} without (the full apply first).")
    out.append("")
    out.append("| measurement | --early-start: median (min – max) | full apply first | target | result |")
    out.append("|---|---|---|---|---|")
    f_ok = med(E, frac)[0] <= 0.15
    a_ok = med(E, lambda r: r["answer_s"])[0] <= 0.2 * transfer
    c_ok = med(E, lambda r: r["committed_s"])[0] <= 1.1 * transfer
    v = lambda ok: "**PASS**" if ok else "**MISS**"
    out.append(f"| overlay bytes read at the first guest instruction | "
               f"{cell(E, lambda r: 100 * frac(r), '{:.1f}')} % | 100 % | ≤ 15 % | {v(f_ok)} |")
    out.append(f"| first answer to `checksum hot`, s | {cell(E, lambda r: r['answer_s'])} | "
               f"{cell(F, lambda r: r['answer_s']) if F else '—'} | ≤ {0.2 * transfer:.2f} (0.2 × transfer) | "
               f"{v(a_ok)} ({med(E, lambda r: r['answer_s'])[0] / transfer:.3f} ×) |")
    out.append(f"| committed VMDIR, s | {cell(E, lambda r: r['committed_s'])} | "
               f"{cell(F, lambda r: r['committed_s']) if F else '—'} | ≤ {1.1 * transfer:.2f} (1.1 × transfer) | "
               f"{v(c_ok)} ({med(E, lambda r: r['committed_s'])[0] / transfer:.3f} ×) |")
    out.append(f"| pages served from the base / the overlay / after waiting (median) | "
               f"{med(E, lambda r: r['early_start']['pages_from_base'])[0]:.0f} / "
               f"{med(E, lambda r: r['early_start']['pages_from_overlay'])[0]:.0f} / "
               f"{med(E, lambda r: r['early_start']['pages_waited'])[0]:.0f} | — | — | — |")
    out.append("<!-- bench-early:end -->")
    print("\n".join(out))


if __name__ == "__main__":
    {"run": run, "report": report}[sys.argv[1]](sys.argv[2:])
