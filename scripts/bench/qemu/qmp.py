#!/usr/bin/env python3
"""Minimal QMP client for scripts/bench-qemu-migrate.sh (socket module only).

  qmp.py cmd SOCK COMMAND [JSON-ARGS]   one command, prints its "return"
  qmp.py migrate SRC DST PORT BW_BYTES DOWNTIME_MS MULTIFD OUT.json [HOST [RELAY]]
      MULTIFD: "off", "on" (multifd, no compression) or a compression
      method ("zstd", "zlib"). Sets the same capabilities on both sides,
      starts the destination's listener (it runs with -incoming defer) on
      HOST:PORT (default 127.0.0.1), runs the migration, polls query-migrate
      until completed/failed and writes the final query-migrate answer (plus
      the parameters used) to OUT.json. RELAY=1: the stream goes through the
      counting relay for every MULTIFD (default: multifd only).
  qmp.py qga SOCK TIMEOUT_S SCRIPT
      Runs SCRIPT with /bin/sh -c in the guest through qemu-guest-agent
      (guest-exec), prints its output, exits with its status.
  qmp.py ctl SOCK TIMEOUT_S SCRIPT
      The same through a Kimberley control socket ({"cmd":"exec"}).
  qmp.py ctlcmd SOCK JSON
      One request to a Kimberley control socket; prints the answer.
"""
import base64
import json
import socket
import sys
import threading
import time


class Relay:
    """Counting TCP relay 127.0.0.1:<ephemeral> -> 127.0.0.1:port. Used for
    multifd runs only: QEMU 7.2 accounts multifd pages uncompressed in
    ram.transferred, so the bytes really sent are counted here."""

    def __init__(self, port, host="127.0.0.1"):
        self.port = port
        self.host = host
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.listen_port = self.ls.getsockname()[1]
        self.bytes = 0
        self.lock = threading.Lock()
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.ls.accept()
            except OSError:
                return
            b = socket.create_connection((self.host, self.port))
            for x, y, count in ((a, b, True), (b, a, False)):
                t = threading.Thread(target=self._pump, args=(x, y, count), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, x, y, count):
        buf = bytearray(1 << 20)
        try:
            while True:
                n = x.recv_into(buf)
                if not n:
                    break
                y.sendall(memoryview(buf)[:n])
                if count:
                    with self.lock:
                        self.bytes += n
        except OSError:
            pass
        try:
            y.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, timeout=10):
        self.ls.close()
        end = time.time() + timeout
        for t in self.threads:
            t.join(max(0, end - time.time()))
        return self.bytes


class QMP:
    def __init__(self, path, timeout=30.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"{path}: no QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{name} {args}: {r['error']}")
            return r["return"]


def migrate(src_path, dst_path, port, bw, downtime_ms, multifd, out, host="127.0.0.1", always_relay=False):
    src, dst = QMP(src_path), QMP(dst_path)
    caps = [{"capability": "events", "state": True}]
    params = {}
    if multifd == "block":
        # Not multifd: QEMU's block migration (the disks in the stream,
        # zero blocks as flags), on the source only.
        multifd = "off"
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "block", "state": True},
            {"capability": "zero-blocks", "state": True}])
    elif multifd != "off":
        caps.append({"capability": "multifd", "state": True})
        params["multifd-compression"] = "none" if multifd == "on" else multifd
    for q in (src, dst):
        q.cmd("migrate-set-capabilities", capabilities=caps)
        if params:
            q.cmd("migrate-set-parameters", **params)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": bw, "downtime-limit": downtime_ms})
    uri = f"tcp:{host}:{port}"
    dst.cmd("migrate-incoming", uri=uri)
    relay = Relay(port, host) if multifd != "off" or always_relay else None
    t0 = time.time()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.listen_port}" if relay else uri)
    last = None
    dst_run = None  # seconds from `migrate` to the destination running
    while True:
        if dst_run is None and dst.cmd("query-status").get("status") == "running":
            dst_run = time.time() - t0
        r = src.cmd("query-migrate")
        st = r.get("status")
        if st != last:
            print(f"  [{time.time() - t0:6.2f}s] {st}", file=sys.stderr)
            last = st
        if st in ("completed", "failed", "cancelled"):
            break
        if time.time() - t0 > 1800:
            src.cmd("migrate_cancel")
            r = src.cmd("query-migrate")
            r["status"] = "timeout"
            break
        time.sleep(0.05)
    wall = time.time() - t0
    # QEMU 7.2 sets "completed" before it fills in total-time and downtime:
    # an answer read in between has both 0. Ask again until they are there.
    if r.get("status") == "completed":
        for _ in range(50):
            if r.get("total-time", 0) > 0:
                break
            time.sleep(0.1)
            r = src.cmd("query-migrate")
        time.sleep(0.2)
        r = src.cmd("query-migrate")
    # The destination resumes the guest once it has the whole state.
    dst_status = None
    for _ in range(200):
        dst_status = dst.cmd("query-status")
        if dst_status.get("status") == "running" and dst_run is None:
            dst_run = time.time() - t0
        if dst_status.get("status") == "running" or r.get("status") != "completed":
            break
        time.sleep(0.02)
    # The pause as the link sees it: the source's STOP event to the
    # destination's RESUME (both QEMUs on this host, one clock).
    def event_time(q, name):
        for e in q.events:
            if e.get("event") == name:
                t = e["timestamp"]
                return t["seconds"] + t["microseconds"] / 1e6
        return None
    stop_t, resume_t = event_time(src, "STOP"), event_time(dst, "RESUME")
    r["bench"] = {
        "stop_to_resume_ms": (resume_t - stop_t) * 1000 if stop_t and resume_t else None,
        "relay_bytes": relay.close() if relay else None,
        "max_bandwidth": bw,
        "downtime_limit_ms": downtime_ms,
        "multifd": multifd,
        "wall_s": wall,
        "dst_running_s": dst_run,
        "dst_status": dst_status,
        "src_status": src.cmd("query-status"),
        "src_params": src.cmd("query-migrate-parameters"),
        "src_caps": [c for c in src.cmd("query-migrate-capabilities") if c["state"]],
    }
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps({k: r.get(k) for k in ("status", "total-time", "downtime", "setup-time")}), file=sys.stderr)
    return 0 if r.get("status") == "completed" else 1


def qga_exec(path, timeout, script):
    """guest-exec through qemu-guest-agent's socket at PATH (retried until
    the agent answers, up to TIMEOUT seconds)."""
    deadline = time.time() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.settimeout(2)
            f = s.makefile("rwb")
            # QGA: a 0xFF byte and guest-sync-delimited before anything else.
            f.write(b"\xff")
            n = int(time.time() * 1000) % 1000000
            f.write(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": n}}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    raise OSError("closed")
                line = line.lstrip(b"\xff").strip()
                if line and json.loads(line).get("return") == n:
                    break
            break
        except (OSError, ValueError):
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    s.settimeout(None)

    def call(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        f.flush()
        r = json.loads(f.readline())
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']}")
        return r["return"]

    pid = call("guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True})["pid"]
    while True:
        r = call("guest-exec-status", pid=pid)
        if r.get("exited"):
            out = base64.b64decode(r.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(r.get("err-data", "")).decode(errors="replace")
            sys.stderr.write(err)
            return out, r.get("exitcode", 1)
        if time.time() > deadline:
            raise RuntimeError("guest-exec timed out")
        time.sleep(0.2)


def main():
    a = sys.argv[1:]
    if a[0] == "cmd":
        q = QMP(a[1])
        args = json.loads(a[3]) if len(a) > 3 else {}
        print(json.dumps(q.cmd(a[2], **args)))
        return 0
    if a[0] == "migrate":
        host = a[8] if len(a) > 8 else "127.0.0.1"
        return migrate(a[1], a[2], int(a[3]), int(a[4]), int(a[5]), a[6], a[7], host, len(a) > 9 and a[9] == "1")
    if a[0] == "qga":
        out, st = qga_exec(a[1], float(a[2]), a[3])
        sys.stdout.write(out)
        return st
    if a[0] in ("ctl", "ctlcmd"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(a[1])
        f = s.makefile("rwb")
        req = {"cmd": "exec", "script": a[3], "timeout_ms": int(float(a[2]) * 1000)} if a[0] == "ctl" else json.loads(a[2])
        f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        r = json.loads(f.readline())
        if a[0] == "ctlcmd":
            print(json.dumps(r))
            return 0 if r.get("ok") else 1
        if not r.get("ok"):
            print(json.dumps(r), file=sys.stderr)
            return 1
        sys.stdout.write(r.get("output", ""))
        return r.get("status", 1)
    raise SystemExit(__doc__)


sys.exit(main())
