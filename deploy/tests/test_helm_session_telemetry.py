"""Session telemetry and operator controls (SPEC §12, issue 14) in the Helm chart: `accessLog`
rendered as WSGATE_ACCESS_LOG; `readyHighWatermark` automatic (SPEC §7: 0.9 whenever maxClients is
set, off without a cap, an explicit number winning) and the low-watermark check made against the
value actually rendered; the admin token, which now also enables POST/DELETE/GET /drain, mounted as
before and shown commented out in the plain manifests.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from conftest import (
    KUBE_DIR,
    assert_render_refuses,
    assert_schema_refuses,
    deep_merge,
    env_of,
    load_yaml_docs,
    parent_chart,
    wsgate_container,
)
from test_kubernetes_schemas import validate_all

ADMIN = {"adminToken": {"secretName": "wsgate-admin", "key": "token"}}

# Variants rendered, linted and validated against the Kubernetes schemas (test_chart_variants.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "access-log-off": {"accessLog": False, "maxClients": 100},
    "automatic-watermark-monitored": {"maxClients": 1500, "podMonitor": {"enabled": True},
                                      "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "watermark-explicitly-off": {"maxClients": 1500, "readyHighWatermark": 0},
    "admin-token-classic": {**ADMIN, "nativeSidecar": False, "maxClients": 500, "readyLowWatermark": 0.75},
    "abnormal-closes-thresholds": {"prometheusRule": {"enabled": True, "severity": "page", "abnormalCloses": {
        "threshold": 0.1, "minSessions": 0, "for": "30m"}}},
}


def container_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def env(r) -> dict[str, str]:
    return env_of(container_of(r))


# ---- accessLog -------------------------------------------------------------------------------------

def test_access_log_is_on_by_default_and_reaches_its_variable(render, chart):
    assert chart.values["accessLog"] is True
    on = container_of(render({}))
    assert env_of(on)["WSGATE_ACCESS_LOG"] == "true"
    off = container_of(render({"accessLog": False}))
    assert env_of(off)["WSGATE_ACCESS_LOG"] == "false"
    # Beside the other logging variable, and nothing else changes.
    names = [e["name"] for e in on["env"]]
    assert names[names.index("WSGATE_LOG_FORMAT") + 1] == "WSGATE_ACCESS_LOG"
    strip = lambda c: {**c, "env": [e for e in c["env"] if e["name"] != "WSGATE_ACCESS_LOG"]}  # noqa: E731
    assert strip(on) == strip(off)


def test_notes_say_where_the_access_log_goes(render):
    assert "Access log: one record per WebSocket session (target wsgate::access)" in render({}).notes
    assert "kubectl -n prod logs <pod> -c wsgate" in render({}).notes
    assert "Access log: off (accessLog=false)" in render({"accessLog": False}).notes


# ---- readyHighWatermark: automatic -----------------------------------------------------------------

WATERMARK_CASES = {
    # values -> WSGATE_READY_HIGH_WATERMARK
    "maxClients unset: off": ({}, "0"),
    "maxClients set: 0.9": ({"maxClients": 1500}, "0.9"),
    "maxClients set, explicit 0 wins: off": ({"maxClients": 1500, "readyHighWatermark": 0}, "0"),
    "maxClients set, explicit 0.8 wins": ({"maxClients": 1500, "readyHighWatermark": 0.8}, "0.8"),
    "maxClients unset, explicit 0.8 wins": ({"readyHighWatermark": 0.8}, "0.8"),
    "explicit 1": ({"maxClients": 10, "readyHighWatermark": 1}, "1"),
}


def test_ready_high_watermark_defaults_to_automatic(chart):
    assert chart.values["readyHighWatermark"] is None
    assert chart.values["readyLowWatermark"] is None


@pytest.mark.parametrize("case", list(WATERMARK_CASES))
def test_ready_high_watermark_rendered(render, case):
    values, want = WATERMARK_CASES[case]
    e = env(render(values))
    assert e["WSGATE_READY_HIGH_WATERMARK"] == want, e
    assert "WSGATE_READY_LOW_WATERMARK" not in e, "low stays the binary's default (0.1 below high)"


def test_low_watermark_is_checked_against_the_automatic_high(helm, chart, render):
    ok = env(render({"maxClients": 1500, "readyLowWatermark": 0.85}))
    assert (ok["WSGATE_READY_HIGH_WATERMARK"], ok["WSGATE_READY_LOW_WATERMARK"]) == ("0.9", "0.85")
    ok = env(render({"maxClients": 1500, "readyHighWatermark": 0.95, "readyLowWatermark": 0.9}))
    assert (ok["WSGATE_READY_HIGH_WATERMARK"], ok["WSGATE_READY_LOW_WATERMARK"]) == ("0.95", "0.9")
    # wsgate would exit 2 on these (low must be below high); the message says where high came from.
    assert_render_refuses(helm, chart, render, {"maxClients": 1500, "readyLowWatermark": 0.9},
                          r"readyLowWatermark \(0.9\) must be below readyHighWatermark \(0.9, automatic: 0.9 "
                          r"because maxClients is set\)")
    assert_render_refuses(helm, chart, render, {"readyLowWatermark": 0.5},
                          r"readyLowWatermark \(0.5\) must be below readyHighWatermark \(0, automatic: off "
                          r"because maxClients is 0\)")
    assert_render_refuses(helm, chart, render, {"maxClients": 1500, "readyHighWatermark": 0.5,
                                                "readyLowWatermark": 0.6},
                          r"readyLowWatermark \(0.6\) must be below readyHighWatermark \(0.5\)$")


def test_notes_give_the_readiness_watermark(render):
    notes = render({"maxClients": 1500}).notes
    assert ("Readiness: /readyz turns 503 at 0.9 of the cap (readyHighWatermark automatic: 0.9 with maxClients set), "
            "so the Service sends new clients to pods with room") in notes
    assert "Readiness: /readyz turns 503 at 0.8 of the cap, so" in render({"maxClients": 10, "readyHighWatermark": 0.8}).notes
    for values in ({}, {"maxClients": 1500, "readyHighWatermark": 0}):
        assert "Readiness:" not in render(values).notes, values


SCHEMA_REFUSES = {
    "watermark above 1": {"readyHighWatermark": 1.5},
    "watermark negative": {"readyHighWatermark": -0.1},
    "watermark as a string": {"readyHighWatermark": "0.9"},
    "watermark 'auto'": {"readyHighWatermark": "auto"},
    "access log as a string": {"accessLog": "false"},
    "access log as a number": {"accessLog": 0},
    "abnormal threshold 0": {"prometheusRule": {"abnormalCloses": {"threshold": 0}}},
    "abnormal threshold as a percentage": {"prometheusRule": {"abnormalCloses": {"threshold": 5}}},
    "abnormal minSessions fractional": {"prometheusRule": {"abnormalCloses": {"minSessions": 2.5}}},
    "abnormal for not a duration": {"prometheusRule": {"abnormalCloses": {"for": "ten minutes"}}},
    "abnormal unknown field": {"prometheusRule": {"abnormalCloses": {"minimumSessions": 20}}},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_values(helm, chart, render, case):
    assert_schema_refuses(helm, chart, render, case, SCHEMA_REFUSES[case])


def test_schema_accepts_every_documented_form(chart):
    for values in ({"readyHighWatermark": None}, {"readyHighWatermark": 0}, {"readyHighWatermark": 0.9},
                   {"readyHighWatermark": 1}, {"accessLog": True}, {"accessLog": False},
                   {"prometheusRule": {"abnormalCloses": {"threshold": 0.05, "minSessions": 0, "for": "10m"}}}):
        chart.validate_schema(deep_merge(chart.values, values))


def test_included_by_another_chart(helm, tmp_path):
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    for i, (values, high, log) in enumerate((({"maxClients": 64, "accessLog": False}, "0.9", "false"),
                                             ({"maxClients": 64, "readyHighWatermark": 0}, "0", "true"),
                                             ({}, "0", "true"))):
        parent = parent_chart(tmp_path / str(i), {**off, **values})
        with helm.Chart.load(str(parent)) as c:
            out = c.render({}, name="myapp", namespace="prod")
        docs = [d for n, t in out.items() if not n.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        e = env_of(wsgate_container(dep)[0])
        assert (e["WSGATE_READY_HIGH_WATERMARK"], e["WSGATE_ACCESS_LOG"]) == (high, log), values


# ---- the admin token --------------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_admin_token_is_mounted_as_a_directory_and_named_by_its_variable(render, native):
    r = render({**ADMIN, "nativeSidecar": native, "maxClients": 500})
    c, is_native = wsgate_container(r.one("Deployment"))
    assert is_native == native
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "wsgate-admin-token"]
    # A directory, never a subPath: the kubelet swaps a rotated Secret into the directory, and wsgate
    # re-reads the file when it changes, so a new token applies without a restart.
    assert mount == {"name": "wsgate-admin-token", "mountPath": "/etc/wsgate/admin", "readOnly": True}
    assert env_of(c)["WSGATE_ADMIN_TOKEN_FILE"] == "/etc/wsgate/admin/token"
    volumes = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["wsgate-admin-token"]["secret"] == {"secretName": "wsgate-admin",
                                                       "items": [{"key": "token", "path": "token"}]}
    # Without adminToken: no mount, no variable (the endpoints answer 404).
    bare = container_of(render({"nativeSidecar": native, "maxClients": 500}))
    assert "volumeMounts" not in bare and "WSGATE_ADMIN_TOKEN_FILE" not in env_of(bare)


def test_notes_show_the_drain_with_the_token(render):
    notes = render({**ADMIN, "adminToken": {"secretName": "ops-admin", "key": "bearer.txt"},
                    "ports": {"client": 8080, "admin": 9191}}).notes
    assert ("""TOKEN="$(kubectl -n prod get secret ops-admin -o jsonpath='{.data.bearer\\.txt}' | base64 -d)\""""
            in notes), notes
    assert "kubectl -n prod port-forward pod/<pod> 9090:9191" in notes
    assert """curl -s -H "Authorization: Bearer $TOKEN" -d '{"fraction":0.25,"period":"60s"}' 127.0.0.1:9090/drain""" in notes
    assert "(Close 1001)" in notes and "-X DELETE stops it" in notes
    assert "/drain" not in render({}).notes


def _uncommented_from(lines: list[str], start: int) -> list[str]:
    """The commented-out YAML from lines[start] on: `<indent># yaml` lines, uncommented to
    `<indent>yaml`, up to the first line that is not a comment or reads as prose rather than YAML
    (a key, a list item or a more indented line)."""
    out = []
    for line in lines[start:]:
        m = re.match(r"^(\s*)# (.*)$", line)
        if not m or not re.match(r"^(\s+\S|- |[A-Za-z_][\w.-]*:(\s|$))", m.group(2)):
            break
        out.append(m.group(1) + m.group(2))
    return out


def manifest_admin_token(file: str) -> dict[str, Any]:
    """The admin-token lines the plain manifest carries commented out, uncommented and parsed: the
    variable, the volumeMounts and volumes, and the Secret."""
    lines = (KUBE_DIR / file).read_text().splitlines()
    first = {key: [i for i, line in enumerate(lines) if re.match(pattern, line)]
             for key, pattern in (("env", r"^\s*# - name: WSGATE_ADMIN_TOKEN_FILE$"), ("mounts", r"^\s*# volumeMounts:$"),
                                  ("volumes", r"^\s*# volumes:$"), ("secret", r"^# apiVersion: v1$"))}
    assert all(len(at) == 1 for at in first.values()), first
    return {key: yaml.safe_load("\n".join(_uncommented_from(lines, at[0]))) for key, at in first.items()}


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_show_the_admin_token_as_the_chart_renders_it(render, file, tmp_path):
    """Uncommented, the plain manifest's admin-token lines are what the chart renders for
    adminToken {secretName: wsgate-admin, key: token}; the Deployment with them, and the Secret, pass
    the Kubernetes schemas."""
    block = manifest_admin_token(file)
    r = render({**ADMIN, "maxClients": 500, "logFormat": "json", "nativeSidecar": file.startswith("native")})
    chart_c = container_of(r)
    chart_pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert block["env"] == [e for e in chart_c["env"] if e["name"] == "WSGATE_ADMIN_TOKEN_FILE"]
    assert block["mounts"] == {"volumeMounts": chart_c["volumeMounts"]}
    assert block["volumes"] == {"volumes": chart_pod["volumes"]}
    secret = block["secret"]
    assert (secret["kind"], secret["metadata"]["name"], list(secret["stringData"])) == ("Secret", "wsgate-admin", ["token"])

    objs = load_yaml_docs((KUBE_DIR / file).read_text())
    dep = next(o for o in objs if o["kind"] == "Deployment")
    c, _ = wsgate_container(dep)
    assert "WSGATE_ADMIN_TOKEN_FILE" not in env_of(c) and "volumeMounts" not in c, "commented out by default"
    c["env"] += block["env"]
    c.update(block["mounts"])
    dep["spec"]["template"]["spec"].update(block["volumes"])
    assert env_of(c) == env_of(chart_c), "uncommented, the manifest's wsgate is the chart's"
    validate_all([dep, secret], tmp_path)


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_set_the_automatic_watermark_and_the_access_log(render, file):
    dep = next(o for o in load_yaml_docs((KUBE_DIR / file).read_text()) if o["kind"] == "Deployment")
    e = env_of(wsgate_container(dep)[0])
    assert int(e["WSGATE_MAX_CLIENTS"]) > 0
    assert e["WSGATE_READY_HIGH_WATERMARK"] == "0.9" == env(render({"maxClients": int(e["WSGATE_MAX_CLIENTS"])}))[
        "WSGATE_READY_HIGH_WATERMARK"]
    assert e["WSGATE_ACCESS_LOG"] == "true"
