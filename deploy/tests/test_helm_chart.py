"""The Helm chart, rendered and linted by Helm's own Go engine (helm-python-sdk bundles Helm's SDK).

Checks that values reach the pod spec (cap, ports, probes, every SPEC key as WSGATE_* env), the
native-sidecar switch, the monitoring toggles, and that bad values are refused by
values.schema.json or by the template checks JSON Schema cannot express.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import (
    parent_chart,
    CHART,
    CHART_DASHBOARD,
    DASHBOARD,
    OPTIONAL_ENV,
    RULES_FILE,
    VALUE_SETS,
    chart_env_names,
    env_of,
    spec_env_names,
    spec_md_keys,
    wsgate_container,
)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_reports_no_errors_or_warnings(helm, name):
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace="prod")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


def test_chart_lints_for_the_oldest_supported_kubernetes(helm, chart):
    # Native sidecars need 1.29; Chart.yaml says so (helm install enforces kubeVersion).
    assert chart.metadata["kubeVersion"] == ">=1.29.0-0"
    ok = helm.lint(str(CHART), {}, strict=True, kube_version="v1.29.0")
    assert ok["errors"] == [], ok


def test_standalone_wsgate_fronts_a_remote_upstream(render):
    r = render(VALUE_SETS["standalone-no-service"])
    assert r.kinds() == ["Deployment", "PodDisruptionBudget"]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["wsgate"] and "initContainers" not in pod
    assert env_of(pod["containers"][0])["WSGATE_UPSTREAM"] == "chat-backend:3000"


def test_chart_metadata(chart, helm):
    assert chart.name == "wsgate"
    # appVersion against Cargo.toml's version and the image reference: test_release.py.
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.schema is not None, "values.schema.json must ship with the chart"
    helm.validate_release_name("chat")


def test_default_render_has_deployment_service_and_disruption_budget(render):
    # replicaCount 2: the automatic PodDisruptionBudget is on (test_helm_ecosystem.py has the rest).
    r = render()
    assert r.kinds() == ["Deployment", "PodDisruptionBudget", "Service"]


def test_every_spec_key_is_an_env_var(render):
    env = env_of(wsgate_container(render().one("Deployment"))[0])
    wanted = set(chart_env_names()) - OPTIONAL_ENV
    assert wanted <= set(env), f"missing: {sorted(wanted - set(env))}"
    assert set(env) <= set(chart_env_names()), f"unknown: {sorted(set(env) - set(chart_env_names()))}"
    # The optional one appears once it is given.
    env2 = env_of(wsgate_container(render({"readyHighWatermark": 0.9, "readyLowWatermark": 0.5}).one("Deployment"))[0])
    assert env2["WSGATE_READY_LOW_WATERMARK"] == "0.5"
    assert env2["WSGATE_READY_HIGH_WATERMARK"] == "0.9"


def test_env_list_matches_the_shared_spec():
    keys = spec_md_keys()
    if keys is None:
        pytest.skip("shared/SPEC.md not found beside the repository")
    assert sorted(keys) == sorted(k.removeprefix("WSGATE_").lower() for k in spec_env_names())


def test_every_spec_key_has_a_camelcase_value(chart):
    values = chart.values
    for env in chart_env_names():
        key = env.removeprefix("WSGATE_").lower()
        if key in ("listen", "admin_listen"):
            continue  # derived from ports.client / ports.admin and listenHost
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)
        assert camel in values, f"values.yaml has no {camel} for {key}"


def test_values_reach_the_container(render):
    r = render(VALUE_SETS["classic-everything-on"])
    c, native = wsgate_container(r.one("Deployment"))
    assert not native
    env = env_of(c)
    assert env["WSGATE_MAX_CLIENTS"] == "250"
    assert env["WSGATE_LISTEN"] == "0.0.0.0:8081"
    assert env["WSGATE_ADMIN_LISTEN"] == "0.0.0.0:9191"
    assert env["WSGATE_UPSTREAM"] == "127.0.0.1:3000"
    assert env["WSGATE_LOG_FORMAT"] == "json"
    assert env["WSGATE_LOG_LEVEL"] == "debug,hyper=info"
    assert env["WSGATE_ACCESS_LOG"] == "false"
    assert env["WSGATE_ADMISSION_RATE"] == "50"
    assert env["WSGATE_ADMISSION_BURST"] == "100"
    assert env["WSGATE_MAX_CLIENTS_PER_IP"] == "20"
    assert env["WSGATE_MAX_PLAIN_REQUESTS"] == "300"
    assert env["WSGATE_TRUSTED_HOPS"] == "1"
    assert env["WSGATE_MAX_CONNECTION_LIFETIME"] == "1h"
    assert env["WSGATE_CLOSE_CODE_LIFETIME"] == "1012"
    assert env["WSGATE_READY_LOW_WATERMARK"] == "0.7"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"ws": 8081, "admin": 9191}
    # Large caps must not come out in float notation (1e+06).
    env = env_of(wsgate_container(render({"maxClients": 1000000}).one("Deployment"))[0])
    assert env["WSGATE_MAX_CLIENTS"] == "1000000"


def test_cap_and_probes_defaults_follow_the_rollout_safe_profile(render):
    r = render({"maxClients": 4})
    dep = r.one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    c, native = wsgate_container(dep)
    env = env_of(c)
    assert native and c["restartPolicy"] == "Always"
    assert env["WSGATE_MAX_CLIENTS"] == "4"
    assert env["WSGATE_SHUTDOWN_GRACE"] == "25s"
    assert env["WSGATE_SHUTDOWN_DELAY"] == "5s"
    assert env["WSGATE_DRAIN_PERIOD"] == "15s"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["enableServiceLinks"] is False
    rp = c["readinessProbe"]
    assert rp["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert rp["periodSeconds"] == 2 and rp["failureThreshold"] == 1
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["readOnlyRootFilesystem"] is True
    # The app runs in `containers`, wsgate only in initContainers; beside the app, the prestop
    # container that has wsgate drain at a deletion while the app pauses (shutdownDelay 5s +
    # drainPeriod 15s + closeTimeout 2s).
    assert [x["name"] for x in pod["containers"]] == ["app", "wsgate-prestop"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 22}}
    hook = pod["containers"][1]
    assert hook["image"] == c["image"] and hook["args"] == ["prestop", "--admin", "127.0.0.1:9090"]
    assert "lifecycle" not in hook and "ports" not in hook and "readinessProbe" not in hook
    # A pinned digest pins the hook's image too: both containers run the same build.
    digest = "sha256:" + "ab" * 32
    pinned = render({"maxClients": 4, "image": {"digest": digest}}).one("Deployment")["spec"]["template"]["spec"]
    assert pinned["containers"][1]["image"] == pinned["initContainers"][0]["image"] == f"ghcr.io/wsgate/wsgate@{digest}"
    assert "4 concurrent connections" in r.notes


def test_probe_values_are_used(render):
    c, _ = wsgate_container(render(VALUE_SETS["long-grace"]).one("Deployment"))
    assert c["readinessProbe"]["periodSeconds"] == 3
    assert c["readinessProbe"]["failureThreshold"] == 2


def test_classic_sidecar_is_a_second_container_and_the_app_outlives_the_drain(render):
    pod = render({"nativeSidecar": False}).one("Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    names = [c["name"] for c in pod["containers"]]
    assert names == ["app", "wsgate"]
    wsgate = pod["containers"][1]
    assert "restartPolicy" not in wsgate
    # shutdownDelay 5s + drainPeriod 15s + closeTimeout 2s
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 22}}


def test_service_targets_the_wsgate_port(render):
    r = render({"ports": {"client": 8081, "admin": 9191}, "service": {"port": 8000}})
    svc = r.one("Service")
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "ws"
    c, _ = wsgate_container(r.one("Deployment"))
    assert {"name": "ws", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("toggle,kind", [
    ("podMonitor", "PodMonitor"),
    ("prometheusRule", "PrometheusRule"),
    ("grafanaDashboard", "ConfigMap"),
    ("autoscaling", "HorizontalPodAutoscaler"),
])
def test_toggles(render, toggle, kind):
    assert render({"maxClients": 10}).maybe(kind) is None
    assert render({"maxClients": 10, toggle: {"enabled": True}}).maybe(kind) is not None


def test_podmonitor_scrapes_the_admin_port_of_the_pods(render):
    r = render({"podMonitor": {"enabled": True, "interval": "30s"}})
    pm = r.one("PodMonitor")
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "admin" and ep["path"] == "/metrics" and ep["interval"] == "30s"
    labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dashboard_configmap_carries_the_grafana_label_and_the_dashboard(render):
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), \
        "deploy/helm/wsgate/dashboards/wsgate.json must be a copy of grafana/wsgate.json"
    cm = render({"grafanaDashboard": {"enabled": True, "folder": "Edge"}}).one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Edge"
    assert json.loads(cm["data"]["wsgate.json"]) == json.loads(DASHBOARD.read_text())


# The plain rule file's WsgateTargetMissing selects the targets of deploy/kubernetes/podmonitor.yaml
# (a PodMonitor named wsgate: job <namespace>/wsgate); the chart's own default is its monitor's job.
PLAIN_TARGET_SELECTOR = 'job=~".+/wsgate"'


def test_prometheusrule_equals_the_plain_rule_file_at_default_values(render):
    pr = render({"prometheusRule": {"enabled": True, "targetMissing": {"selector": PLAIN_TARGET_SELECTOR}}}
                ).one("PrometheusRule")
    plain = yaml.safe_load(RULES_FILE.read_text())
    assert pr["spec"]["groups"] == plain["groups"]
    expr = next(r["expr"] for r in plain["groups"][0]["rules"] if r["alert"] == "WsgateTargetMissing")
    assert expr.split() == f"up{{{PLAIN_TARGET_SELECTOR}}} == 0 or absent(up{{{PLAIN_TARGET_SELECTOR}}})".split()


def test_prometheusrule_thresholds_are_values(render):
    pr = render({"prometheusRule": {
        "enabled": True, "additionalAlertLabels": {"team": "chat"},
        "saturation": {"threshold": 0.9, "for": "10m", "severity": "critical"},
        "rejecting": {"threshold": 0.2, "minRefusals": 30, "for": "3m", "severity": "warning"},
        "originRefusals": {"threshold": 2.5, "for": "30m", "severity": "critical"},
        "upstreamErrors": {"threshold": 50, "for": "4m", "severity": "critical"},
        "notReady": {"for": "15m", "severity": "info"},
        "keyPinned": {"threshold": 0.9, "for": "20m"},
        "fleetRedisDown": {"for": "3m"},
        "abnormalCloses": {"threshold": 0.07, "minSessions": 50, "for": "15m"},
        "configReloadFailed": {"window": "1h", "for": "1m"},
        "descriptorsNearLimit": {"threshold": 0.95, "for": "2m"},
        "targetMissing": {"selector": 'job="edge"', "for": "10m", "severity": "warning"},
    }}).one("PrometheusRule")
    rules = {r["alert"]: r for r in pr["spec"]["groups"][0]["rules"]}
    assert rules["WsgateSaturationHigh"]["expr"].strip().endswith("> 0.9")
    assert rules["WsgateSaturationHigh"]["for"] == "10m"
    assert "90%" in rules["WsgateSaturationHigh"]["annotations"]["description"]
    ratio, guard = rules["WsgateRejectingConnections"]["expr"].split("\nand\n")
    assert ratio.strip().endswith("> 0.2") and guard.strip().endswith(">= 30"), rules["WsgateRejectingConnections"]
    assert rules["WsgateRejectingConnections"]["for"] == "3m"
    assert "more than 20% and at least 30 refusals, for 3m" in rules["WsgateRejectingConnections"]["annotations"]["description"]
    origin = rules["WsgateOriginRefusals"]
    assert origin["expr"].strip().endswith('{reason="origin"}[5m])) > 2.5') and origin["for"] == "30m"
    assert "For 30m more than 2.5 upgrades per second" in origin["annotations"]["description"]
    assert rules["WsgateUpstreamErrors"]["expr"].strip().endswith("> 50")
    assert rules["WsgatePodNotReady"]["for"] == "15m"
    assert rules["WsgateKeyPinnedAtLimit"]["expr"].strip().endswith(">= 0.9")
    assert rules["WsgateKeyPinnedAtLimit"]["for"] == "20m"
    assert "90% or more" in rules["WsgateKeyPinnedAtLimit"]["annotations"]["description"]
    assert rules["WsgateFleetRedisDown"]["for"] == "3m"
    assert "(for 3m)" in rules["WsgateFleetRedisDown"]["annotations"]["summary"]
    assert "timing out for 3m" in rules["WsgateFleetRedisDown"]["annotations"]["description"]
    abnormal = rules["WsgateAbnormalCloses"]
    ratio, guard = abnormal["expr"].split("\nand\n")
    assert ratio.strip().endswith("> 0.07") and guard.strip().endswith(">= 50"), abnormal["expr"]
    assert abnormal["for"] == "15m"
    # 0.07 x 100 is 7.000000000000001 in floating point: the text says 7%.
    assert "More than 7% of the WebSocket sessions" in abnormal["annotations"]["description"]
    assert "(at least 50 ended in that window), for 15m:" in abnormal["annotations"]["description"]
    reload = rules["WsgateConfigReloadFailed"]
    assert '{result="failure"}[1h]' in reload["expr"] and reload["for"] == "1m"
    assert "within the last 1h" in reload["annotations"]["description"]
    fds = rules["WsgateDescriptorsNearLimit"]
    assert fds["expr"].strip().endswith("> 0.95") and fds["for"] == "2m"
    assert "More than 95% of" in fds["annotations"]["description"]
    missing = rules["WsgateTargetMissing"]
    assert missing["expr"].split() == 'up{job="edge"} == 0 or absent(up{job="edge"})'.split()
    assert missing["for"] == "10m"
    severities = {name: r["labels"]["severity"] for name, r in rules.items()}
    assert severities == {
        "WsgateSaturationHigh": "critical", "WsgateRejectingConnections": "warning", "WsgateOriginRefusals": "critical",
        "WsgateUpstreamErrors": "critical",
        "WsgatePodNotReady": "info", "WsgateKeyPinnedAtLimit": "warning", "WsgateFleetRedisDown": "warning",
        "WsgateAbnormalCloses": "warning", "WsgateConfigReloadFailed": "warning",
        "WsgateDescriptorsNearLimit": "warning", "WsgateTargetMissing": "warning"}
    for r in rules.values():
        assert r["labels"] == {"severity": severities[r["alert"]], "team": "chat"}


def test_hpa_targets_the_deployment_on_active_connections(render):
    r = render({"maxClients": 100, "autoscaling": {"enabled": True, "maxReplicas": 7}})
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == r.one("Deployment")["metadata"]["name"]
    (m,) = hpa["spec"]["metrics"]
    assert m["pods"]["metric"]["name"] == "wsgate_connections_active"
    assert m["pods"]["target"]["averageValue"] == "70"
    assert hpa["spec"]["maxReplicas"] == 7
    assert "replicas" not in r.one("Deployment")["spec"], "the HPA owns the replica count"


# Refused by values.schema.json (so `helm lint` reports them too) ...
SCHEMA_REFUSES = {
    "negative maxClients", "fractional maxClients", "string maxClients", "unknown logFormat",
    "bad duration", "reserved close code", "unknown value", "access log not a boolean",
}
# ... or by wsgate.validate's `fail` at render time. Helm's lint runs templates in lint mode,
# where `fail` only logs, so lint cannot report these: install/template/render do.
BAD_VALUES = {
    "negative maxClients": {"maxClients": -1},
    "fractional maxClients": {"maxClients": 1.5},
    "string maxClients": {"maxClients": "many"},
    "unknown logFormat": {"logFormat": "xml"},
    "grace longer than termination": {"shutdownGrace": "40s"},
    "grace equal to termination": {"shutdownGrace": "30s"},
    "termination shorter than grace": {"terminationGracePeriodSeconds": 20},
    "grace in minutes too long": {"shutdownGrace": "1m"},
    "delay plus drain above grace": {"shutdownDelay": "15s"},
    "bad duration": {"retryAfter": "soon"},
    "reserved close code": {"closeCodeDrain": 1005},
    "low watermark above high": {"readyHighWatermark": 0.5, "readyLowWatermark": 0.6},
    "low watermark above the automatic high": {"maxClients": 100, "readyLowWatermark": 0.9},
    "access log not a boolean": {"accessLog": "yes"},
    "unknown value": {"maxClient": 4},
    "no app with a native sidecar": {"app": {"enabled": False}, "upstream": "backend:80"},
    "no app and no upstream": {"app": {"enabled": False}, "nativeSidecar": False},
    # docs/operations.md#pod-deletion: the app must pause through the drain and then have time to exit.
    "app pause shorter than the drain": {"app": {"preStopSleepSeconds": 21}},
    "app pause shorter than the drain, classic": {"app": {"preStopSleepSeconds": 20}, "nativeSidecar": False},
    "no time left for the app after its pause": {"terminationGracePeriodSeconds": 23, "shutdownGrace": "22s"},
}


def test_pod_deletion_errors_name_the_values(helm, render):
    with pytest.raises(helm.HelmRenderError, match=r"app.preStopSleepSeconds \(21\) must be at least .* 22"):
        render({"app": {"preStopSleepSeconds": 21}})
    with pytest.raises(helm.HelmRenderError, match=r"terminationGracePeriodSeconds \(23\) must be at least"):
        render({"terminationGracePeriodSeconds": 23, "shutdownGrace": "22s"})
    # Enough of both renders, and an explicit longer pause is kept.
    pod = render({"app": {"preStopSleepSeconds": 25}, "terminationGracePeriodSeconds": 27}).one("Deployment")
    assert pod["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 25


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused(helm, render, case):
    values = BAD_VALUES[case]
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        render(values)
    print(f"{case}: {err.value}")
    if case in SCHEMA_REFUSES:
        assert isinstance(err.value, helm.HelmValuesError)
        report = helm.lint(str(CHART), values, namespace="prod")
        assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), report
    else:
        assert isinstance(err.value, helm.HelmRenderError)


def test_schema_alone_refuses_what_it_can_express(chart, helm):
    for values in ({"maxClients": -1}, {"maxClients": 1.5}, {"logFormat": "xml"},
                   {"terminationGracePeriodSeconds": 0}, {"shutdownGrace": "forever"}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
    chart.validate_schema({"maxClients": 0})
    chart.validate_schema({"maxClients": 100000, "logFormat": "json", "shutdownGrace": "1m 30s"})


def test_grace_check_names_the_values(render, helm):
    with pytest.raises(helm.HelmRenderError, match=r"shutdownGrace \(40s\).*terminationGracePeriodSeconds \(30"):
        render({"shutdownGrace": "40s"})
    # Milliseconds are understood: 29999ms < 30 s is accepted.
    render({"shutdownGrace": "29999ms", "drainPeriod": "10s"})


def test_chart_readme_documents_every_value(chart):
    readme = (CHART / "README.md").read_text()
    for key in chart.values:
        assert f"`{key}" in readme, f"README.md values table lacks {key}"
    assert "shutdownDelay" in readme and "probe period" in readme.lower()




def test_named_template_can_be_included_by_another_chart(helm, tmp_path):
    parent = parent_chart(tmp_path, {"maxClients": 64, "deployment": {"enabled": False},
                                      "service": {"enabled": False}, "app": {"port": 5000}})
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    deps = [d for d in docs if d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deps] == ["myapp"], "only the parent's Deployment"
    c, native = wsgate_container(deps[0])
    assert native
    env = env_of(c)
    assert env["WSGATE_MAX_CLIENTS"] == "64"
    assert env["WSGATE_UPSTREAM"] == "127.0.0.1:5000"
    report = helm.lint(str(parent), strict=True)
    assert report["errors"] == [], report


def test_named_template_enforces_the_grace_check_for_other_charts(helm, tmp_path):
    parent = parent_chart(tmp_path, {"shutdownGrace": "40s", "deployment": {"enabled": False},
                                      "service": {"enabled": False}})
    with helm.Chart.load(str(parent)) as c:
        with pytest.raises(helm.HelmRenderError, match="shutdownGrace"):
            c.render({}, name="myapp")
