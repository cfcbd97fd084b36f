"""What the fleet benchmarks share (benches/fleet-*.py): paths, a free loopback port, reading an
address from a wsgate log, and a minimal RESP client for Redis (stdlib only: the benchmarks need no
venv)."""
import contextlib
import os
import re
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WSGATE = os.environ.get("BENCH_WSGATE_BIN", os.path.join(ROOT, "target/release/wsgate"))
BENCH = os.path.join(ROOT, "benches/wsgate-bench/target/release/wsgate-bench")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(path, pattern, proc, timeout=10.0):
    """The addr= value of the first line of `path` matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    line = ANSI.sub("", line)
                    if pattern in line:
                        m = re.search(r"addr=([0-9.:]+)", line)
                        if m:
                            return m.group(1)
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("no %r in %s" % (pattern, path))


def stop_processes(procs):
    """Stops subprocesses by PID, newest first: SIGTERM, then SIGKILL after 5 s; each reaped."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def report_warnings(work, log):
    """Passes to `log` every WARN or ERROR line of the `*.err` logs in `work`."""
    for f in sorted(os.listdir(work)):
        if f.endswith(".err"):
            for line in open(os.path.join(work, f), errors="replace"):
                line = ANSI.sub("", line)
                if " WARN " in line or " ERROR " in line:
                    log("%s: %s" % (f, line.rstrip()))


def encode(*args):
    """One RESP command."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Resp:
    """A Redis connection speaking RESP2: call, pipeline, replies decoded (integers as int)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def call(self, *args):
        self.s.sendall(encode(*args))
        return self.read()

    def pipeline(self, cmds):
        self.s.sendall(b"".join(encode(*c) for c in cmds))
        return [self.read() for _ in cmds]

    def read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        return [self.read() for _ in range(int(rest))]


@contextlib.contextmanager
def private_redis():
    """A redis-server of its own on a free loopback port, without persistence; yields a connected
    Resp client and stops the server by PID on the way out (errors and Ctrl-C included)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", d],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    c = Resp(port)
                    c.call("PING")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield c
        finally:
            redis.kill()
            redis.wait()
