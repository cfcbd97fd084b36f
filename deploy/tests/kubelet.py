"""A kubelet stand-in: runs a rendered pod spec as local processes, in the order the kubelet documents.

Used by test_pod_lifecycle.py to prove what a pod deletion does in each layout the chart renders
(docs/operations.md#pod-deletion). What it follows (Kubernetes docs: "Pod Lifecycle", "Sidecar
Containers", "Container Lifecycle Hooks"):

Start-up
  - init containers one by one, in order. A restartable one (`restartPolicy: Always`, a native
    sidecar) keeps running; the next one starts once it has *started* (its startupProbe succeeded,
    or at once without one). A plain init container must exit 0 first.
  - then every regular container, without waiting for each other.
  - readiness probes run for the pod's whole life, deletion included; the pod is Ready when every
    container (sidecars included) that has a readiness probe passes it.

Deletion, with grace period T = terminationGracePeriodSeconds counted from the deletion:
  - every regular container at once: its preStop hook (`sleep`, `httpGet`, `exec`), then its stop
    signal (SIGTERM); the hook's time counts against T.
  - once every regular container has exited: the native sidecars, in reverse order of definition,
    each the same way (preStop, then SIGTERM), each waiting for the one before.
  - at T, SIGKILL to whatever still runs (a container whose turn comes after T still gets the
    kubelet's minimum of 2 s).

A container is a process: `launcher(container)` says which argv stands in for its image. `env`
`value`s are passed as they are, `valueFrom.fieldRef` of the pod's name, namespace and IPs are
resolved (the pod's IP is 127.0.0.1: every container shares this host's network namespace, as
containers of a pod share theirs). Volumes are directories under `workdir`, and env values naming a
mount path are rewritten to them. Every step is recorded as an `Event` on one monotonic clock, so
a test can compare it with what its clients saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# The kubelet gives a container at least this long between its stop signal and SIGKILL.
MINIMUM_GRACE = 2.0


@dataclass
class Event:
    at: float  # time.monotonic()
    container: str
    what: str  # "started", "ready", "prestop-start", "prestop-end", "SIGTERM", "exited", "SIGKILL", ...
    detail: str = ""


@dataclass
class Container:
    spec: dict[str, Any]
    sidecar: bool  # a restartable init container
    proc: subprocess.Popen | None = None
    log: Path | None = None
    ready: bool = False
    killed: bool = False

    @property
    def name(self) -> str:
        return self.spec["name"]


@dataclass
class Pod:
    spec: dict[str, Any]
    launcher: Callable[[dict[str, Any]], list[str]]
    workdir: Path
    name: str = "pod-0"
    namespace: str = "default"
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop_probes = threading.Event()
        self.init = [Container(c, c.get("restartPolicy") == "Always") for c in self.spec.get("initContainers") or []]
        self.regular = [Container(c, False) for c in self.spec["containers"]]
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))

    # ------------------------------------------------------------------ record

    def record(self, container: str, what: str, detail: str = "") -> None:
        with self._lock:
            self.events.append(Event(time.monotonic(), container, what, detail))

    def first(self, container: str, what: str) -> Event | None:
        with self._lock:
            return next((e for e in self.events if e.container == container and e.what == what), None)

    def of(self, what: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.what == what]

    def logs(self, name: str) -> str:
        c = next(c for c in self.init + self.regular if c.name == name)
        return c.log.read_text(errors="replace") if c.log and c.log.exists() else ""

    # ------------------------------------------------------------------ start-up

    def start(self, timeout: float = 30.0) -> None:
        """Starts the pod as the kubelet does and returns once it is Ready."""
        deadline = time.monotonic() + timeout
        for c in self.init:
            self._launch(c)
            if c.sidecar:
                self._wait_started(c, deadline)
                self._probe_in_background(c)
            else:
                code = c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                self.record(c.name, "exited", str(code))
                assert code == 0, f"init container {c.name} exited {code}:\n{self.logs(c.name)}"
        for c in self.regular:
            self._launch(c)
        for c in self.regular:
            self._wait_started(c, deadline)
            self._probe_in_background(c)
        running = [c for c in self.init if c.sidecar] + self.regular
        while not all(c.ready for c in running):
            for c in running:
                if c.proc and c.proc.poll() is not None:
                    raise AssertionError(f"{c.name} exited {c.proc.returncode} during start-up:\n{self.logs(c.name)}")
            assert time.monotonic() < deadline, f"pod not Ready in {timeout} s: {[(c.name, c.ready) for c in running]}"
            time.sleep(0.05)
        self.record("pod", "ready")

    def _launch(self, c: Container) -> None:
        argv = self.launcher(c.spec)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_") and k != "RUST_LOG"}
        env.update(self._env(c.spec))
        c.log = self.workdir / f"{c.name}.log"
        out = c.log.open("wb")
        # A process group of its own: the signals go to the container's processes only.
        c.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        out.close()
        self.record(c.name, "started", " ".join(argv))

    def _env(self, spec: dict[str, Any]) -> dict[str, str]:
        mounts = self._mounts(spec)
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "status.podIP": "127.0.0.1",
                  "status.podIPs": "127.0.0.1", "status.hostIP": "127.0.0.1", "spec.nodeName": "node-0"}
        out = {}
        for e in spec.get("env") or []:
            if "value" in e:
                value = str(e["value"])
            elif "fieldRef" in (e.get("valueFrom") or {}):
                value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise AssertionError(f"{spec['name']}: env {e['name']} needs {e.get('valueFrom')}, which this kubelet cannot resolve")
            for mount_path, host in mounts.items():
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    value = str(host) + value[len(mount_path.rstrip("/")):]
            out[e["name"]] = value
        return out

    def _mounts(self, spec: dict[str, Any]) -> dict[str, Path]:
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        out = {}
        for m in spec.get("volumeMounts") or []:
            host = self.workdir / "volumes" / m["name"]
            if not host.exists():
                host.mkdir(parents=True)
                cm = (volumes.get(m["name"]) or {}).get("configMap")
                if cm:
                    for key, text in self.config_maps.get(cm["name"], {}).items():
                        (host / key).write_text(text)
            out[m["mountPath"]] = host
        return out

    # ------------------------------------------------------------------ probes and hooks

    def _port(self, spec: dict[str, Any], port: Any) -> int:
        if isinstance(port, int):
            return port
        return next(p["containerPort"] for p in spec.get("ports") or [] if p.get("name") == port)

    def _http_get(self, spec: dict[str, Any], action: dict[str, Any], timeout: float) -> bool:
        url = f"http://127.0.0.1:{self._port(spec, action['port'])}{action.get('path', '/')}"
        headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=max(timeout, 0.05)) as r:
                return 200 <= r.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _probe_once(self, spec: dict[str, Any], probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            return self._http_get(spec, probe["httpGet"], timeout)
        raise AssertionError(f"{spec['name']}: probe kind {sorted(probe)} not run by this kubelet")

    def _wait_started(self, c: Container, deadline: float) -> None:
        probe = c.spec.get("startupProbe")
        if probe:
            period = float(probe.get("periodSeconds", 10))
            failures = 0
            time.sleep(float(probe.get("initialDelaySeconds", 0)))
            while not self._probe_once(c.spec, probe):
                failures += 1
                assert failures < int(probe.get("failureThreshold", 3)), f"{c.name}: startup probe failed:\n{self.logs(c.name)}"
                assert time.monotonic() < deadline, f"{c.name} never started"
                # Faster than the probe period, to keep the test short; what counts is the order.
                time.sleep(min(period, 0.1))
        self.record(c.name, "container-started")

    def _probe_in_background(self, c: Container) -> None:
        probe = c.spec.get("readinessProbe")
        if not probe:
            c.ready = True
            self.record(c.name, "ready")
            return

        def loop() -> None:
            period = float(probe.get("periodSeconds", 10))
            ok_needed = int(probe.get("successThreshold", 1))
            fail_needed = int(probe.get("failureThreshold", 3))
            oks = fails = 0
            time.sleep(float(probe.get("initialDelaySeconds", 0)))
            while not self._stop_probes.is_set() and c.proc and c.proc.poll() is None:
                if self._probe_once(c.spec, probe):
                    oks, fails = oks + 1, 0
                    if not c.ready and oks >= ok_needed:
                        c.ready = True
                        self.record(c.name, "ready")
                else:
                    oks, fails = 0, fails + 1
                    if c.ready and fails >= fail_needed:
                        c.ready = False
                        self.record(c.name, "not-ready")
                # Before the pod is Ready the kubelet probes as often as it may; after, every period.
                self._stop_probes.wait(period if c.ready else 0.1)

        threading.Thread(target=loop, daemon=True, name=f"probe-{c.name}").start()

    def _pre_stop(self, c: Container, deadline: float) -> None:
        hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
        if not hook:
            return
        self.record(c.name, "prestop-start", next(iter(hook)))
        remaining = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"]["seconds"]), remaining()))
        elif "httpGet" in hook:
            self._http_get(c.spec, hook["httpGet"], remaining())
        elif "exec" in hook:
            argv = self.launcher({**c.spec, "command": hook["exec"]["command"], "args": []})
            try:
                subprocess.run(argv, env={**os.environ, **self._env(c.spec)}, timeout=remaining(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            except subprocess.TimeoutExpired:
                pass
        else:
            raise AssertionError(f"{c.name}: preStop {sorted(hook)} not run by this kubelet")
        self.record(c.name, "prestop-end")

    # ------------------------------------------------------------------ deletion

    def _stop(self, c: Container, deadline: float) -> None:
        """preStop, the stop signal, then wait; SIGKILL at the deadline (at least MINIMUM_GRACE after the signal)."""
        if c.proc is None or c.proc.poll() is not None:
            return
        self._pre_stop(c, deadline)
        if c.proc.poll() is None:
            self.record(c.name, "SIGTERM")
            os.killpg(c.proc.pid, signal.SIGTERM)
        kill_at = max(deadline, time.monotonic() + MINIMUM_GRACE) if time.monotonic() >= deadline else deadline
        try:
            c.proc.wait(timeout=max(0.0, kill_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.killed = True
            self.record(c.name, "SIGKILL")
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
        self.record(c.name, "exited", str(c.proc.returncode))

    def delete(self) -> None:
        """Deletes the pod the way the kubelet terminates it; returns once every container has ended."""
        t0 = time.monotonic()
        self.record("pod", "deleted")
        deadline = t0 + self.grace
        threads = [threading.Thread(target=self._stop, args=(c, deadline), name=f"stop-{c.name}") for c in self.regular]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in reversed([c for c in self.init if c.sidecar]):
            self._stop(c, deadline)
        self._stop_probes.set()
        self.record("pod", "gone")

    def kill_all(self) -> None:
        """Clean-up after a failed test: SIGKILL whatever of this pod still runs."""
        self._stop_probes.set()
        for c in self.init + self.regular:
            if c.proc and c.proc.poll() is None:
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
