"""The container image, built here and run from its own files.

deploy/image/build-local.sh builds the image with podman (the runtime stage of deploy/Dockerfile
around a rootfs made here by deploy/image/rootfs.sh: static musl binary, Debian CA bundle,
passwd/group) and exports its root filesystem. Containers cannot run on this machine, so each test
runs /wsgate from a copy of that filesystem under `chroot`, as user 65532:65532 with the image's own
environment, and nothing else: no bind mounts, no /proc, only an /etc/hosts written into the copy as
a container runtime does. Checked: --version, check-config (0, and 2 on a bad value), a WebSocket
session proxied to an echo upstream on the host's loopback, and a rediss:// fleet connection to a
local TLS redis-server named redis.wsgate.test, resolved through the copy's /etc/hosts and trusted
through the copy's CA bundle (with the test CA appended; without it, wsgate does not connect).

Skipped without podman (`apt-get install podman`; .ci/run runs these tests where it is installed)
and when not root (chroot needs root). The first test builds the musl release binary (minutes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import DEPLOY, ROOT, cargo_target_dir
from test_e2e_prometheus import REDIS_SERVER_BIN, free_port, metric_value, scrape, stop, wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed: the image is built with Debian's podman "
                              "(apt-get install podman); .ci/run runs these tests where it is present"),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
]

REDIS_HOST = "redis.wsgate.test"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
CA_BUNDLE = Path("etc/ssl/certs/ca-certificates.crt")
CARGO_VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
IMAGE = f"localhost/wsgate:{CARGO_VERSION}"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict[str, Any]:
    """Builds the image (build-local.sh) and exports its root filesystem; its config and paths."""
    rootfs = tmp_path_factory.mktemp("image") / "rootfs"
    env = {**os.environ, "CARGO_TARGET_DIR": str(cargo_target_dir()), "IMAGE": IMAGE}
    start = time.monotonic()
    build = subprocess.run(["bash", str(DEPLOY / "image" / "build-local.sh"), "--export", str(rootfs)],
                           env=env, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    print(build.stdout[-3000:], build.stderr[-3000:], sep="\n")
    assert build.returncode == 0, "build-local.sh failed"
    print(f"image built and exported in {time.monotonic() - start:.0f} s")
    inspect = subprocess.run(["podman", "image", "inspect", IMAGE], capture_output=True, text=True, check=True)
    (info,) = json.loads(inspect.stdout)
    return {"rootfs": rootfs, "info": info, "config": info["Config"]}


@pytest.fixture
def rootfs(image, tmp_path) -> Path:
    """A fresh copy of the image's root filesystem, with the /etc/hosts a container runtime writes
    (here naming the test Redis as well)."""
    root = tmp_path / "rootfs"
    shutil.copytree(image["rootfs"], root, symlinks=True)
    (root / "etc" / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.0.1\t{REDIS_HOST}\n")
    return root


def image_env(image: dict[str, Any], **extra: str) -> dict[str, str]:
    """The image's ENV (what a container runtime gives the process), plus `extra`."""
    env = dict(e.split("=", 1) for e in image["config"].get("Env", []))
    env.update(extra)
    return env


def in_image(image: dict[str, Any], root: Path, *args: str) -> list[str]:
    """The command line of the image's entrypoint with `args`, as its user, chrooted into `root`."""
    return [CHROOT, f"--userspec={image['config']['User']}", str(root), *image["config"]["Entrypoint"], *args]


def run_in_image(image, root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(in_image(image, root, *args), env=image_env(image, **env), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_the_image_is_the_static_binary_the_ca_bundle_and_passwd(image):
    cfg = image["config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["/wsgate"] and not cfg.get("Cmd")
    assert set(cfg["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    assert {"WSGATE_LISTEN=0.0.0.0:8080", "WSGATE_ADMIN_LISTEN=0.0.0.0:9090"} <= set(cfg["Env"])
    assert cfg.get("StopSignal") == "SIGTERM"
    root: Path = image["rootfs"]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert files == ["etc/group", "etc/passwd", str(CA_BUNDLE), "wsgate"], files
    assert not (root / "bin").exists(), "no shell"
    assert "nonroot:x:65532:65532:" in (root / "etc/passwd").read_text()
    assert "nonroot:x:65532:" in (root / "etc/group").read_text()
    bundle = (root / CA_BUNDLE).read_text()
    assert bundle.count("BEGIN CERTIFICATE") > 100, "Debian's CA bundle"
    # Only the package's certificates: none a machine added under /usr/local/share/ca-certificates
    # (this one's proxy CA, say) reaches the image.
    local = [p.read_text().strip() for p in Path("/usr/local/share/ca-certificates").rglob("*.crt")]
    assert not [c for c in local if c and c in bundle]
    binary = root / "wsgate"
    assert os.access(binary, os.X_OK)
    headers = subprocess.run(["readelf", "-lSdW", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "program interpreter" not in headers and "(NEEDED)" not in headers, "static"
    assert " .symtab " not in headers, "stripped"
    binary_size, image_size = binary.stat().st_size, image["info"]["Size"]
    print(f"binary {binary_size} bytes, image {image_size} bytes")
    assert binary_size < 20 * 2**20 and image_size < binary_size + 2 * 2**20, (binary_size, image_size)


def test_the_dockerfiles_build_context_holds_what_cargo_needs(tmp_path):
    """The context deploy/Dockerfile builds from (the repository less .dockerignore, read by podman
    the way Docker reads it) holds every tracked file cargo and rootfs.sh need, and not target/."""
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("FROM scratch\nCOPY . /ctx/\n")
    tag = "localhost/wsgate-context-check:test"
    subprocess.run(["podman", "build", "--quiet", "--network=none", "-f", str(containerfile), "-t", tag, str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    try:
        container = subprocess.run(["podman", "create", tag, "/none"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        try:
            listing = subprocess.run(f"podman export {container} | tar -t", shell=True, check=True,
                                     capture_output=True, text=True).stdout
        finally:
            subprocess.run(["podman", "rm", container], capture_output=True)
    finally:
        subprocess.run(["podman", "rmi", tag], capture_output=True)
    context = {n.removeprefix("ctx/") for n in listing.split() if n.startswith("ctx/") and not n.endswith("/")}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    needed = {f for f in tracked if f in ("Cargo.toml", "Cargo.lock")
              or (f.startswith(("src/", "tests/", "benches/wsgate-bench/", "deploy/image/")) and not f.endswith(".md"))}
    assert "src/target/mod.rs" in needed and "deploy/image/rootfs.sh" in needed
    assert not needed - context, sorted(needed - context)
    assert not [f for f in context if f.startswith(("target/", ".git/", "deploy/helm/", ".ci/"))]


def test_version_is_cargos(image, rootfs):
    out = run_in_image(image, rootfs, "--version")
    assert out.returncode == 0, out
    assert out.stdout.split() == ["wsgate", CARGO_VERSION], out.stdout


def test_check_config_accepts_the_image_defaults_and_refuses_a_bad_value(image, rootfs):
    upstream = "127.0.0.1:3000"  # the one key without a default
    ok = run_in_image(image, rootfs, "check-config", WSGATE_UPSTREAM=upstream)
    assert ok.returncode == 0, ok
    printed = tomllib.loads(ok.stdout)
    assert printed["listen"] == "0.0.0.0:8080" and printed["admin_listen"] == "0.0.0.0:9090", printed
    assert printed["upstream"] == upstream, printed
    bad = run_in_image(image, rootfs, "check-config", WSGATE_UPSTREAM=upstream, WSGATE_MAX_CLIENTS="lots")
    assert bad.returncode == 2, bad
    assert "max_clients" in bad.stderr and "WSGATE_MAX_CLIENTS" in bad.stderr, bad.stderr


class EchoUpstream:
    """A WebSocket echo server (Python websockets) on the host's loopback, in a thread."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        def echo(ws) -> None:
            for message in ws:
                ws.send(message)

        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture
def echo() -> Iterator[EchoUpstream]:
    upstream = EchoUpstream()
    yield upstream
    upstream.close()


class Gate:
    """wsgate from the image, chrooted, on free loopback ports, with its log in a file."""

    def __init__(self, image, root: Path, log: Path, **env: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.admin = f"127.0.0.1:{self.admin_port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                in_image(image, root),
                env=image_env(image, WSGATE_LISTEN=f"127.0.0.1:{self.port}", WSGATE_ADMIN_LISTEN=self.admin,
                              **env),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready(self) -> None:
        import requests

        def up() -> bool:
            assert self.proc.poll() is None, f"wsgate exited: {self.log.read_text()}"
            return requests.get(f"http://{self.admin}/readyz", timeout=2).status_code == 200

        wait_until(up, 30, "wsgate in the image to be ready")

    def metrics(self) -> str:
        return scrape(self.admin)

    def stop(self) -> int | None:
        return stop(self.proc)


def echo_once(port: int, text: str) -> str:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/chat", open_timeout=10, close_timeout=5) as ws:
        ws.send(text)
        return ws.recv(timeout=10)


def test_a_websocket_session_through_the_image(image, rootfs, echo, tmp_path):
    gate = Gate(image, rootfs, tmp_path / "wsgate.log", WSGATE_UPSTREAM=f"127.0.0.1:{echo.port}",
                WSGATE_MAX_CLIENTS="10")
    try:
        gate.ready()
        assert echo_once(gate.port, "hello through the image") == "hello through the image"

        def ended() -> str | None:
            text = gate.metrics()
            return text if metric_value(text, "wsgate_connections_active") == 0 else None

        text = wait_until(ended, 10, "the session to end")
        assert metric_value(text, "wsgate_connections_admitted_total") == 1, text
    finally:
        assert gate.stop() == 0, gate.log.read_text()


# ---------------------------------------------------------------- rediss:// through the image's files

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A test CA, a certificate for redis.wsgate.test signed by it, and a redis-server serving TLS
    with it on a free loopback port (plain port off), checked with Python's TLS client."""
    assert Path(REDIS_SERVER_BIN).exists(), f"no redis-server at {REDIS_SERVER_BIN}: run deploy/tests/run.sh"
    d = tmp_path_factory.mktemp("tls-redis")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=wsgate test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    openssl("req", *ec, "-keyout", "redis.key", "-out", "redis.csr", "-subj", f"/CN={REDIS_HOST}", cwd=d)
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{REDIS_HOST}\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "redis.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    client = ssl.create_default_context(cafile=str(d / "ca.crt"))

    def pong(port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with client.wrap_socket(raw, server_hostname=REDIS_HOST) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")

    last = ""
    for attempt in range(3):  # the free port could be taken between bind and listen
        port = free_port()
        log = d / f"redis-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [REDIS_SERVER_BIN, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(d / "redis.crt"), "--tls-key-file", str(d / "redis.key"),
                 "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
                 "--save", "", "--appendonly", "no", "--dir", str(d), "--daemonize", "no"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("redis-server exited")
            return pong(port)

        try:
            wait_until(up, 20, "redis-server to answer PING over TLS for redis.wsgate.test")
            break
        except (AssertionError, RuntimeError):
            stop(proc)
            last = log.read_text()
    else:
        raise AssertionError(f"redis-server with TLS did not start: {last}")
    try:
        yield {"port": port, "ca": (d / "ca.crt").read_text()}
    finally:
        stop(proc)


def fleet_gate(image, root: Path, echo: EchoUpstream, redis: dict[str, Any], log: Path) -> Gate:
    """wsgate with fleet limits (docs/configuration.md: fleet_redis_url and fleet_max_clients)
    against the TLS Redis by its host name, its debug lines in the log."""
    return Gate(image, root, log, WSGATE_UPSTREAM=f"127.0.0.1:{echo.port}",
                WSGATE_FLEET_REDIS_URL=f"rediss://{REDIS_HOST}:{redis['port']}",
                WSGATE_FLEET_MAX_CLIENTS="10", WSGATE_FLEET_NAMESPACE="image-test",
                WSGATE_FLEET_INSTANCE_ID="image-test-1", RUST_LOG="info,wsgate=debug")


def test_rediss_fleet_through_the_images_hosts_and_ca_bundle(image, rootfs, echo, tls_redis, tmp_path):
    with open(rootfs / CA_BUNDLE, "a") as bundle:
        bundle.write(tls_redis["ca"])
    gate = fleet_gate(image, rootfs, echo, tls_redis, tmp_path / "wsgate.log")
    try:
        gate.ready()
        wait_until(lambda: metric_value(gate.metrics(), "wsgate_fleet_up") == 1, 20,
                   "wsgate_fleet_up 1 (connected to redis.wsgate.test over TLS)")
        assert echo_once(gate.port, "fleet") == "fleet"
        text = gate.metrics()
        assert metric_value(text, "wsgate_fleet_max") == 10, text
        assert (metric_value(text, "wsgate_fleet_requests_total", 'op="admit",result="ok"') or 0) >= 1, text
        assert metric_value(text, "wsgate_fleet_up") == 1, text
    finally:
        assert gate.stop() == 0, gate.log.read_text()


def test_rediss_without_the_test_ca_in_the_bundle_does_not_connect(image, rootfs, echo, tls_redis, tmp_path):
    gate = fleet_gate(image, rootfs, echo, tls_redis, tmp_path / "wsgate.log")
    try:
        gate.ready()
        cause = wait_until(lambda: re.search(r"fleet: Redis unreachable: .*(?i:certificate|issuer).*",
                                             gate.log.read_text()), 20,
                           "wsgate to say the Redis certificate is not trusted")
        print(cause.group(0))
        time.sleep(1)
        text = gate.metrics()
        assert metric_value(text, "wsgate_fleet_up") == 0, text
        assert metric_value(text, "wsgate_fleet_requests_total", 'op="renew",result="ok"') in (None, 0), text
    finally:
        assert gate.stop() == 0, gate.log.read_text()
