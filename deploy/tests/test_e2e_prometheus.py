"""End to end: a real Prometheus server scrapes a running `wsgate demo` while the test holds known
WebSocket connections; every PromQL expression of the dashboard, the alert rules and the
prometheus-adapter rule is then evaluated through Prometheus' HTTP API.

Set-up (module scope): wsgate demo with cap 4 on ephemeral loopback ports (read from its stdout),
Prometheus on an ephemeral loopback port scraping it every second with static `namespace` and
`pod` labels and the job `e2e/wsgate` (as the PodMonitor of deploy/kubernetes/podmonitor.yaml would
attach them) and loading deploy/prometheus/wsgate-alerts.yaml, plus the chart's
WsgateRejectingConnections alone at thresholds this small state reaches (LOW_REJECTING).
A second demo without a cap (max_clients = 0, pod label wsgate-e2e-unlimited) holds one
connection, to check that unlimited pods are shown sensibly. The test fills the cap with 4 echo
connections, gets 3 upgrades refused with 503, closes 2, and waits until Prometheus sees 2
active. The last test sends SIGTERM and watches readiness fall.

Fleet-wide limits (docs/operations.md#fleet-wide-limits): a private redis-server on an ephemeral loopback port (no
persistence) and a third demo (pod label wsgate-e2e-fleet, local cap 10) with fleet_max_clients 3
and fleet_fail_mode closed. It holds 3 connections and gets 1 upgrade refused (503, reason
fleet). The dashboard's "Fleet limits (Redis)" row is checked against that state; a later test
kills Redis (SIGKILL) and checks wsgate_fleet_up, the WsgateFleetRedisDown alert, the
fleet_unavailable refusals and that the held connections still echo.

Message guards (docs/operations.md#message-guards): the unlimited demo runs with every guard but the rate close (GUARDS_ENV);
its one held connection stays far below them. A later test sends it a message over the size limit
(Close 1009), a burst of messages over the message rate and a burst of bytes over the byte rate
(both throttled, delivered in order), and checks the dashboard's "Message guards" row against that;
the other pods, without guards, show every guard series at 0.

Session telemetry (docs/operations.md#access-log): the capped demo logs as JSON (WSGATE_LOG_FORMAT=json). The two
connections the set-up closes (client Close 1000) must show up as two access-log records with
end client_close, in wsgate_sessions_ended_total and wsgate_close_codes_total as Prometheus scrapes
them, and in the dashboard's "Sessions" row; the 3 refusals as one refusal summary line. The
README's jq examples are run over that real log. The unlimited demo has an admin token: a late test
drains its held connection with POST /drain (Close 1001) and finds it in the metrics and the row.

Only processes started here are stopped, by PID.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml

from conftest import (
    ACCESS_LOG_FIELDS,
    CLOSE_CODES,
    CLOSE_CODES_AT_START,
    CLOSED_BY,
    END_CAUSES,
    KUBE_DIR,
    PROMETHEUS_BIN,
    ROOT,
    RULES_FILE,
    SESSIONS_ENDED_AT_START,
    WSGATE_BIN,
    all_panels,
    dashboard,
    load_yaml_docs,
)

NAMESPACE = "e2e"
POD = "wsgate-e2e-0"
# A second wsgate without a cap (max_clients = 0), holding one connection: it must never look
# saturated, and must be counted as unlimited.
POD_UNLIMITED = "wsgate-e2e-unlimited"
CAP = 4
HELD_AT_END = 2
REJECTED = 3
# A third wsgate with fleet-wide limits through a private Redis (docs/operations.md#fleet-wide-limits): fleet_max_clients 3,
# fail mode closed, a local cap above the fleet cap (3 / 10 = 0.3: below every saturation
# threshold the tests use), holding 3 connections and refusing 1 upgrade with reason fleet.
POD_FLEET = "wsgate-e2e-fleet"
FLEET_MAX = 3
FLEET_LOCAL_CAP = 10
FLEET_HELD = 3
FLEET_REJECTED = 1
REDIS_SERVER_BIN = (os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
                    or "/usr/bin/redis-server")
# The dashboard row of docs/operations.md#fleet-wide-limits, and its panels that read wsgate_fleet_* series (which only pods
# with a Redis URL have).
FLEET_ROW = "Fleet limits (Redis)"
FLEET_SERIES_PANELS = ("Fleet active vs fleet limit", "Redis up per pod", "Redis round-trip latency p50 / p99 by op",
                       "Fleet requests per second by op and result")

# The message guards of the unlimited pod (docs/operations.md#message-guards): size 1 KiB; 20 messages/s after 5, throttled;
# 4 KiB/s after 2 KiB, throttled. Its held connection sends one 9-byte message (and a ping per 20 s).
GUARDS_ENV = {"WSGATE_MAX_MESSAGE_SIZE": "1024", "WSGATE_MESSAGE_RATE": "20", "WSGATE_MESSAGE_BURST": "5",
              "WSGATE_MESSAGE_RATE_ACTION": "throttle", "WSGATE_BYTE_RATE": "4096", "WSGATE_BYTE_BURST": "2048"}
GUARD_PAIRS = {("size", "close"), ("rate", "close"), ("rate", "throttle"), ("bytes", "throttle")}
GUARDS_ROW = "Message guards"
SESSIONS_ROW = "Sessions"
# The capped pod logs as JSON, so its access-log records can be parsed (and the README's jq run on them).
CAPPED_ENV = {"WSGATE_LOG_FORMAT": "json"}
# The unlimited pod has an admin token (docs/operations.md#access-log), so a late test can drain its held connection.
ADMIN_TOKEN = "e2e-admin-token"

PROXY_RE = re.compile(r"^\s*proxy\s+ws://(\S+?)/")
METRICS_RE = re.compile(r"^\s*metrics\s+http://(\S+?)/metrics")

# Grafana's variables, as the dashboard would send them: one pod selected, or "All" (regex .*).
SUBSTITUTIONS = {
    "selected": {"$namespace": NAMESPACE, "$pod": POD},
    "all": {"$namespace": ".*", "$pod": ".*"},
    "fleet": {"$namespace": NAMESPACE, "$pod": POD_FLEET},
}
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def substitute(expr: str, variant: str) -> str:
    out = expr
    for k, v in {**GRAFANA_INTERVALS, **SUBSTITUTIONS[variant]}.items():
        out = out.replace(k, v)
    assert "$" not in out, f"unsubstituted variable left in {out!r}"
    return out


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_err = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_err!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> int | None:
    """SIGTERM the process we started (by PID), then SIGKILL if it does not exit in time."""
    if proc is None:
        return None
    try:
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str) -> dict[str, Any]:
        r = requests.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {r.status_code} {body}"
        return body["data"]

    def scalar(self, expr: str) -> float | None:
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return float(data["result"][1])
        res = data["result"]
        if not res:
            return None
        assert len(res) == 1, f"{expr!r}: expected one series, got {res}"
        return float(res[0]["value"][1])

    def get(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.base}{path}", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]


def start_wsgate(tmp: Path, cap: int = CAP, name: str = "wsgate",
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WSGATE_", "WS_MAX_CLIENTS"))}
    env.update({
        "WSGATE_MAX_CLIENTS": str(cap),
        "WSGATE_LISTEN": "127.0.0.1:0",
        "WSGATE_ADMIN_LISTEN": "127.0.0.1:0",
        "WSGATE_SHUTDOWN_GRACE": "10s",
        **(extra_env or {}),
    })
    with open(tmp / f"{name}.stderr", "wb") as stderr:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(WSGATE_BIN), "demo"], stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=env, text=True, bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    proxy = metrics = None
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while (proxy is None or metrics is None) and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if m := PROXY_RE.match(line):
            proxy = m.group(1)
        if m := METRICS_RE.match(line):
            metrics = m.group(1)
    if proxy is None or metrics is None:
        stop(proc)
        raise AssertionError(f"wsgate demo did not print its addresses; stdout={seen!r} "
                             f"stderr={(tmp / f'{name}.stderr').read_text(errors='replace')[-2000:]!r}")
    return proc, proxy, metrics


def redis_ping(port: int) -> bool:
    """One PING in RESP over a fresh connection; True on +PONG."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    """A private redis-server on an ephemeral loopback port, without persistence."""
    assert Path(REDIS_SERVER_BIN).exists(), f"no redis-server at {REDIS_SERVER_BIN}: run deploy/tests/run.sh"
    data = tmp / "redis"
    data.mkdir()
    last = ""
    for attempt in range(3):  # the ephemeral port could be taken between bind and listen
        port = free_port()
        log = tmp / f"redis-{attempt}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [REDIS_SERVER_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(data), "--daemonize", "no"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def pong() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("exited")
            return redis_ping(port)

        try:
            wait_until(pong, 20, "redis-server to answer PING")
            return proc, port
        except AssertionError:
            stop(proc, 10)
            last = log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"redis-server did not start: {last}")


# The chart's prometheusRule with every alert off but WsgateRejectingConnections, at thresholds the
# set-up's few refusals reach (the defaults need 10 refusals and 5 % of a pod's upgrades): so a real
# Prometheus shows the alert pending for the refusing pods. Loaded beside the rule file.
LOW_REJECTING = {"prometheusRule": {
    "enabled": True, "rejecting": {"threshold": 0.2, "minRefusals": 1},
    **{k: {"enabled": False} for k in ("saturation", "upstreamErrors", "notReady", "keyPinned", "fleetRedisDown",
                                       "abnormalCloses", "configReloadFailed", "descriptorsNearLimit",
                                       "targetMissing")}}}


def start_prometheus(tmp: Path, targets: dict[str, str],
                     extra_rule_files: list[Path] = ()) -> tuple[subprocess.Popen, Prom]:
    """targets: admin address -> pod label."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE), *map(str, extra_rule_files)],
        "scrape_configs": [{
            # As the PodMonitor `wsgate` of namespace e2e labels its targets (the rule file's
            # WsgateTargetMissing watches job=~".+/wsgate").
            "job_name": f"{NAMESPACE}/wsgate",
            "static_configs": [{"targets": [addr], "labels": {"namespace": NAMESPACE, "pod": pod}}
                               for addr, pod in targets.items()],
        }],
    }
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    last = ""
    for attempt in range(3):  # the ephemeral port could be taken between bind and listen
        port = free_port()
        log = tmp / f"prometheus-{attempt}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [PROMETHEUS_BIN, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / f'tsdb-{attempt}'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("exited")
            return requests.get(f"{base}/-/ready", timeout=2).status_code == 200

        try:
            wait_until(ready, 60, "Prometheus /-/ready")
            return proc, Prom(base)
        except AssertionError:
            stop(proc, 10)
            last = log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"Prometheus did not start: {last}")


def connect(proxy: str):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://{proxy}/", open_timeout=10, close_timeout=5)


def scrape(admin: str) -> str:
    r = requests.get(f"http://{admin}/metrics", timeout=5)
    r.raise_for_status()
    return r.text


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    pat = re.compile(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''}\s+(\S+)$", re.M)
    m = pat.search(text)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory, render):
    if not WSGATE_BIN.exists():
        pytest.skip(f"wsgate binary not built at {WSGATE_BIN} (run `cargo build` or set WSGATE_BIN)")
    assert Path(PROMETHEUS_BIN).exists(), f"no Prometheus at {PROMETHEUS_BIN}: run deploy/tests/run.sh"
    from websockets.exceptions import InvalidStatus

    tmp = tmp_path_factory.mktemp("e2e")
    wsgate = unlimited = fleet = redis = prom_proc = None
    held: list[Any] = []
    # Every client connection is entered as a context manager, so each is closed on the way out.
    conns = contextlib.ExitStack()
    try:
        wsgate, proxy, admin = start_wsgate(tmp, extra_env=CAPPED_ENV)
        wait_until(lambda: metric_value(scrape(admin), "wsgate_connections_max") == CAP, 20,
                   "wsgate /metrics with wsgate_connections_max 4")
        (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
        unlimited, proxy_u, admin_u = start_wsgate(tmp, cap=0, name="wsgate-unlimited", extra_env={
            **GUARDS_ENV, "WSGATE_ADMIN_TOKEN_FILE": str(tmp / "admin-token")})
        redis, redis_port = start_redis(tmp)
        fleet, proxy_f, admin_f = start_wsgate(tmp, cap=FLEET_LOCAL_CAP, name="wsgate-fleet", extra_env={
            "WSGATE_FLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}",
            "WSGATE_FLEET_MAX_CLIENTS": str(FLEET_MAX),
            "WSGATE_FLEET_FAIL_MODE": "closed",
        })
        wait_until(lambda: metric_value(scrape(admin_f), "wsgate_fleet_up") == 1, 20,
                   "the fleet pod to reach Redis (wsgate_fleet_up 1 on /metrics)")
        low = tmp / "chart-low-rejecting.yaml"
        low.write_text(yaml.safe_dump(render(LOW_REJECTING).one("PrometheusRule")["spec"]))
        prom_proc, prom = start_prometheus(tmp, {admin: POD, admin_u: POD_UNLIMITED, admin_f: POD_FLEET}, [low])
        sel = f'{{namespace="{NAMESPACE}", pod="{POD}"}}'
        # Let Prometheus see the counters at 0 before anything happens.
        wait_until(lambda: prom.scalar(f'up{sel}') == 1.0, 60, "first successful scrape (up == 1)")
        wait_until(lambda: (prom.scalar(f"count_over_time(wsgate_connections_active{sel}[1m])") or 0) >= 2,
                   30, "two samples before the connections")

        wait_until(lambda: prom.scalar(f'up{{pod="{POD_UNLIMITED}"}}') == 1.0, 30, "unlimited pod scraped")
        # The fleet pod's counters and histogram must be seen at 0 before its admissions, so
        # that rate() and increase() hold them.
        sel_f = f'{{namespace="{NAMESPACE}", pod="{POD_FLEET}"}}'
        wait_until(lambda: (prom.scalar(f"count_over_time(wsgate_fleet_up{sel_f}[1m])") or 0) >= 2,
                   30, "two samples of the fleet pod before its connections")
        held_fleet = []
        for i in range(FLEET_HELD):
            ws = conns.enter_context(connect(proxy_f))
            held_fleet.append(ws)
            ws.send(f"fleet {i}")
            assert ws.recv(timeout=10) == f"fleet {i}", "the demo upstream echoes through the fleet pod"
        fleet_refusals = []
        for _ in range(FLEET_REJECTED):
            with pytest.raises(InvalidStatus) as err:
                with connect(proxy_f):
                    pass
            fleet_refusals.append(err.value.response)
        ws_u = conns.enter_context(connect(proxy_u))
        ws_u.send("unlimited")
        assert ws_u.recv(timeout=10) == "unlimited"
        for i in range(CAP):
            ws = conns.enter_context(connect(proxy))
            held.append(ws)
            ws.send(f"hello {i}")
            assert ws.recv(timeout=10) == f"hello {i}", "the demo upstream echoes"
        refusals = []
        for _ in range(REJECTED):
            with pytest.raises(InvalidStatus) as err:
                with connect(proxy):
                    pass
            refusals.append(err.value.response)
        for ws in held[: CAP - HELD_AT_END]:
            ws.close()
        held = held[CAP - HELD_AT_END:]

        wait_until(lambda: metric_value(scrape(admin), "wsgate_connections_active") == HELD_AT_END, 10,
                   "wsgate_connections_active == 2 on /metrics")
        wait_until(lambda: prom.scalar(f"wsgate_connections_active{sel}") == HELD_AT_END, 30,
                   "Prometheus to see 2 active")
        wait_until(lambda: prom.scalar(f'wsgate_connections_active{{pod="{POD_UNLIMITED}"}}') == 1, 30,
                   "Prometheus to see 1 active on the unlimited pod")
        wait_until(lambda: prom.scalar(f'wsgate_connections_rejected_total{{namespace="{NAMESPACE}", pod="{POD}", reason="capacity"}}') == REJECTED,
                   30, "Prometheus to see 3 capacity rejections")
        wait_until(lambda: prom.scalar(f"wsgate_fleet_active{sel_f}") == FLEET_HELD, 30,
                   "Prometheus to see fleet active 3 on the fleet pod")
        wait_until(lambda: prom.scalar(f'wsgate_connections_rejected_total{{namespace="{NAMESPACE}", pod="{POD_FLEET}", reason="fleet"}}') == FLEET_REJECTED,
                   30, "Prometheus to see 1 fleet rejection")
        # More samples so that rate() windows hold the changes, and rules have evaluated. Also
        # bounds increase()'s extrapolation: a counter seen at 0 first is extrapolated only to the
        # window's end, by up to 1.1 scrape intervals, i.e. by 1.1 / (samples - 1) of its rise;
        # with 12 samples 3 refusals read at most 3.3 (the checks allow 0.5). With 6 samples a
        # run read 3.54.
        wait_until(lambda: (prom.scalar(f"count_over_time(wsgate_connections_active{sel}[1m])") or 0) >= 12,
                   30, "twelve samples of wsgate_connections_active")
        yield {"prom": prom, "proxy": proxy, "admin": admin, "refusals": refusals, "tmp": tmp, "held": held,
               "wsgate": wsgate, "conns": conns, "redis": redis, "proxy_fleet": proxy_f, "admin_fleet": admin_f,
               "held_fleet": held_fleet, "fleet_refusals": fleet_refusals, "proxy_unlimited": proxy_u,
               "admin_unlimited": admin_u, "held_unlimited": ws_u}
    finally:
        with contextlib.suppress(Exception):
            conns.close()
        stop(prom_proc, 15)
        stop(fleet, 30)
        stop(redis, 15)
        stop(unlimited, 30)
        rc = stop(wsgate, 30)
        print(f"wsgate demo exited with {rc}")


def dashboard_targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in all_panels(dashboard()) for t in p.get("targets", [])]


def alert_exprs() -> list[tuple[str, str]]:
    out = [(f"rule file: {r['alert']}", r["expr"])
           for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]]
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        for o in load_yaml_docs(path.read_text()):
            if o["kind"] == "PrometheusRule":
                out += [(f"{path.name}: {r['alert']}", r["expr"]) for g in o["spec"]["groups"] for r in g["rules"]]
    return out


def test_the_cap_is_enforced_with_503_and_retry_after(stack):
    for resp in stack["refusals"]:
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) >= 1


def test_prometheus_scrapes_wsgate_with_namespace_and_pod_labels(stack):
    prom = stack["prom"]
    (series,) = prom.query(f'wsgate_build_info{{namespace="{NAMESPACE}", pod="{POD}"}}')["result"]
    assert series["metric"]["version"]
    assert prom.scalar(f'wsgate_connections_max{{pod="{POD}"}}') == CAP
    assert prom.scalar(f'wsgate_connections_admitted_total{{pod="{POD}"}}') == CAP


@pytest.mark.parametrize("variant", sorted(SUBSTITUTIONS))
def test_every_dashboard_expression_evaluates(stack, variant):
    prom = stack["prom"]
    targets = dashboard_targets()
    assert len(targets) >= 20
    empty = []
    for title, expr in targets:
        data = prom.query(substitute(expr, variant))  # asserts status == success
        if not data["result"]:
            empty.append(title)
    print(f"{len(targets)} dashboard expressions evaluated ({variant}); empty results: {empty}")
    # Series that exist from start-up must give data.
    musts = ["Saturation per pod (active / max)", "Active connections per pod", "Admitted per second",
             "Rejected per second by reason", "Upstream errors per second by kind",
             "Bytes per second by direction", "Resident memory per pod", "Open file descriptors per pod",
             "Readiness", "Cap per pod", "Versions", "Guard actions by kind", "Messages per second by direction",
             # Every session series exists from start-up; the ratio has no value while no session
             # ended within the rate window, so it is not among these.
             "Sessions ended by cause", "Sessions ended by who closed", "Close codes per second",
             "Admin drains per second",
             # The origin and subprotocol reasons and the bad_subprotocol kind exist from start-up too.
             "Origin and subprotocol refusals per second"]
    # The fleet row has data wherever the fleet pod is selected, and none of the wsgate_fleet_*
    # panels has any for a pod without a Redis URL.
    fleet_row = [p["title"] for p in row_panels(FLEET_ROW)]
    assert set(FLEET_SERIES_PANELS) <= set(fleet_row), fleet_row
    if variant == "selected":
        for title in FLEET_SERIES_PANELS:
            assert title in empty, f"{title}: data for {POD}, which has no fleet limits"
    else:
        musts += fleet_row
    for must in musts:
        assert must not in empty, f"{must}: no data"


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels of a dashboard row: nested in a collapsed row, or following an open one."""
    panels = dashboard()["panels"]
    i = next(i for i, p in enumerate(panels) if p.get("type") == "row" and p["title"] == title)
    if panels[i].get("panels"):
        return panels[i]["panels"]
    out = []
    for p in panels[i + 1:]:
        if p.get("type") == "row":
            break
        out.append(p)
    return out


def test_saturation_panel_returns_half_for_the_pod(stack):
    panel = next(p for p in all_panels(dashboard()) if p["title"] == "Saturation per pod (active / max)")
    data = stack["prom"].query(substitute(panel["targets"][0]["expr"], "selected"))
    (series,) = data["result"]
    assert series["metric"] == {"namespace": NAMESPACE, "pod": POD}
    assert float(series["value"][1]) == 0.5


def test_stat_panels_show_the_known_state(stack):
    prom = stack["prom"]
    by_title = {p["title"]: p["targets"][0]["expr"] for p in all_panels(dashboard()) if p.get("targets")}
    assert prom.scalar(substitute(by_title["Active connections (selected pods)"], "selected")) == HELD_AT_END
    assert prom.scalar(substitute(by_title["Capacity (capped pods)"], "selected")) == CAP
    assert prom.scalar(substitute(by_title["Unlimited pods (max_clients = 0)"], "selected")) == 0
    assert prom.scalar(substitute(by_title["Rejected (capacity) in range"], "selected")) == REJECTED
    assert prom.scalar(substitute(by_title["Cap per pod"], "selected")) == CAP
    assert prom.scalar(substitute(by_title["Readiness"], "selected")) == 1
    assert prom.scalar(substitute(by_title["Saturation now per pod"], "selected")) == 0.5


def test_unlimited_pods_are_shown_sensibly(stack):
    prom = stack["prom"]
    by_title = {p["title"]: p["targets"] for p in all_panels(dashboard()) if p.get("targets")}
    # With "All" selected: the saturation views list the capped pods only (the fleet pod has a
    # local cap of 10 and holds 3), never the unlimited one (no +Inf, no 0).
    for title in ("Saturation per pod (active / max)", "Saturation now per pod"):
        res = prom.query(substitute(by_title[title][0]["expr"], "all"))["result"]
        assert {s["metric"]["pod"]: float(s["value"][1]) for s in res} == {
            POD: 0.5, POD_FLEET: FLEET_HELD / FLEET_LOCAL_CAP}, (title, res)
    assert prom.scalar(substitute(by_title["Unlimited pods (max_clients = 0)"][0]["expr"], "all")) == 1
    assert prom.scalar(substitute(by_title["Capacity (capped pods)"][0]["expr"], "all")) == CAP + FLEET_LOCAL_CAP
    assert (prom.scalar(substitute(by_title["Active connections (selected pods)"][0]["expr"], "all"))
            == HELD_AT_END + 1 + FLEET_HELD)
    caps = prom.query(substitute(by_title["Cap per pod"][0]["expr"], "all"))["result"]
    assert {s["metric"]["pod"]: float(s["value"][1]) for s in caps} == {
        POD: CAP, POD_UNLIMITED: 0, POD_FLEET: FLEET_LOCAL_CAP}
    # The "max" line of the active panel is drawn for capped pods only.
    maxes = prom.query(substitute(by_title["Active connections per pod"][1]["expr"], "all"))["result"]
    assert sorted(s["metric"]["pod"] for s in maxes) == sorted([POD, POD_FLEET])
    # The saturation alert's ratio leaves the unlimited pod out as well.
    assert prom.query(f'wsgate_connections_active{{pod="{POD_UNLIMITED}"}} / (wsgate_connections_max > 0)')["result"] == []


def test_rejected_capacity_increase_shows_three(stack):
    prom = stack["prom"]
    sel = f'namespace="{NAMESPACE}", pod="{POD}"'
    raw = prom.scalar(f'wsgate_connections_rejected_total{{{sel}, reason="capacity"}}')
    assert raw == REJECTED
    inc = prom.scalar(f'sum(increase(wsgate_connections_rejected_total{{{sel}, reason="capacity"}}[1h]))')
    # increase() extrapolates to the window's end by up to half a scrape interval.
    assert inc is not None and abs(inc - REJECTED) < 0.5, inc
    by_reason = prom.query(f'sum by (reason) (increase(wsgate_connections_rejected_total{{{sel}}}[1h]))')["result"]
    reasons = {s["metric"]["reason"]: round(float(s["value"][1])) for s in by_reason}
    assert reasons["capacity"] == REJECTED
    assert reasons.get("draining", 0) == 0


def fleet_row_targets() -> dict[str, list[dict[str, Any]]]:
    return {p["title"]: p["targets"] for p in row_panels(FLEET_ROW)}


def series_by(data: dict[str, Any], *labels: str) -> dict[Any, float]:
    """Instant vector -> {label value (or tuple of values): sample value}."""
    out = {}
    for s in data["result"]:
        key = tuple(s["metric"].get(label) for label in labels)
        out[key[0] if len(key) == 1 else key] = float(s["value"][1])
    return out


def test_fleet_pod_refuses_over_the_fleet_cap_with_503(stack):
    # 3 held of a fleet cap of 3 (local cap 10): the 4th upgrade is refused by the fleet limit.
    for resp in stack["fleet_refusals"]:
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) >= 1
    text = scrape(stack["admin_fleet"])
    assert metric_value(text, "wsgate_connections_active") == FLEET_HELD
    assert metric_value(text, "wsgate_connections_rejected_total", 'reason="fleet"') == FLEET_REJECTED
    assert metric_value(text, "wsgate_connections_rejected_total", 'reason="capacity"') == 0


@pytest.mark.parametrize("variant", ["fleet", "all"])
def test_fleet_row_shows_the_fleet_pod(stack, variant):
    """Every expression of the "Fleet limits (Redis)" row, for the fleet pod alone and for "All"
    (where only the fleet pod has wsgate_fleet_* series)."""
    prom = stack["prom"]
    row = fleet_row_targets()
    q = lambda title, i=0: prom.query(substitute(row[title][i]["expr"], variant))  # noqa: E731

    # Fleet active vs fleet limit: 3 of 3, one line each per namespace.
    assert series_by(q("Fleet active vs fleet limit", 0), "namespace") == {NAMESPACE: FLEET_HELD}
    assert series_by(q("Fleet active vs fleet limit", 1), "namespace") == {NAMESPACE: FLEET_MAX}
    # Redis up per pod: the fleet pod only (the other pods have no fleet series).
    assert series_by(q("Redis up per pod"), "pod") == {POD_FLEET: 1}
    # Latency quantiles: the admissions went through Redis, so op admit has a number (not NaN).
    for i, quantile in enumerate(("p50", "p99")):
        by_op = series_by(q("Redis round-trip latency p50 / p99 by op", i), "op")
        assert "admit" in by_op, (quantile, by_op)
        assert math.isfinite(by_op["admit"]) and 0 < by_op["admit"] < 5, (quantile, by_op)
    # Requests per second by op and result: 4 admissions answered by Redis (3 admitted, 1 over).
    reqs = series_by(q("Fleet requests per second by op and result"), "op", "result")
    assert reqs.get(("admit", "ok"), 0) > 0, reqs
    assert reqs.get(("admit", "error"), 0) == 0 and reqs.get(("admit", "timeout"), 0) == 0, reqs
    # Fleet refusals per second: reason fleet only while Redis is up.
    refusals = series_by(q("Fleet refusals per second"), "reason")
    assert refusals.get("fleet", 0) > 0 and refusals.get("fleet_unavailable", 0) == 0, refusals


def test_rejected_fleet_increase_shows_one(stack):
    prom = stack["prom"]
    sel = f'namespace="{NAMESPACE}", pod="{POD_FLEET}"'
    assert prom.scalar(f'wsgate_connections_rejected_total{{{sel}, reason="fleet"}}') == FLEET_REJECTED
    inc = prom.scalar(f'sum(increase(wsgate_connections_rejected_total{{{sel}, reason="fleet"}}[1h]))')
    # increase() extrapolates to the window's end by up to half a scrape interval.
    assert inc is not None and abs(inc - FLEET_REJECTED) < 0.5, inc
    by_reason = series_by(prom.query(f"sum by (reason) (increase(wsgate_connections_rejected_total{{{sel}}}[1h]))"),
                          "reason")
    assert round(by_reason["fleet"]) == FLEET_REJECTED
    assert all(round(v) == 0 for r, v in by_reason.items() if r != "fleet"), by_reason
    # Only the fleet pod refused with reason fleet.
    others = prom.query(f'sum by (pod) (wsgate_connections_rejected_total{{pod!="{POD_FLEET}", reason=~"fleet.*"}}) > 0')
    assert others["result"] == [], others


def test_template_variable_queries_find_the_pod(stack):
    prom = stack["prom"]
    tv = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name, expected in (("namespace", NAMESPACE), ("pod", POD)):
        q = tv[name]["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
        assert m, q
        metric, label = m.group(1), m.group(2)
        metric = metric.replace("$namespace", NAMESPACE)
        assert label == name
        values = prom.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert expected in values, (q, values)


def test_every_alert_expression_evaluates(stack):
    prom = stack["prom"]
    exprs = alert_exprs()
    assert len(exprs) >= 8
    for name, expr in exprs:
        prom.query(expr)
    # At this state (2 of 4, 3 refused; fleet pod 3 of 3 with 1 refused, Redis up; every target
    # scraped) no alert's condition holds at the default values: 3 refusals are under
    # WsgateRejectingConnections' volume guard of 10, and no pod has ended 20 sessions
    # (WsgateAbnormalCloses' guard).
    firing = {name.split(": ")[1] for name, expr in exprs if prom.query(expr)["result"]}
    assert firing == set(), firing
    # Without its guards the rejecting alert sees both refusing pods: 3 of 7 upgrades refused for
    # capacity on the capped pod, 1 of 4 for fleet on the fleet pod.
    for name, expr in exprs:
        if name.endswith(": WsgateRejectingConnections"):
            res = prom.query(expr.replace("> 0.05", "> 0").replace(">= 10", ">= 1"))["result"]
            assert {(s["metric"]["pod"], s["metric"]["reason"]): round(float(s["value"][1]), 2) for s in res} == {
                (POD, "capacity"): round(3 / 7, 2), (POD_FLEET, "fleet"): 0.25}, (name, res)


def test_chart_alert_expressions_evaluate_with_custom_thresholds(stack, render):
    pr = render({"prometheusRule": {"enabled": True, "saturation": {"threshold": 0.4},
                                    "rejecting": {"threshold": 0.3, "minRefusals": 2}}}).one("PrometheusRule")
    rules = {r["alert"]: r["expr"] for g in pr["spec"]["groups"] for r in g["rules"]}
    prom = stack["prom"]
    sat = prom.query(rules["WsgateSaturationHigh"])["result"]
    assert {s["metric"]["pod"]: float(s["value"][1]) for s in sat} == {POD: 0.5}, \
        "0.5 > 0.4 must match, the fleet pod's 0.3 must not"
    rejecting = prom.query(rules["WsgateRejectingConnections"])["result"]
    assert [(s["metric"]["pod"], s["metric"]["reason"]) for s in rejecting] == [(POD, "capacity")], \
        "3 of 7 refused (> 30 %, >= 2) must match, the fleet pod's 1 of 4 must not"
    for expr in rules.values():
        prom.query(expr)


def test_prometheus_loaded_the_rules_and_evaluates_them_without_error(stack):
    prom = stack["prom"]

    def evaluated():
        groups = prom.get("/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") and
                                      not r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = wait_until(evaluated, 30, "every rule evaluated once")
    assert {r["name"] for r in rules} == {"WsgateSaturationHigh", "WsgateRejectingConnections", "WsgateOriginRefusals",
                                          "WsgateUpstreamErrors", "WsgatePodNotReady", "WsgateKeyPinnedAtLimit",
                                          "WsgateFleetRedisDown", "WsgateAbnormalCloses", "WsgateConfigReloadFailed",
                                          "WsgateDescriptorsNearLimit", "WsgateTargetMissing"}
    for r in rules:
        assert r["health"] == "ok", r

    def rejecting_active():
        alerts = prom.get("/api/v1/alerts")["alerts"]
        found = [a for a in alerts if a["labels"]["alertname"] == "WsgateRejectingConnections"]
        return found if len(found) >= 2 else None

    # From the chart's rule at LOW_REJECTING (the rule file's needs 10 refusals).
    alerts = wait_until(rejecting_active, 30, "WsgateRejectingConnections to be pending for both pods")
    assert all(a["state"] in ("pending", "firing") for a in alerts), alerts
    assert sorted((a["labels"]["pod"], a["labels"]["reason"]) for a in alerts) == [
        (POD, "capacity"), (POD_FLEET, "fleet")], alerts
    others = [a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["alerts"]
              if a["labels"]["alertname"] != "WsgateRejectingConnections"]
    assert others == []


def test_prometheus_adapter_query_serves_the_hpa_metric(stack):
    (cm,) = [o for o in load_yaml_docs((KUBE_DIR / "prometheus-adapter-config.yaml").read_text())]
    (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    # What prometheus-adapter sends for `kubectl get --raw .../pods/*/wsgate_connections_active`.
    series = re.match(r"^(\w+)", rule["seriesQuery"]).group(1)
    q = (rule["metricsQuery"].replace("<<.Series>>", series)
         .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
         .replace("<<.GroupBy>>", "pod"))
    data = stack["prom"].query(q)
    (s,) = data["result"]
    assert s["metric"] == {"pod": POD} and float(s["value"][1]) == HELD_AT_END
    # The series query the adapter uses for discovery finds it too.
    found = stack["prom"].get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
    assert any(f.get("pod") == POD for f in found)


def test_held_connections_still_echo(stack):
    for i, ws in enumerate(stack["held"]):
        ws.send(f"still here {i}")
        assert ws.recv(timeout=10) == f"still here {i}"


def guard_counts(text: str) -> dict[tuple[str, str], float]:
    """wsgate_message_guard_total on /metrics: {(guard, action): value}."""
    out = {}
    for m in re.finditer(r'^wsgate_message_guard_total\{([^}]*)\}\s+(\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels["guard"], labels["action"])] = float(m.group(2))
    return out


def test_message_guard_series_exist_from_start_up(stack):
    """docs/operations.md#message-guards: every guard/action pair and both message directions on a pod without guards, the
    guard series at 0; its echoes counted as messages both ways."""
    text = scrape(stack["admin"])
    assert guard_counts(text) == {pair: 0 for pair in GUARD_PAIRS}, text
    for direction in ("client_to_upstream", "upstream_to_client"):
        n = metric_value(text, "wsgate_messages_total", f'direction="{direction}"')
        assert n is not None and n >= CAP, (direction, n)


def connect_uncompressed(proxy: str):
    """No permessage-deflate: the guards then count exactly the bytes the test sends."""
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://{proxy}/", open_timeout=10, close_timeout=5, compression=None)


def test_message_guards_row_shows_the_guards_at_work(stack):
    """The unlimited pod (GUARDS_ENV): a 2 KiB message is refused with Close 1009; 30 messages sent at
    once arrive in order at about 20/s after 5; 5 KB sent at once arrive at about 4 KiB/s after
    2 KiB. /metrics and the dashboard's "Message guards" row show it; the other pods show 0."""
    from websockets.exceptions import ConnectionClosedError

    prom, admin_u, proxy_u = stack["prom"], stack["admin_unlimited"], stack["proxy_unlimited"]
    sel = f'namespace="{NAMESPACE}", pod="{POD_UNLIMITED}"'
    # Prometheus has seen the guard counters at 0, so rate() holds what follows.
    wait_until(lambda: (prom.scalar(f'count_over_time(wsgate_message_guard_total{{{sel}, guard="size"}}[1m])') or 0)
               >= 2, 30, "two samples of the unlimited pod's guard counters")
    before = scrape(admin_u)
    assert guard_counts(before) == {pair: 0 for pair in GUARD_PAIRS}, before
    sent_before = metric_value(before, "wsgate_messages_total", 'direction="client_to_upstream"')

    # Size: one incompressible message of 2 KiB > 1 KiB: never forwarded, Close 1009 to the client.
    with connect_uncompressed(proxy_u) as ws:
        ws.send(os.urandom(2048))
        with pytest.raises(ConnectionClosedError) as err:
            ws.recv(timeout=10)
    assert err.value.rcvd is not None and err.value.rcvd.code == 1009, err.value

    # Message rate, throttle: 30 messages at once; 5 pass at once, the rest at 20/s, in order.
    with connect_uncompressed(proxy_u) as ws:
        started = time.monotonic()
        for i in range(30):
            ws.send(f"m{i}")
        got = [ws.recv(timeout=10) for _ in range(30)]
        took = time.monotonic() - started
    assert got == [f"m{i}" for i in range(30)]
    print(f"30 messages at 20/s after a burst of 5: {took:.2f}s")
    assert took >= 1.0, f"30 messages at 20/s after a burst of 5 took {took:.2f}s"

    # Byte rate: 5 messages of 1000 bytes (within the message burst) at once; 2048 bytes pass at
    # once, the rest at 4096 bytes/s.
    payloads = [os.urandom(1000) for _ in range(5)]
    with connect_uncompressed(proxy_u) as ws:
        started = time.monotonic()
        for data in payloads:
            ws.send(data)
        got = [ws.recv(timeout=10) for _ in payloads]
        took = time.monotonic() - started
    assert got == payloads
    print(f"5000 bytes at 4096/s after a burst of 2048: {took:.2f}s")
    assert took >= 0.5, f"5000 bytes at 4096/s after a burst of 2048 took {took:.2f}s"

    after = scrape(admin_u)
    counts = guard_counts(after)
    print(f"wsgate_message_guard_total on the guarded pod: {counts}")
    assert counts[("size", "close")] == 1 and counts[("rate", "close")] == 0, counts
    assert counts[("rate", "throttle")] >= 1 and counts[("bytes", "throttle")] >= 1, counts
    sent_after = metric_value(after, "wsgate_messages_total", 'direction="client_to_upstream"')
    assert sent_after - sent_before >= 35, (sent_before, sent_after)
    # docs/operations.md#access-log: the refused message ended its session with end size, wsgate's Close 1009 to the client.
    assert session_counts(after)[("wsgate", "size")] == 1, session_counts(after)
    assert close_code_counts(after)[("wsgate", "1009")] == 1, close_code_counts(after)

    wait_until(lambda: prom.scalar(f'wsgate_message_guard_total{{{sel}, guard="bytes", action="throttle"}}')
               == counts[("bytes", "throttle")], 30, "Prometheus to see the byte throttling")
    panels = {p["title"]: p["targets"][0]["expr"] for p in row_panels(GUARDS_ROW)}
    assert set(panels) == {"Guard actions by kind", "Messages per second by direction"}, panels

    # "All": the unlimited pod's guard actions; the rate close never happened (that pod throttles).
    by_kind = series_by(prom.query(substitute(panels["Guard actions by kind"], "all")), "guard", "action")
    assert set(by_kind) == GUARD_PAIRS, by_kind
    assert by_kind[("size", "close")] > 0 and by_kind[("rate", "throttle")] > 0 and by_kind[("bytes", "throttle")] > 0
    assert by_kind[("rate", "close")] == 0, by_kind
    # The capped pod alone: no guards, every pair at 0.
    assert series_by(prom.query(substitute(panels["Guard actions by kind"], "selected")), "guard", "action") == {
        pair: 0 for pair in GUARD_PAIRS}
    by_direction = series_by(prom.query(substitute(panels["Messages per second by direction"], "all")), "direction")
    assert set(by_direction) == {"client_to_upstream", "upstream_to_client"}, by_direction
    assert by_direction["client_to_upstream"] > 0 and by_direction["upstream_to_client"] > 0, by_direction


def labelled(text: str, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """A labelled counter on /metrics: {(label values in the order given): value}."""
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}}\s+(\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[tuple(got[label] for label in labels)] = float(m.group(2))
    return out


def session_counts(text: str) -> dict[tuple[str, str], float]:
    return labelled(text, "wsgate_sessions_ended_total", "closed_by", "end")


def close_code_counts(text: str) -> dict[tuple[str, str], float]:
    return labelled(text, "wsgate_close_codes_total", "closed_by", "code")


def test_session_series_exist_from_start_up_and_count_the_closed_sessions(stack):
    """docs/operations.md#access-log on every pod's /metrics: the start-up series of wsgate_sessions_ended_total and
    wsgate_close_codes_total, label values only from the contract's bounded sets, and
    wsgate_admin_drained_total at 0. On the capped pod exactly the two sessions the set-up closed
    (client Close 1000) and nothing else, the same two in both families."""
    for admin in (stack["admin"], stack["admin_unlimited"], stack["admin_fleet"]):
        text = scrape(admin)
        sessions, codes = session_counts(text), close_code_counts(text)
        assert SESSIONS_ENDED_AT_START <= set(sessions), SESSIONS_ENDED_AT_START - set(sessions)
        assert CLOSE_CODES_AT_START <= set(codes), CLOSE_CODES_AT_START - set(codes)
        assert {by for by, _ in sessions} <= set(CLOSED_BY) and {end for _, end in sessions} <= set(END_CAUSES)
        assert {by for by, _ in codes} <= set(CLOSED_BY) and {code for _, code in codes} <= set(CLOSE_CODES)
        assert metric_value(text, "wsgate_admin_drained_total") == 0
        # Every ended session counts once in each family (the abnormal-close alert divides one by the other).
        assert sum(sessions.values()) == sum(codes.values()), admin
    text = scrape(stack["admin"])
    assert {k: v for k, v in session_counts(text).items() if v} == {("client", "client_close"): CAP - HELD_AT_END}
    assert {k: v for k, v in close_code_counts(text).items() if v} == {("client", "1000"): CAP - HELD_AT_END}


def test_prometheus_scrapes_the_session_series(stack):
    prom = stack["prom"]
    sel = f'namespace="{NAMESPACE}", pod="{POD}"'
    wait_until(lambda: prom.scalar(f"sum(wsgate_sessions_ended_total{{{sel}}})") == CAP - HELD_AT_END, 30,
               "Prometheus to see the two closed sessions")
    ended = series_by(prom.query(f"sum by (closed_by, end) (wsgate_sessions_ended_total{{{sel}}}) > 0"),
                      "closed_by", "end")
    assert ended == {("client", "client_close"): CAP - HELD_AT_END}, ended
    codes = series_by(prom.query(f"sum by (closed_by, code) (wsgate_close_codes_total{{{sel}}}) > 0"),
                      "closed_by", "code")
    assert codes == {("client", "1000"): CAP - HELD_AT_END}, codes
    # The three metric names of docs/operations.md#access-log, scraped from every pod.
    names = prom.query(f'count by (__name__, pod) ({{__name__=~"wsgate_(sessions_ended|close_codes|admin_drained)_total",'
                       f' namespace="{NAMESPACE}"}})')["result"]
    assert {(s["metric"]["__name__"], s["metric"]["pod"]) for s in names} == {
        (name, pod) for name in ("wsgate_sessions_ended_total", "wsgate_close_codes_total", "wsgate_admin_drained_total")
        for pod in (POD, POD_UNLIMITED, POD_FLEET)}
    drained = series_by(prom.query(f'wsgate_admin_drained_total{{namespace="{NAMESPACE}"}}'), "pod")
    assert drained == {POD: 0, POD_UNLIMITED: 0, POD_FLEET: 0}


def test_sessions_row_shows_the_closed_sessions(stack):
    """The "Sessions" row for the capped pod, over the last hour (so the closes, some time ago, are
    inside the window): only client_close, only client, only 1000, an abnormal ratio of 0, no drains."""
    prom = stack["prom"]
    row = {p["title"]: p["targets"][0]["expr"] for p in row_panels(SESSIONS_ROW)}
    assert set(row) == {"Sessions ended by cause", "Sessions ended by who closed", "Close codes per second",
                        "Abnormal-close ratio", "Admin drains per second"}, row
    q = lambda title: prom.query(substitute(row[title].replace("$__rate_interval", "1h"), "selected"))  # noqa: E731
    by_end = series_by(q("Sessions ended by cause"), "end")
    assert set(by_end) <= set(END_CAUSES) and {e for e, v in by_end.items() if v > 0} == {"client_close"}, by_end
    by_who = series_by(q("Sessions ended by who closed"), "closed_by")
    assert set(by_who) == set(CLOSED_BY) and {c for c, v in by_who.items() if v > 0} == {"client"}, by_who
    by_code = series_by(q("Close codes per second"), "code")
    assert set(by_code) <= set(CLOSE_CODES) and {c for c, v in by_code.items() if v > 0} == {"1000"}, by_code
    assert prom.scalar(substitute(row["Abnormal-close ratio"].replace("$__rate_interval", "1h"), "selected")) == 0
    assert series_by(q("Admin drains per second"), "pod") == {POD: 0}


def access_log(tmp: Path) -> list[dict[str, Any]]:
    """The capped pod's JSON log lines (stderr) so far."""
    import json

    return [json.loads(line) for line in (tmp / "wsgate.stderr").read_text().splitlines() if line.startswith("{")]


def test_access_log_records_the_closed_sessions(stack):
    """The two sessions the set-up closed, as their JSON records: every field of the contract, the
    client's Close 1000 first, and the bytes and messages the test sent (one 7-byte text message,
    then a Close with a status code: 2 + 4 + 7 and 2 + 4 + 2 bytes, masked)."""
    records = [r for r in access_log(stack["tmp"]) if r.get("target") == "wsgate::access" and r["message"] == "session"]
    assert len(records) == CAP - HELD_AT_END, records
    from test_helm_session_telemetry import access_log_examples

    readme_example, _ = access_log_examples()
    for r in records:
        # Every field, in the order of the README's example.
        assert list(r) == list(readme_example) == ["timestamp", "level", "message", *ACCESS_LOG_FIELDS, "target"], r
        assert r["level"] == "INFO" and re.fullmatch(r"[0-9a-f]{16}", r["session"]), r
        assert (r["end"], r["closed_by"], r["close_code"], r["close_reason"]) == ("client_close", "client", 1000, ""), r
        assert (r["client"], r["path"], r["subprotocol"], r["keys"]) == ("127.0.0.1", "/", "", ""), r
        assert (r["msgs_in"], r["msgs_out"]) == (1, 1), r
        assert r["bytes_in"] == (2 + 4 + len("hello 0")) + (2 + 4 + 2), r
        assert r["bytes_out"] >= 2 + len("hello 0"), r
        assert 0 <= r["duration_ms"] < 60_000, r
    assert len({r["session"] for r in records}) == len(records)


def test_refusals_are_one_summary_line(stack):
    """The 3 capacity refusals: one summary line (the 10 s window opened by the first has ended),
    with the count by reason and nothing for reasons that did not occur; no line per refusal."""
    def summaries():
        return [r for r in access_log(stack["tmp"]) if r.get("target") == "wsgate::access" and r["message"] == "refusals"]

    (line,) = wait_until(summaries, 20, "the refusal summary line")
    fields = {k: v for k, v in line.items() if k not in ("timestamp", "level", "target", "message")}
    assert fields == {"window_s": 10, "total": REJECTED, "capacity": REJECTED}, line


def test_readme_jq_examples_on_the_real_log(stack):
    """docs/operations.md's jq filters, over the capped pod's real JSON log: by end cause the two
    client closes; nobody vanished with 1006; the one refusal summary."""
    from test_helm_session_telemetry import README, jq_commands, readme_section, run_jq

    lines = (stack["tmp"] / "wsgate.stderr").read_text().splitlines()
    who_1006, by_end, summaries = (run_jq(c, lines) for c in jq_commands(readme_section(README, "Access log")))
    assert who_1006 == []
    assert by_end == [[{"end": "client_close", "sessions": CAP - HELD_AT_END}]]
    assert [s["total"] for s in summaries] == [REJECTED]


# After every test that counts the unlimited pod's connections or sessions.
def test_admin_drain_closes_with_1001_and_shows_on_the_dashboard(stack):
    """POST /drain on the unlimited pod (the only one with an admin token) closes its one held
    connection with Close 1001 "server rebalancing, please reconnect" while the pod stays ready;
    wsgate_admin_drained_total, the session families and the "Sessions" row's drains panel show it.
    The pods without a token answer 404, a wrong token gets 401."""
    from websockets.exceptions import ConnectionClosedOK

    prom, admin_u = stack["prom"], stack["admin_unlimited"]
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert requests.post(f"http://{stack['admin']}/drain", json={"count": 1}, headers=bearer, timeout=5).status_code == 404
    assert requests.post(f"http://{admin_u}/drain", json={"count": 1}, timeout=5).status_code == 401
    assert requests.post(f"http://{admin_u}/drain", json={"count": 1}, headers={"Authorization": "Bearer nope"},
                         timeout=5).status_code == 401
    before = scrape(admin_u)
    assert metric_value(before, "wsgate_connections_active") == 1
    r = requests.post(f"http://{admin_u}/drain", json={"fraction": 1, "period": "1s"}, headers=bearer, timeout=5)
    assert (r.status_code, r.json()) == (202, {"planned": 1, "period_ms": 1000}), r.text
    with pytest.raises(ConnectionClosedOK) as err:
        stack["held_unlimited"].recv(timeout=10)
    assert (err.value.rcvd.code, err.value.rcvd.reason) == (1001, "server rebalancing, please reconnect")
    assert requests.get(f"http://{admin_u}/readyz", timeout=5).status_code == 200

    def drained():
        text = scrape(admin_u)
        return text if metric_value(text, "wsgate_admin_drained_total") == 1 else None

    after = wait_until(drained, 10, "wsgate_admin_drained_total 1 on the unlimited pod")
    gained = {k: v - session_counts(before).get(k, 0) for k, v in session_counts(after).items()}
    assert {k: v for k, v in gained.items() if v} == {("wsgate", "admin_drain"): 1}, gained
    gained = {k: v - close_code_counts(before).get(k, 0) for k, v in close_code_counts(after).items()}
    assert {k: v for k, v in gained.items() if v} == {("wsgate", "1001"): 1}, gained
    status = requests.get(f"http://{admin_u}/drain", headers=bearer, timeout=5).json()
    assert status == {"running": False, "planned": 1, "drained": 1, "period_ms": 1000}, status

    sel = f'namespace="{NAMESPACE}", pod="{POD_UNLIMITED}"'
    wait_until(lambda: prom.scalar(f"wsgate_admin_drained_total{{{sel}}}") == 1, 30, "Prometheus to see the admin drain")
    panel = next(p for p in row_panels(SESSIONS_ROW) if p["title"] == "Admin drains per second")
    by_pod = series_by(prom.query(substitute(panel["targets"][0]["expr"], "all")), "pod")
    assert by_pod[POD_UNLIMITED] > 0 and by_pod[POD] == 0 and by_pod[POD_FLEET] == 0, by_pod


def test_query_errors_are_reported(stack):
    # Guards the helper every check above relies on: a bad expression must fail, not pass silently.
    with pytest.raises(AssertionError):
        stack["prom"].query("sum(wsgate_connections_active")


# After every test that expects Redis up, before the shutdown test (which stays last).
def test_redis_killed_shows_down_alerts_and_fails_closed(stack):
    prom, redis = stack["prom"], stack["redis"]
    sel = f'namespace="{NAMESPACE}", pod="{POD_FLEET}"'
    redis.kill()  # SIGKILL, our own child, by PID
    assert redis.wait(timeout=10) == -signal.SIGKILL

    # wsgate_fleet_up follows the last round trip: at the latest the next renewal (every
    # fleet_lease_ttl / 3 = 10 s) fails; a lost connection is usually noticed at once.
    wait_until(lambda: metric_value(scrape(stack["admin_fleet"]), "wsgate_fleet_up") == 0, 15,
               "wsgate_fleet_up 0 on the fleet pod's /metrics")
    wait_until(lambda: prom.scalar(f"wsgate_fleet_up{{{sel}}}") == 0, 30, "Prometheus to see wsgate_fleet_up 0")
    seen_down = time.monotonic()
    up_panel = fleet_row_targets()["Redis up per pod"][0]["expr"]
    assert series_by(prom.query(substitute(up_panel, "all")), "pod") == {POD_FLEET: 0}

    # The alert's expression (rule file, plain manifest) returns the fleet pod and only it: the
    # other pods have no wsgate_fleet_up series.
    down = [(n, e) for n, e in alert_exprs() if n.endswith(": WsgateFleetRedisDown")]
    assert len(down) >= 2, down
    for name, expr in down:
        res = prom.query(expr)["result"]
        assert [(s["metric"], float(s["value"][1])) for s in res] == [
            ({"namespace": NAMESPACE, "pod": POD_FLEET}, 0.0)], (name, res)

    # Prometheus loaded the rule file: the alert becomes pending (for: 1m, not waited for).
    def redis_down_alerts():
        return [a for a in prom.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "WsgateFleetRedisDown"] or None

    alerts = wait_until(redis_down_alerts, 30, "WsgateFleetRedisDown to be pending")
    assert [(a["labels"]["namespace"], a["labels"]["pod"]) for a in alerts] == [(NAMESPACE, POD_FLEET)], alerts
    # Active for less than its `for: 1m` so far (the margin covers one evaluation interval).
    if time.monotonic() - seen_down < 50:
        assert alerts[0]["state"] == "pending", alerts

    # fleet_fail_mode closed: a new upgrade is refused with 503 fleet_unavailable, promptly.
    from websockets.exceptions import InvalidStatus

    started = time.monotonic()
    with pytest.raises(InvalidStatus) as err:
        with connect(stack["proxy_fleet"]):
            pass
    took = time.monotonic() - started
    assert err.value.response.status_code == 503
    assert int(err.value.response.headers["Retry-After"]) >= 1
    # docs/operations.md#fleet-wide-limits: an admission never waits longer than fleet_timeout (100 ms) for Redis; the bound
    # here is loose on purpose (handshake and a busy machine), it catches a wait for Redis.
    assert took < 5, f"the refusal took {took:.2f}s"
    text = scrape(stack["admin_fleet"])
    assert metric_value(text, "wsgate_connections_rejected_total", 'reason="fleet_unavailable"') == 1
    assert metric_value(text, "wsgate_connections_rejected_total", 'reason="fleet"') == FLEET_REJECTED
    wait_until(lambda: prom.scalar(f'wsgate_connections_rejected_total{{{sel}, reason="fleet_unavailable"}}') == 1,
               30, "Prometheus to see 1 fleet_unavailable rejection")
    inc = prom.scalar(f'sum(increase(wsgate_connections_rejected_total{{{sel}, reason="fleet_unavailable"}}[1h]))')
    assert inc is not None and abs(inc - 1) < 0.5, inc
    refusals_panel = fleet_row_targets()["Fleet refusals per second"][0]["expr"]
    assert series_by(prom.query(substitute(refusals_panel, "fleet")), "reason").get("fleet_unavailable", 0) > 0

    # Existing connections never end because of Redis; readiness does not depend on it.
    for i, ws in enumerate(stack["held_fleet"]):
        ws.send(f"redis is gone {i}")
        assert ws.recv(timeout=10) == f"redis is gone {i}"
    assert metric_value(scrape(stack["admin_fleet"]), "wsgate_connections_active") == FLEET_HELD
    assert requests.get(f"http://{stack['admin_fleet']}/readyz", timeout=5).status_code == 200
    assert prom.scalar(f"wsgate_ready{{{sel}}}") == 1


# Keep this test last: it shuts the demo down.
def test_shutdown_shows_as_not_ready_on_the_dashboard_and_in_the_alert(stack):
    prom, proc = stack["prom"], stack["wsgate"]
    sel = f'namespace="{NAMESPACE}", pod="{POD}"'
    proc.send_signal(signal.SIGTERM)  # our own child, by PID
    # Connections are still held, so wsgate stays up (draining) for its 10 s grace: Prometheus
    # must see wsgate_ready drop to 0 meanwhile.
    wait_until(lambda: prom.scalar(f"wsgate_ready{{{sel}}}") == 0, 8, "Prometheus to see wsgate_ready 0")
    readiness = next(p for p in all_panels(dashboard()) if p["title"] == "Readiness")
    assert prom.scalar(substitute(readiness["targets"][0]["expr"], "selected")) == 0
    not_ready = next(e for n, e in alert_exprs() if n == "rule file: WsgatePodNotReady")
    (s,) = prom.query(not_ready)["result"]
    assert s["metric"] == {"namespace": NAMESPACE, "pod": POD}
    # Once the clients leave, the drain ends and the process exits 0 (docs/configuration.md#command-line, §5).
    stack["conns"].close()
    assert proc.wait(timeout=15) == 0
