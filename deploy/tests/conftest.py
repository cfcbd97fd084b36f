"""Shared helpers for deploy/tests: paths, Helm rendering through Helm's own engine, YAML loading.

Run through deploy/tests/run.sh, which installs the engines (Debian prometheus, helm-python-sdk,
kubernetes-validate) before pytest starts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "wsgate"
KUBE_DIR = DEPLOY / "kubernetes"
RULES_FILE = DEPLOY / "prometheus" / "wsgate-alerts.yaml"
RULES_TEST_FILE = DEPLOY / "prometheus" / "wsgate-alerts.test.yaml"
DASHBOARD = ROOT / "grafana" / "wsgate.json"
CHART_DASHBOARD = CHART / "dashboards" / "wsgate.json"

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL_BIN = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool") or "/usr/bin/promtool"


def cargo_target_dir() -> Path:
    """The cargo target directory: CARGO_TARGET_DIR when set (a shared build cache), else the
    workspace's target/, as `cargo metadata` reports it; target/ when cargo cannot say."""
    try:
        meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps",
                               "--manifest-path", str(ROOT / "Cargo.toml")],
                              capture_output=True, text=True, timeout=60, check=True)
        return Path(json.loads(meta.stdout)["target_directory"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return ROOT / "target"


# The binary under test: WSGATE_BIN (run.sh sets it), else debug/wsgate of the cargo target directory.
WSGATE_BIN = Path(os.environ.get("WSGATE_BIN") or cargo_target_dir() / "debug" / "wsgate")

# Every configuration key of docs/configuration.md, §7 and §8, as the environment variable the chart sets.
SPEC_KEYS = [
    # §2
    "listen", "upstream", "admin_listen", "max_clients", "retry_after", "upstream_connect_timeout",
    "header_read_timeout", "half_close_timeout", "idle_timeout", "tcp_keepalive", "shutdown_grace",
    "log_format",
    # §7
    "ready_high_watermark", "ready_low_watermark", "shutdown_delay", "drain_period",
    "admission_rate", "admission_burst", "max_clients_per_ip", "trusted_hops", "enforce",
    "max_connection_lifetime", "lifetime_jitter",
    # §8
    "close_code_drain", "close_code_lifetime", "close_code_idle", "close_timeout",
]
# ready_low_watermark defaults to "0.1 below high" in the binary, which a fixed value cannot say:
# the chart sets it only when the value is given.
OPTIONAL_ENV = {"WSGATE_READY_LOW_WATERMARK"}
# docs/operations.md#access-log's key that the chart sets on every pod, like the keys above (admin_token_file is set only
# with adminToken). §12 names it in its text, not in a key table, so it stays out of SPEC_KEYS, which
# test_env_list_matches_the_shared_spec compares with the tables of §2, §7 and §8.
TELEMETRY_KEYS = ["access_log"]
# wsgate's own keys for its runtime (workers: issue 15; max_plain_requests: issue 28, set on every
# pod so the cap is visible in the pod spec; log_level: issue 24, rendered like log_format), set on
# every pod like the keys above.
RUNTIME_KEYS = ["workers", "max_plain_requests", "log_level"]

# The metric names of docs/metrics.md, §7, §8, §9, §10, §11 (names are fixed: dashboard and alerts may use only these).
SPEC_METRICS = {
    "wsgate_connections_active", "wsgate_connections_max", "wsgate_connections_admitted_total",
    "wsgate_connections_rejected_total", "wsgate_upstream_errors_total",
    "wsgate_connection_duration_seconds_bucket", "wsgate_connection_duration_seconds_sum",
    "wsgate_connection_duration_seconds_count", "wsgate_transferred_bytes_total",
    "wsgate_http_requests_total", "wsgate_build_info", "wsgate_ready",
    "wsgate_connections_drained_total", "wsgate_connections_expired_total",
    "wsgate_connections_would_reject_total", "wsgate_config_reloads_total",
    "wsgate_close_frames_sent_total", "process_resident_memory_bytes", "process_open_fds",
    "process_max_fds", "process_cpu_seconds_total", "process_virtual_memory_bytes",
    "process_start_time_seconds",
    # §9 limits per key (per-rule series exist only for configured rules)
    "wsgate_key_rejected_total", "wsgate_keys_tracked", "wsgate_key_busiest_ratio",
    # §10 fleet-wide limits: present only on instances with fleet_redis_url set (the wsgate demo the
    # e2e test scrapes has none). wsgate_fleet_max (the fleet_max_clients in force, 0 = off) is named
    # by the §10 work order but not (yet) in docs/operations.md#fleet-wide-limits's metrics table.
    "wsgate_fleet_up", "wsgate_fleet_requests_total", "wsgate_fleet_request_duration_seconds_bucket",
    "wsgate_fleet_request_duration_seconds_sum", "wsgate_fleet_request_duration_seconds_count",
    "wsgate_fleet_active", "wsgate_fleet_max",
    # Automatic rebalancing (docs/operations.md#automatic-rebalancing): with the fleet's series.
    "wsgate_rebalance_shed_total", "wsgate_fleet_instances", "wsgate_fleet_mean",
    # §11 message guards: on every instance from start-up, every label value at 0
    # (guard, action = size/close, rate/close, rate/throttle, bytes/throttle; direction).
    "wsgate_message_guard_total", "wsgate_messages_total",
    # §12 session telemetry: on every instance from start-up (SESSIONS_ENDED_AT_START, CLOSE_CODES_AT_START).
    "wsgate_sessions_ended_total", "wsgate_close_codes_total", "wsgate_admin_drained_total",
    # Signals to clients (docs/configuration.md: ping_interval): Pings wsgate sent to quiet clients.
    "wsgate_pings_sent_total",
}

# docs/operations.md#access-log (and the issue 14 contract): the fields of every access-log record, in order, and the
# values of `closed_by` and `end`.
ACCESS_LOG_FIELDS = ["session", "client", "path", "subprotocol", "keys", "duration_ms", "bytes_in", "bytes_out",
                     "msgs_in", "msgs_out", "close_code", "close_reason", "closed_by", "end"]
CLOSED_BY = ["client", "upstream", "wsgate", "none"]
END_CAUSES = ["client_close", "upstream_close", "client_eof", "upstream_eof", "keepalive", "error",
              "half_close_timeout", "drain", "admin_drain", "rebalance", "lifetime", "idle", "size", "rate",
              "shutdown", "ping_timeout", "send_timeout"]
# The (closed_by, end) series of wsgate_sessions_ended_total that exist at 0 from start-up.
SESSIONS_ENDED_AT_START = {
    ("client", "client_close"), ("upstream", "upstream_close"),
    *(("none", e) for e in ("client_eof", "upstream_eof", "keepalive", "error", "shutdown")),
    *(("wsgate", e) for e in ("drain", "admin_drain", "rebalance", "lifetime", "idle", "size", "rate",
                              "shutdown", "ping_timeout", "send_timeout")),
    *((c, "half_close_timeout") for c in ("client", "upstream", "none")),
}
# The `code` values of wsgate_close_codes_total, and the (closed_by, code) series at 0 from start-up
# with the default close_code_* (1001; the contract adds the configured ones).
CLOSE_CODES = [str(c) for c in range(1000, 1016)] + ["3xxx", "4xxx", "none", "other"]
CLOSE_CODES_AT_START = {
    *((by, code) for by in ("client", "upstream") for code in CLOSE_CODES if code != "none"),
    ("none", "none"),
    *(("wsgate", code) for code in ("1001", "1008", "1009", "none")),
}

# Custom resources the chart renders, validated against their CRDs (crd_schemas.py, crds/).
CRD_KINDS = {"PodMonitor", "PrometheusRule", "ServiceMonitor", "ScaledObject"}


def spec_env_names() -> list[str]:
    return ["WSGATE_" + k.upper() for k in SPEC_KEYS]


def chart_env_names() -> list[str]:
    """Every variable the chart sets on every pod: the SPEC keys of §2, §7, §8, TELEMETRY_KEYS and
    RUNTIME_KEYS."""
    return spec_env_names() + ["WSGATE_" + k.upper() for k in TELEMETRY_KEYS + RUNTIME_KEYS]


def spec_md_keys() -> list[str] | None:
    """Config keys found in the shared SPEC.md tables (§2, §7, §8), when the file is reachable."""
    for candidate in (ROOT.parent / "shared" / "SPEC.md", ROOT / "shared" / "SPEC.md"):
        if candidate.is_file():
            text = candidate.read_text()
            keys: list[str] = []
            for section in re.split(r"^## ", text, flags=re.M):
                if not re.match(r"(2|7|8)\.", section):
                    continue
                for line in section.splitlines():
                    m = re.match(r"^\|\s*`([a-z_]+)`\s*\|\s*`?[^|]*\|\s*[^|]*\|\s*$", line)
                    if m and not m.group(1).startswith("wsgate_"):
                        keys.append(m.group(1))
            return keys
    return None


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def commented_env_block(file: str, marker: str) -> list[dict[str, str]]:
    """The commented-out `- name:`/`value:` variables of a plain manifest that follow the comment
    line containing `marker` (and its explanation), uncommented and parsed."""
    lines = (KUBE_DIR / file).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    block = []
    for line in lines[start + 1:]:
        m = re.match(r"^(\s*)# (-? ?\s*(name|value): .*)$", line)
        if not m:
            if line.strip().startswith("#") and not block:
                continue  # the explanation above the variables
            break
        block.append(m.group(1) + m.group(2))
    return yaml.safe_load("\n".join(block))


def kube_files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.iterdir() if p.suffix in (".yaml", ".yml"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def assert_lint_clean(helm, values: dict[str, Any]) -> None:
    """`helm lint --strict` of the chart with `values`: no errors, no warnings."""
    report = helm.lint(str(CHART), values, strict=True, namespace="prod")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def assert_schema_refuses(helm, chart, render, case: str, values: dict[str, Any]) -> None:
    """The chart's schema refuses `values`: at render, in the schema alone, and in `helm lint`."""
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    print(f"{case}: {err.value}")
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(deep_merge(chart.values, values))
    report = helm.lint(str(CHART), values, namespace="prod")
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), report


def assert_render_refuses(helm, chart, render, values: dict[str, Any], message: str) -> None:
    """`values` pass the chart's schema but the templates refuse them with `message` (also when
    another chart owns the pod and this one renders only the ConfigMap of key rules)."""
    chart.validate_schema(deep_merge(chart.values, values))  # the schema alone lets it through
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)
    if "keyLimits" in values:
        with pytest.raises(helm.HelmRenderError, match=message):
            render({**values, "deployment": {"enabled": False}})


# Value sets rendered, linted and validated by several tests.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "capped-native": {"maxClients": 4},
    "classic-everything-on": {
        "nativeSidecar": False,
        "maxClients": 250,
        "ports": {"client": 8081, "admin": 9191},
        "logFormat": "json",
        "logLevel": "debug,hyper=info",
        "accessLog": False,
        "readyHighWatermark": 0.9,
        "readyLowWatermark": 0.7,
        "admissionRate": 50,
        "admissionBurst": 100,
        "maxClientsPerIp": 20,
        "maxPlainRequests": 300,
        "trustedHops": 1,
        "maxConnectionLifetime": "1h",
        "closeCodeLifetime": 1012,
        "podMonitor": {"enabled": True, "interval": "30s"},
        "prometheusRule": {"enabled": True, "saturation": {"threshold": 0.9, "for": "10m"}},
        "grafanaDashboard": {"enabled": True, "folder": "wsgate"},
        "autoscaling": {"enabled": True},
    },
    "long-grace": {
        "terminationGracePeriodSeconds": 120,
        "shutdownGrace": "100s",
        "shutdownDelay": "10s",
        "drainPeriod": "1m",
        "maxClients": 10000,
        "probes": {"readiness": {"periodSeconds": 3, "failureThreshold": 2}},
    },
    "standalone-no-service": {"app": {"enabled": False}, "nativeSidecar": False, "upstream": "chat-backend:3000",
                              "service": {"enabled": False}, "maxClients": 1},
    # docs/operations.md#unix-socket-upstream: the app's Unix socket in a shared emptyDir.
    "unix-socket-emptydir": {"upstream": "unix:/run/app/ws.sock", "upstreamSocket": {"emptyDir": True},
                             "maxClients": 100},
}


# Limits per key (docs/operations.md#limits-per-key). Not in VALUE_SETS: its WSGATE_CONFIG names a path that exists only in the
# pod, so the binary tests there could not load it; test_helm_key_limits.py renders, lints and
# validates it instead, and test_binary_accepts_chart_env.py feeds its config.toml to the binary.
# An override key with a quote and a backslash checks the chart's TOML escaping.
WEIRD_KEY = 'acme"eu"\\west'
KEY_LIMITS_VALUES: dict[str, Any] = {
    "keyLimits": [
        {"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 50,
         "overrides": {"big-customer": 500, "internal": 0, WEIRD_KEY: 7}},
        {"name": "user", "key": "jwt_claim:sub", "maxPerKey": 5, "pathPrefix": "/chat", "missing": "reject",
         "status": 503, "maxKeys": 1000000, "fleet": False},
        {"name": "room", "key": "path_segment:2", "maxPerKey": 200, "missing": "allow"},
    ],
    "jwt": {"jwksSecret": {"name": "auth-jwks", "key": "jwks.json"}, "issuer": "https://auth.example.com/",
            "audience": "chat", "requireExp": False, "from": "query:access_token"},
    "adminToken": {"secretName": "wsgate-admin", "key": "token"},
}
# Fleet-wide limits (docs/operations.md#fleet-wide-limits), every value set, with a fleet = true key rule. Not in VALUE_SETS
# either: a binary without §10 refuses WSGATE_FLEET_* as unknown keys, so test_helm_fleet.py renders,
# lints and validates it and test_binary_accepts_chart_env.py feeds its env to the binary on its own.
FLEET_VALUES: dict[str, Any] = {
    "maxClients": 500,
    "fleet": {"redisUrlSecret": {"name": "wsgate-redis", "key": "url"}, "namespace": "chat-eu",
              "maxClients": 2000, "leaseTtl": "45s", "timeout": "250ms", "failMode": "closed",
              "rebalance": {"enabled": True, "tolerance": 0.2, "after": "1m", "period": "45s",
                            "cooldown": "5m", "closeCode": 4012}},
    "keyLimits": [
        {"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 100, "fleet": True},
        {"name": "room", "key": "path_segment:2", "maxPerKey": 20},
    ],
}
# fleet value -> the WSGATE_* variable it becomes (WSGATE_FLEET_REDIS_URL: redisUrl or redisUrlSecret).
FLEET_ENV = {"namespace": "WSGATE_FLEET_NAMESPACE", "maxClients": "WSGATE_FLEET_MAX_CLIENTS",
             "leaseTtl": "WSGATE_FLEET_LEASE_TTL", "timeout": "WSGATE_FLEET_TIMEOUT",
             "failMode": "WSGATE_FLEET_FAIL_MODE"}
# Automatic rebalancing (docs/operations.md#automatic-rebalancing): fleet.rebalance value -> (the
# WSGATE_* variable it becomes, wsgate's default, rendered as nothing), and what FLEET_VALUES renders.
# Rendered only with a Redis, like the WSGATE_FLEET_* variables.
REBALANCE_ENV: dict[str, tuple[str, Any]] = {
    "enabled": ("WSGATE_REBALANCE", False),
    "tolerance": ("WSGATE_REBALANCE_TOLERANCE", 0.1),
    "after": ("WSGATE_REBALANCE_AFTER", "30s"),
    "period": ("WSGATE_REBALANCE_PERIOD", "30s"),
    "cooldown": ("WSGATE_REBALANCE_COOLDOWN", "2m"),
    "closeCode": ("WSGATE_CLOSE_CODE_REBALANCE", 1012),
}
REBALANCE_RENDERED = {
    "WSGATE_REBALANCE": "true",
    "WSGATE_REBALANCE_TOLERANCE": "0.2",
    "WSGATE_REBALANCE_AFTER": "1m",
    "WSGATE_REBALANCE_PERIOD": "45s",
    "WSGATE_REBALANCE_COOLDOWN": "5m",
    "WSGATE_CLOSE_CODE_REBALANCE": "4012",
}

# Message guards (docs/operations.md#message-guards), every value away from its default. Not in VALUE_SETS either: a binary
# without §11 refuses WSGATE_MAX_MESSAGE_SIZE and the rest as unknown keys, so
# test_helm_message_guards.py renders, lints and validates it and test_binary_accepts_chart_env.py
# feeds its env to the binary on its own. 16 MiB checks that large integers never come out as 1.6e+07.
MESSAGE_GUARDS_VALUES: dict[str, Any] = {
    "messageGuards": {"maxMessageSize": 16777216, "messageRate": 2.5, "messageBurst": 10,
                      "messageRateAction": "close", "byteRate": 1048576, "byteBurst": 4194304,
                      "maxFragments": 64},
}
# messageGuards value -> (the WSGATE_* variable it becomes, its default, rendered as nothing; off but
# for maxFragments).
MESSAGE_GUARDS_ENV: dict[str, tuple[str, Any]] = {
    "maxMessageSize": ("WSGATE_MAX_MESSAGE_SIZE", 0),
    "messageRate": ("WSGATE_MESSAGE_RATE", 0),
    "messageBurst": ("WSGATE_MESSAGE_BURST", 0),
    "messageRateAction": ("WSGATE_MESSAGE_RATE_ACTION", "throttle"),
    "byteRate": ("WSGATE_BYTE_RATE", 0),
    "byteBurst": ("WSGATE_BYTE_BURST", 0),
    "maxFragments": ("WSGATE_MAX_FRAGMENTS", 1024),
}

# The handshake policy and the signals to clients (docs/configuration.md: allowed_origins,
# require_origin, subprotocols, require_subprotocol, refusal_mode, max_close_refusals, ping_interval,
# pong_timeout, send_timeout), every value away from its default. Not in VALUE_SETS either: a binary
# without these keys refuses WSGATE_ALLOWED_ORIGINS and the rest as unknown keys, so
# test_helm_handshake.py renders, lints and validates it and test_binary_accepts_chart_env.py feeds
# its env to the binary on its own.
HANDSHAKE_VALUES: dict[str, Any] = {
    "handshake": {"allowedOrigins": ["https://chat.example.com", "https://*.example.com", "null"],
                  "requireOrigin": True, "subprotocols": ["chat.v2", "chat.v1"], "requireSubprotocol": True},
    "refusalMode": "close",
    "maxCloseRefusals": 256,
    "clientPings": {"interval": "30s", "pongTimeout": "5s"},
    "sendTimeout": "1m",
}
# Where each of those values lives in the chart's values (a dotted path) -> (the WSGATE_* variable it
# becomes, its default, rendered as nothing), and what HANDSHAKE_VALUES renders for it.
HANDSHAKE_ENV: dict[str, tuple[str, Any]] = {
    "handshake.allowedOrigins": ("WSGATE_ALLOWED_ORIGINS", []),
    "handshake.requireOrigin": ("WSGATE_REQUIRE_ORIGIN", False),
    "handshake.subprotocols": ("WSGATE_SUBPROTOCOLS", []),
    "handshake.requireSubprotocol": ("WSGATE_REQUIRE_SUBPROTOCOL", False),
    "refusalMode": ("WSGATE_REFUSAL_MODE", "status"),
    "maxCloseRefusals": ("WSGATE_MAX_CLOSE_REFUSALS", 1024),
    "clientPings.interval": ("WSGATE_PING_INTERVAL", "0s"),
    "clientPings.pongTimeout": ("WSGATE_PONG_TIMEOUT", "10s"),
    "sendTimeout": ("WSGATE_SEND_TIMEOUT", "0s"),
}
HANDSHAKE_RENDERED = {
    "WSGATE_ALLOWED_ORIGINS": "https://chat.example.com,https://*.example.com,null",
    "WSGATE_REQUIRE_ORIGIN": "true",
    "WSGATE_SUBPROTOCOLS": "chat.v2,chat.v1",
    "WSGATE_REQUIRE_SUBPROTOCOL": "true",
    "WSGATE_REFUSAL_MODE": "close",
    "WSGATE_MAX_CLOSE_REFUSALS": "256",
    "WSGATE_PING_INTERVAL": "30s",
    "WSGATE_PONG_TIMEOUT": "5s",
    "WSGATE_SEND_TIMEOUT": "1m",
}


def at_path(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for the dotted path "a.b"."""
    head, _, rest = path.partition(".")
    return {head: at_path(rest, value) if rest else value}


# keyLimits field (camelCase value) -> [[key_limits]] key in wsgate's TOML.
KEY_LIMIT_FIELDS = {"name": "name", "key": "key", "maxPerKey": "max_per_key", "overrides": "overrides",
                    "pathPrefix": "path_prefix", "missing": "missing", "status": "status",
                    "maxKeys": "max_keys", "fleet": "fleet"}


def expected_key_limits(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The [[key_limits]] tables a set of values should produce: the fields given, renamed."""
    return [{KEY_LIMIT_FIELDS[k]: v for k, v in rule.items()} for rule in values.get("keyLimits", [])]


class Rendered:
    """The objects one `helm template` run produced, keyed for easy lookup."""

    def __init__(self, manifests: dict[str, str]):
        self.files = manifests
        self.objects: list[dict[str, Any]] = []
        for name, text in sorted(manifests.items()):
            if name.endswith("NOTES.txt"):
                continue
            self.objects.extend(load_yaml_docs(text))
        self.notes = next((t for n, t in manifests.items() if n.endswith("NOTES.txt")), "")

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def one(self, kind: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {len(found)}: {self.kinds()}"
        return found[0]

    def maybe(self, kind: str) -> dict[str, Any] | None:
        found = [o for o in self.objects if o["kind"] == kind]
        return found[0] if found else None

    def named(self, kind: str, suffix: str) -> dict[str, Any] | None:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
        assert len(found) <= 1, found
        return found[0] if found else None

    def config_toml(self) -> str | None:
        """config.toml of the keyLimits ConfigMap (<fullname>-config), None when it is not rendered."""
        cm = self.named("ConfigMap", "-config")
        return cm["data"]["config.toml"] if cm else None


@pytest.fixture(scope="session")
def helm():
    import helm_python

    return helm_python


@pytest.fixture(scope="session")
def chart(helm) -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as c:
        yield c


# The APIs of the CRDs the chart can render objects of. The chart fails the render when an object
# is enabled and its API is not served (templates/_ecosystem.tpl: wsgate.requireApi); `render`
# passes these by default, as a cluster with the Prometheus Operator and KEDA installed would
# (`helm template --api-versions ...`); tests of the refusal pass fewer.
CRD_API_VERSIONS = ["monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/ServiceMonitor",
                    "monitoring.coreos.com/v1/PrometheusRule", "keda.sh/v1alpha1/ScaledObject"]


def render_manifests(chart, values: dict[str, Any] | None, *, name: str, namespace: str,
                     api_versions: list[str] | None = None) -> dict[str, str]:
    """`helm template` through Helm's engine, with `--api-versions`. helm-python-sdk's
    Chart.render does not forward api_versions (0.2.2), although the engine it wraps
    (helm-c-sdk's helm_render) reads them from the same options object: call that directly."""
    from helm_python import _native

    opts = {"name": name, "namespace": namespace, "is_install": True,
            "api_versions": list(CRD_API_VERSIONS if api_versions is None else api_versions)}
    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)))


@pytest.fixture(scope="session")
def render(chart):
    def _render(values: dict[str, Any] | None = None, name: str = "chat", namespace: str = "prod",
                api_versions: list[str] | None = None) -> Rendered:
        return Rendered(render_manifests(chart, values, name=name, namespace=namespace, api_versions=api_versions))

    return _render


def wsgate_container(deployment: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The wsgate container of a Deployment and whether it is a native sidecar."""
    spec = deployment["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) or []:
        if c["name"] == "wsgate":
            return c, True
    for c in spec["containers"]:
        if c["name"] == "wsgate":
            return c, False
    raise AssertionError("no wsgate container")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []) or [])
    return out


def readme_section(path: Path, heading: str) -> str:
    """The `## heading` section of a README, up to the next `## ` (its `###` subsections included)."""
    readme = path.read_text()
    assert f"\n## {heading}\n" in readme, f"{path} has no section ## {heading}"
    return readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def chart_readme_section(heading: str) -> str:
    """The chart README's `## heading` section, up to the next `## `."""
    return readme_section(CHART / "README.md", heading)


def fenced(section: str, lang: str) -> str:
    """The first ```lang block of `section`."""
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def parent_chart(tmp_path: Path, wsgate_values: dict, with_volumes: bool = False,
                 container_context: str = '(dict "Values" .Values.wsgate "Chart" .Subcharts.wsgate.Chart)') -> Path:
    """A chart `myapp` that has wsgate as a subchart and includes `wsgate.container` in its own
    Deployment (and `wsgate.volumes` with `with_volumes`), the way the chart README says to.
    `container_context` is what the parent passes to `wsgate.container`."""
    parent = tmp_path / "myapp"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "myapp", "version": "1.0.0",
        "dependencies": [{"name": "wsgate", "version": "0.1.0"}],
    }))
    (parent / "values.yaml").write_text(yaml.safe_dump({"wsgate": wsgate_values}))
    shutil.copytree(CHART, parent / "charts" / "wsgate")
    (parent / "templates" / "deployment.yaml").write_text(("""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
spec:
  selector:
    matchLabels: {app: myapp}
  template:
    metadata:
      labels: {app: myapp}
    spec:
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .Values.wsgate.terminationGracePeriodSeconds }}
      initContainers:
        - {{ include "wsgate.container" CONTAINER_CONTEXT | nindent 10 | trim }}
      containers:
        - name: myapp
          image: registry.example.com/myapp:2
""" + ("""\
      volumes:
        {{- include "wsgate.volumes" (dict "Values" .Values.wsgate "Release" .Release "Chart" (dict "Name" "wsgate")) | trim | nindent 8 }}
""" if with_volumes else "")).replace("CONTAINER_CONTEXT", container_context))
    return parent
