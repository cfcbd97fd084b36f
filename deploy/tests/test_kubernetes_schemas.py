"""Every rendered chart object and every file in deploy/kubernetes/, validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors; offline).

PodMonitor, ServiceMonitor, PrometheusRule and ScaledObject are custom resources those schemas do
not cover: they are validated against the schemas of their CRDs (the Prometheus Operator's and
KEDA's, vendored in crds/; crd_schemas.py), strictly too, with their metadata checked as Kubernetes
ObjectMeta; a PrometheusRule's rules also go through promtool (test_prometheus_rules.py does the
rule file itself).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import crd_schemas
from conftest import (
    CRD_KINDS,
    KUBE_DIR,
    OPTIONAL_ENV,
    PROMTOOL_BIN,
    RULES_FILE,
    VALUE_SETS,
    chart_env_names,
    env_of,
    kube_files,
    load_yaml_docs,
    wsgate_container,
)

K8S_VERSION = kubernetes_validate.latest_version()


def validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}") from None


def validate_custom_resource(obj: dict[str, Any]) -> None:
    """Against its CRD's schema, and its metadata against ObjectMeta (as a ConfigMap's)."""
    crd_schemas.validate(obj)
    validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})


def check_podmonitor(pm: dict[str, Any]) -> None:
    sel = pm["spec"]["selector"]
    assert sel.get("matchLabels") or sel.get("matchExpressions"), "PodMonitor must select pods"
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep.get("port") == "admin" or ep.get("portNumber"), ep
        assert ep.get("path", "/metrics") == "/metrics"


def check_prometheusrule(pr: dict[str, Any], tmp_path: Path) -> None:
    for g in pr["spec"]["groups"]:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"], r
    # The spec of a PrometheusRule is a Prometheus rule file: let promtool judge it.
    f = tmp_path / f"{pr['metadata']['name']}-rules.yaml"
    f.write_text(yaml.safe_dump(pr["spec"]))
    res = subprocess.run([PROMTOOL_BIN, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def selector_matches(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        val = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and val not in e["values"]:
            return False
        if op == "NotIn" and val in e["values"]:
            return False
        if op == "Exists" and val is None:
            return False
        if op == "DoesNotExist" and val is not None:
            return False
    return True


def validate_all(objs: list[dict[str, Any]], tmp_path: Path) -> None:
    assert objs
    for o in objs:
        if o["kind"] in CRD_KINDS:
            validate_custom_resource(o)
            if o["kind"] == "PodMonitor":
                check_podmonitor(o)
            elif o["kind"] == "PrometheusRule":
                check_prometheusrule(o, tmp_path)
        else:
            validate(o)


def test_the_vendored_crds_are_the_custom_kinds_the_chart_renders():
    assert crd_schemas.kinds() == CRD_KINDS
    assert set(crd_schemas.schemas()) == {
        ("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"), ("keda.sh/v1alpha1", "ScaledObject")}


# A misspelt or mistyped field in each custom kind, which the CRD schemas (made strict) must refuse:
# without it a validation that checks nothing would pass too.
BROKEN_CUSTOM_RESOURCES = {
    "PodMonitor: podMetricEndpoints": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
        "spec": {"selector": {}, "podMetricEndpoints": [{"port": "admin"}]}},
    "PodMonitor: interval not a duration": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
        "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "admin", "interval": "often"}]}},
    "ServiceMonitor: endpoint field unknown": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "admin", "metricsPath": "/metrics"}]}},
    "PrometheusRule: rule without expr": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]}},
    "ScaledObject: minReplicas instead of minReplicaCount": {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "d"}, "minReplicas": 2,
                 "triggers": [{"type": "prometheus", "metadata": {"query": "1"}}]}},
    "ScaledObject: trigger metadata not strings": {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "d"},
                 "triggers": [{"type": "prometheus", "metadata": {"threshold": 70}}]}},
    "ScaledObject: metadata label not a string": {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x", "labels": {"release": 1}},
        "spec": {"scaleTargetRef": {"name": "d"}, "triggers": [{"type": "prometheus", "metadata": {}}]}},
}


@pytest.mark.parametrize("case", sorted(BROKEN_CUSTOM_RESOURCES))
def test_a_broken_custom_resource_is_refused(case):
    with pytest.raises(AssertionError) as err:
        validate_custom_resource(BROKEN_CUSTOM_RESOURCES[case])
    print(f"{case}: {err.value}")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_chart_is_valid_kubernetes(render, name, tmp_path):
    values = dict(VALUE_SETS[name])
    # Turn every optional object on so that each kind is validated in each value set.
    values.setdefault("podMonitor", {"enabled": True})
    values.setdefault("prometheusRule", {"enabled": True})
    values.setdefault("grafanaDashboard", {"enabled": True})
    values.setdefault("podDisruptionBudget", {"enabled": True})
    values.setdefault("networkPolicy", {"enabled": True})
    if values.get("maxClients", 0) > 0:
        values.setdefault("autoscaling", {"enabled": True})
    r = render(values)
    validate_all(r.objects, tmp_path)
    assert {"PodMonitor", "PrometheusRule", "PodDisruptionBudget", "NetworkPolicy"} <= set(r.kinds())


@pytest.mark.parametrize("path", kube_files(), ids=lambda p: p.name)
def test_example_manifest_is_valid_kubernetes(path, tmp_path):
    validate_all(load_yaml_docs(path.read_text()), tmp_path)


def _examples() -> dict[str, list[dict[str, Any]]]:
    return {p.name: load_yaml_docs(p.read_text()) for p in kube_files()}


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for objs in _examples().values() for o in objs if o["kind"] == kind]


@pytest.mark.parametrize("file,native", [("native-sidecar.yaml", True), ("classic-sidecar.yaml", False)])
def test_example_deployments_follow_the_contract(file, native):
    objs = load_yaml_docs((KUBE_DIR / file).read_text())
    dep = next(o for o in objs if o["kind"] == "Deployment")
    svc = next(o for o in objs if o["kind"] == "Service")
    pod = dep["spec"]["template"]["spec"]
    c, is_native = wsgate_container(dep)
    assert is_native == native
    assert (c.get("restartPolicy") == "Always") == native
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == 30
    env = env_of(c)
    assert set(chart_env_names()) - OPTIONAL_ENV <= set(env) <= set(chart_env_names())
    assert env["WSGATE_SHUTDOWN_GRACE"] == "25s"
    assert env["WSGATE_SHUTDOWN_DELAY"] == "5s"
    assert env["WSGATE_DRAIN_PERIOD"] == "15s"
    assert int(env["WSGATE_MAX_CLIENTS"]) > 0
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env["WSGATE_LISTEN"].endswith(f":{ports['ws']}")
    assert env["WSGATE_ADMIN_LISTEN"].endswith(f":{ports['admin']}")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["readinessProbe"]["periodSeconds"] == 2 and c["readinessProbe"]["failureThreshold"] == 1
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["securityContext"]["runAsNonRoot"] is True
    # The Service reaches the pods through wsgate's port only.
    assert selector_matches({"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["ws"]
    app = next(x for x in pod["containers"] if x["name"] == "app")
    assert env["WSGATE_UPSTREAM"] == f"127.0.0.1:{app['ports'][0]['containerPort']}"
    # Both layouts: the app pauses through the drain (docs/operations.md#pod-deletion); the native
    # one has the prestop container that starts it.
    assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= 22
    if native:
        (hook,) = [x for x in pod["containers"] if x["name"] == "wsgate-prestop"]
        assert hook["args"][0] == "prestop" and hook["image"] == c["image"]


def test_native_and_classic_examples_configure_wsgate_identically():
    native, _ = wsgate_container(next(o for o in _examples()["native-sidecar.yaml"] if o["kind"] == "Deployment"))
    classic, _ = wsgate_container(next(o for o in _examples()["classic-sidecar.yaml"] if o["kind"] == "Deployment"))
    assert native["env"] == classic["env"]
    assert native["readinessProbe"] == classic["readinessProbe"]


def test_example_podmonitor_selects_both_examples():
    (pm,) = _of_kind("PodMonitor")
    deps = _of_kind("Deployment")
    assert len(deps) == 2
    for d in deps:
        assert selector_matches(pm["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]), d["metadata"]["name"]


def test_example_prometheusrule_equals_the_plain_rule_file():
    (pr,) = _of_kind("PrometheusRule")
    assert pr["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_example_hpa_scales_a_deployment_on_active_connections():
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    names = {d["metadata"]["name"] for d in _of_kind("Deployment")}
    assert hpa["spec"]["scaleTargetRef"]["name"] in names
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] == "wsgate_connections_active"
    # Target below the cap of the target Deployment.
    dep = next(d for d in _of_kind("Deployment") if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"])
    cap = int(env_of(wsgate_container(dep)[0])["WSGATE_MAX_CLIENTS"])
    assert 0 < int(m["pods"]["target"]["averageValue"]) < cap


def adapter_rules() -> list[dict[str, Any]]:
    (cm,) = [o for o in _of_kind("ConfigMap") if "config.yaml" in o.get("data", {})]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_rule_exposes_the_hpa_metric():
    (rule,) = adapter_rules()
    assert "wsgate_connections_active" in rule["seriesQuery"]
    assert rule["name"]["as"] == "wsgate_connections_active"
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for token in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert token in rule["metricsQuery"]


def test_schema_version_is_current():
    # kubernetes-validate ships schemas up to this version; the manifests target >= 1.29 features.
    major, minor = (int(x) for x in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), K8S_VERSION
    print(f"validated against Kubernetes {K8S_VERSION} schemas (kubernetes-validate {kubernetes_validate.__version__})")


def test_native_example_is_what_the_chart_renders_for_the_same_values(render):
    """The plain manifest and the chart configure wsgate the same way (same env, probes, ports)."""
    example, _ = wsgate_container(next(o for o in _examples()["native-sidecar.yaml"] if o["kind"] == "Deployment"))
    rendered, _ = wsgate_container(render({"maxClients": 500, "logFormat": "json"}).one("Deployment"))
    assert example["env"] == rendered["env"]
    assert example["ports"] == rendered["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        for k, v in example[probe].items():
            assert rendered[probe][k] == v, (probe, k)
