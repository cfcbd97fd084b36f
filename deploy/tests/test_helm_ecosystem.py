"""The chart's objects for the cluster around it (issue 24), rendered by Helm's own engine:
PodDisruptionBudget, NetworkPolicy, ServiceMonitor (with its metrics Service) beside the
PodMonitor, labels / annotations / namespace of the monitoring objects, the render error when the
cluster lacks a CRD, extra volumes, priorityClassName, topology spread, the app port check and
KEDA's ScaledObject. Everything rendered with everything on (values-all-on.yaml) passes `helm lint`,
the Kubernetes schemas and the CRD schemas (test_kubernetes_schemas.validate_all).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import (
    CHART,
    CRD_API_VERSIONS,
    PROMTOOL_BIN,
    assert_lint_clean,
    assert_render_refuses,
    assert_schema_refuses,
    deep_merge,
    parent_chart,
    wsgate_container,
)
from test_kubernetes_schemas import selector_matches, validate_all

ALL_ON_FILE = Path(__file__).resolve().parent / "values-all-on.yaml"
ALL_ON = yaml.safe_load(ALL_ON_FILE.read_text())
PROMETHEUS = "http://prometheus.monitoring.svc:9090"


def pod_labels(r) -> dict[str, str]:
    return r.one("Deployment")["spec"]["template"]["metadata"]["labels"]


# ---- everything on -------------------------------------------------------------------------------

def test_everything_on_renders_every_new_object_and_passes_every_schema(render, tmp_path):
    r = render(ALL_ON)
    assert r.kinds() == ["Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "ScaledObject",
                         "Service", "Service", "ServiceMonitor"]
    validate_all(r.objects, tmp_path)
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "edge-critical"
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == ["topology.kubernetes.io/zone",
                                                                             "kubernetes.io/hostname"]
    assert {"name": "redis-ca", "configMap": {"name": "redis-ca"}} in pod["volumes"]
    # The same with the PodMonitor instead of the ServiceMonitor.
    r = render(deep_merge(ALL_ON, {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": True}}))
    assert "PodMonitor" in r.kinds() and "ServiceMonitor" not in r.kinds()
    validate_all(r.objects, tmp_path)


def test_everything_on_renders_offline_with_the_api_versions_its_header_names(render):
    """values-all-on.yaml's comment gives the `helm template` command: its --api-versions suffice."""
    named = re.findall(r"--api-versions (\S+)", ALL_ON_FILE.read_text())
    assert sorted(named) == ["keda.sh/v1alpha1/ScaledObject", "monitoring.coreos.com/v1/PrometheusRule",
                             "monitoring.coreos.com/v1/ServiceMonitor"]
    assert "ScaledObject" in render(ALL_ON, api_versions=named).kinds()
    for missing in named:
        with pytest.raises(Exception, match=re.escape(f"--api-versions {missing}")):
            render(ALL_ON, api_versions=[a for a in named if a != missing])


@pytest.mark.parametrize("values", [{}, ALL_ON, {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                                 "networkPolicy": {"enabled": True}, "autoscaling": {"enabled": True},
                                                 "maxClients": 100}],
                         ids=["defaults", "all-on", "podmonitor-hpa"])
def test_helm_lint_passes(helm, values):
    # Helm's lint has no --api-versions; it renders templates in lint mode, where `fail` only logs,
    # so the CRD check cannot make it fail (render and install do fail, see below).
    assert_lint_clean(helm, values)


# ---- PodDisruptionBudget -------------------------------------------------------------------------

@pytest.mark.parametrize("values,on", [
    ({}, True),  # replicaCount 2
    ({"replicaCount": 1}, False),  # a budget would block the one pod's node drain
    ({"replicaCount": 1, "maxClients": 100, "autoscaling": {"enabled": True}}, True),
    ({"replicaCount": 1, "maxClients": 100, "keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}}, True),
    ({"replicaCount": 3, "podDisruptionBudget": {"enabled": False}}, False),
    ({"replicaCount": 1, "podDisruptionBudget": {"enabled": True}}, True),
    # Another chart owns the pods (wsgate.container): nothing to budget automatically.
    ({"deployment": {"enabled": False}, "service": {"enabled": False}}, False),
], ids=["defaults", "one-pod", "hpa", "keda", "off", "forced", "no-deployment"])
def test_disruption_budget_is_automatic(render, values, on):
    assert (render(values).maybe("PodDisruptionBudget") is not None) == on


def test_disruption_budget_selects_the_pods_with_one_bound(render):
    r = render()
    pdb = r.one("PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], pod_labels(r))
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert "unhealthyPodEvictionPolicy" not in pdb["spec"]
    pdb = render({"replicaCount": 4, "podDisruptionBudget": {"minAvailable": "50%", "maxUnavailable": None,
                                                             "unhealthyPodEvictionPolicy": "AlwaysAllow"}}
                 ).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pdb = render({"replicaCount": 4, "podDisruptionBudget": {"minAvailable": 3, "maxUnavailable": None}}
                 ).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 3


PDB_RENDER_REFUSES = {
    "both bounds": ({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
                    r"exactly one of minAvailable \(1\) and maxUnavailable \(1\)"),
    "no bound": ({"podDisruptionBudget": {"maxUnavailable": None}}, "exactly one of minAvailable"),
    "maxUnavailable 0": ({"podDisruptionBudget": {"maxUnavailable": 0}}, r"maxUnavailable \(0\) allows no eviction"),
    "maxUnavailable 0%": ({"podDisruptionBudget": {"maxUnavailable": "0%"}}, r"maxUnavailable \(0%\) allows no eviction"),
    "minAvailable 100%": ({"podDisruptionBudget": {"minAvailable": "100%", "maxUnavailable": None}},
                          r"minAvailable \(100%\) allows no eviction"),
    "minAvailable = replicas": ({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2, "maxUnavailable": None}},
                                r"minAvailable \(2\) must be below replicaCount \(2\)"),
    "minAvailable = HPA minimum": ({"maxClients": 10, "autoscaling": {"enabled": True, "minReplicas": 3},
                                    "podDisruptionBudget": {"minAvailable": 3, "maxUnavailable": None}},
                                   r"minAvailable \(3\) must be below autoscaling.minReplicas \(3\)"),
}


@pytest.mark.parametrize("case", sorted(PDB_RENDER_REFUSES))
def test_disruption_budget_that_blocks_drains_is_refused(helm, chart, render, case):
    values, message = PDB_RENDER_REFUSES[case]
    assert_render_refuses(helm, chart, render, values, message)


# ---- NetworkPolicy -------------------------------------------------------------------------------

def test_network_policy_admits_clients_anywhere_and_the_admin_port_from_monitoring(render):
    assert render().maybe("NetworkPolicy") is None
    r = render({"networkPolicy": {"enabled": True}, "ports": {"client": 8081, "admin": 9191}, "app": {"port": 5000}})
    np = r.one("NetworkPolicy")
    assert selector_matches(np["spec"]["podSelector"], pod_labels(r))
    assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"]
    client, admin = np["spec"]["ingress"]
    assert client == {"ports": [{"port": 8081, "protocol": "TCP"}]}, "no `from`: any source"
    assert admin["ports"] == [{"port": 9191, "protocol": "TCP"}]
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    opened = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
    assert 5000 not in opened, "the app's own port stays closed: clients go through wsgate"


def test_network_policy_peers_and_extra_rules_are_values(render):
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    extra = {"ports": [{"port": 3001, "protocol": "TCP"}], "from": [{"podSelector": {"matchLabels": {"app": "x"}}}]}
    np = render({"networkPolicy": {"enabled": True, "clientFrom": [ingress], "adminFrom": [], "extraIngress": [extra]}}
                ).one("NetworkPolicy")
    client, more = np["spec"]["ingress"]
    assert client == {"ports": [{"port": 8080, "protocol": "TCP"}], "from": [ingress]}
    assert more == extra, "adminFrom [] opens the admin port to nobody"


# ---- ServiceMonitor ------------------------------------------------------------------------------

def test_service_monitor_scrapes_the_admin_port_through_a_headless_service_of_its_own(render):
    r = render({"serviceMonitor": {"enabled": True, "interval": "30s"}, "ports": {"client": 8081, "admin": 9191}})
    client = r.named("Service", "chat-wsgate")
    metrics = r.named("Service", "-metrics")
    assert [p["name"] for p in client["spec"]["ports"]] == ["ws"], "the client Service never exposes the admin port"
    assert metrics["metadata"]["name"] == "chat-wsgate-metrics"
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "admin", "port": 9191, "targetPort": 9191, "protocol": "TCP"}]
    assert metrics["spec"]["selector"] == client["spec"]["selector"]
    assert selector_matches({"matchLabels": metrics["spec"]["selector"]}, pod_labels(r))
    sm = r.one("ServiceMonitor")
    assert selector_matches(sm["spec"]["selector"], metrics["metadata"]["labels"])
    assert not selector_matches(sm["spec"]["selector"], client["metadata"]["labels"])
    (ep,) = sm["spec"]["endpoints"]
    assert ep == {"port": "admin", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    # No client Service needed for it.
    r = render({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}})
    assert [s["metadata"]["name"] for s in r.objects if s["kind"] == "Service"] == ["chat-wsgate-metrics"]


def test_pod_and_service_monitor_together_are_refused(helm, chart, render):
    assert_render_refuses(helm, chart, render, {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}},
                          "podMonitor.enabled and serviceMonitor.enabled are both true")


# ---- labels, annotations, namespace of the monitoring objects -------------------------------------

@pytest.mark.parametrize("toggle,kind", [("podMonitor", "PodMonitor"), ("serviceMonitor", "ServiceMonitor"),
                                         ("prometheusRule", "PrometheusRule")])
def test_monitoring_objects_take_labels_annotations_and_a_namespace(render, toggle, kind):
    plain = render({toggle: {"enabled": True}}).one(kind)
    assert plain["metadata"]["labels"]["app.kubernetes.io/instance"] == "chat"
    assert "annotations" not in plain["metadata"] and "namespace" not in plain["metadata"]
    assert "namespaceSelector" not in plain["spec"]
    obj = render({toggle: {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                           "annotations": {"team": "chat"}, "namespace": "monitoring"}}).one(kind)
    assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "chat", "the chart's labels stay"
    assert obj["metadata"]["annotations"] == {"team": "chat"}
    assert obj["metadata"]["namespace"] == "monitoring"
    if kind != "PrometheusRule":
        # Moved away, a monitor must point back at the pods' namespace.
        assert obj["spec"]["namespaceSelector"] == {"matchNames": ["prod"]}
        assert obj["spec"]["selector"] == plain["spec"]["selector"]


@pytest.mark.parametrize("values,selector", [
    ({"podMonitor": {"enabled": True}}, 'namespace="prod", job="prod/chat-wsgate"'),
    ({"podMonitor": {"enabled": True, "namespace": "monitoring"}}, 'namespace="prod", job="monitoring/chat-wsgate"'),
    ({"serviceMonitor": {"enabled": True}}, 'namespace="prod", job="chat-wsgate-metrics"'),
    ({"prometheusRule": {"targetMissing": {"selector": 'job="wsgate-pods"'}}}, 'job="wsgate-pods"'),
], ids=["podmonitor", "podmonitor-elsewhere", "servicemonitor", "own-selector"])
def test_target_missing_watches_the_job_of_the_charts_monitor(render, values, selector):
    """The Prometheus Operator labels a PodMonitor's targets job=<its namespace>/<its name>, a
    ServiceMonitor's job=<the Service's name> (pkg/prometheus/promcfg.go)."""
    pr = render(deep_merge({"prometheusRule": {"enabled": True}}, values)).one("PrometheusRule")
    (rule,) = [r for r in pr["spec"]["groups"][0]["rules"] if r["alert"] == "WsgateTargetMissing"]
    assert rule["expr"].split() == f"up{{{selector}}} == 0 or absent(up{{{selector}}})".split()


def test_target_missing_is_left_out_when_the_chart_cannot_know_the_targets(render):
    pr = render({"prometheusRule": {"enabled": True}}).one("PrometheusRule")
    alerts = [r["alert"] for r in pr["spec"]["groups"][0]["rules"]]
    assert "WsgateTargetMissing" not in alerts and len(alerts) == 10


def test_every_alert_can_be_switched_off_alone(render):
    names = {"saturation": "WsgateSaturationHigh", "rejecting": "WsgateRejectingConnections",
             "originRefusals": "WsgateOriginRefusals",
             "upstreamErrors": "WsgateUpstreamErrors", "notReady": "WsgatePodNotReady",
             "keyPinned": "WsgateKeyPinnedAtLimit", "fleetRedisDown": "WsgateFleetRedisDown",
             "abnormalCloses": "WsgateAbnormalCloses", "configReloadFailed": "WsgateConfigReloadFailed",
             "descriptorsNearLimit": "WsgateDescriptorsNearLimit", "targetMissing": "WsgateTargetMissing"}
    for value, alert in names.items():
        pr = render({"podMonitor": {"enabled": True},
                     "prometheusRule": {"enabled": True, value: {"enabled": False}}}).one("PrometheusRule")
        alerts = {r["alert"] for r in pr["spec"]["groups"][0]["rules"]}
        assert alerts == set(names.values()) - {alert}, value


def test_every_alert_off_is_refused(helm, chart, render):
    off = {k: {"enabled": False} for k in ("saturation", "rejecting", "originRefusals", "upstreamErrors", "notReady",
                                           "keyPinned", "fleetRedisDown", "abnormalCloses", "configReloadFailed",
                                           "descriptorsNearLimit", "targetMissing")}
    assert_render_refuses(helm, chart, render, {"prometheusRule": {"enabled": True, **off}},
                          "without rules: set prometheusRule.enabled=false")


# ---- CRDs the cluster does not serve -------------------------------------------------------------

@pytest.mark.parametrize("values,api,install", [
    ({"podMonitor": {"enabled": True}}, "monitoring.coreos.com/v1/PodMonitor", "Prometheus Operator's CRDs"),
    ({"serviceMonitor": {"enabled": True}}, "monitoring.coreos.com/v1/ServiceMonitor", "Prometheus Operator's CRDs"),
    ({"prometheusRule": {"enabled": True}}, "monitoring.coreos.com/v1/PrometheusRule", "Prometheus Operator's CRDs"),
    ({"maxClients": 100, "keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}},
     "keda.sh/v1alpha1/ScaledObject", "KEDA"),
], ids=["podmonitor", "servicemonitor", "prometheusrule", "keda"])
def test_a_missing_crd_is_a_render_error_that_says_what_to_install(helm, render, values, api, install):
    value = next(k for k in values if k != "maxClients") + ".enabled"
    others = [a for a in CRD_API_VERSIONS if a != api]
    with pytest.raises(helm.HelmRenderError) as err:
        render(values, api_versions=others)
    msg = str(err.value)
    print(msg)
    for needle in (f"{value}=true needs the {api} API", install, f"or set {value}=false",
                   f"--api-versions {api}"):
        assert needle in msg, needle
    # The cluster that serves it (or `helm template --api-versions` naming it) renders.
    assert render(values, api_versions=[api]).maybe(api.rsplit("/", 1)[1]) is not None


def test_nothing_needs_a_crd_by_default(render):
    assert render(api_versions=[]).kinds() == ["Deployment", "PodDisruptionBudget", "Service"]


# ---- extra volumes, priorityClassName, topology spread --------------------------------------------

def test_extra_volumes_mount_into_wsgate_only_after_the_charts_own(render):
    mount = {"name": "redis-ca", "mountPath": "/etc/wsgate/redis-ca", "readOnly": True}
    volume = {"name": "redis-ca", "configMap": {"name": "redis-ca"}}
    r = render({"keyLimits": [{"name": "tenant", "key": "header:X-Tenant", "maxPerKey": 5}],
                "extraVolumes": [volume], "extraVolumeMounts": [mount], "nativeSidecar": False})
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["wsgate-config", "redis-ca"]
    assert pod["volumes"][1] == volume
    c, _ = wsgate_container(r.one("Deployment"))
    assert [m["name"] for m in c["volumeMounts"]] == ["wsgate-config", "redis-ca"] and c["volumeMounts"][1] == mount
    app = next(x for x in pod["containers"] if x["name"] == "app")
    assert "volumeMounts" not in app
    bare = render().one("Deployment")["spec"]["template"]["spec"]
    assert "volumes" not in bare and "volumeMounts" not in wsgate_container(render().one("Deployment"))[0]


def test_extra_volumes_reach_a_chart_that_includes_the_container(helm, tmp_path):
    parent = parent_chart(tmp_path, {"deployment": {"enabled": False}, "service": {"enabled": False},
                                     "extraVolumes": [{"name": "ca", "emptyDir": {}}],
                                     "extraVolumeMounts": [{"name": "ca", "mountPath": "/ca"}]}, with_volumes=True)
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    (dep,) = [d for n, t in out.items() if not n.endswith("NOTES.txt")
              for d in yaml.safe_load_all(t) if d and d.get("kind") == "Deployment"]
    assert dep["spec"]["template"]["spec"]["volumes"] == [{"name": "ca", "emptyDir": {}}]
    assert wsgate_container(dep)[0]["volumeMounts"] == [{"name": "ca", "mountPath": "/ca"}]


def test_priority_class_and_topology_spread(render):
    pod = render().one("Deployment")["spec"]["template"]["spec"]
    assert "priorityClassName" not in pod and "topologySpreadConstraints" not in pod
    own = {"matchLabels": {"tier": "edge"}}
    r = render({"priorityClassName": "edge-critical", "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": own}]})
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "edge-critical"
    zone, host = pod["topologySpreadConstraints"]
    assert zone["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": "wsgate", "app.kubernetes.io/instance": "chat"}}
    assert selector_matches(zone["labelSelector"], pod_labels(r)), "counts the release's pods"
    assert host["labelSelector"] == own and host["maxSkew"] == 2, "a given labelSelector is kept"


# ---- app.port against wsgate's ports --------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"app": {"port": 8080}}, r"app.port \(8080\) equals ports.client \(8080\)"),
    ({"app": {"port": 9090}}, r"app.port \(9090\) equals ports.admin \(9090\)"),
    ({"app": {"port": 7000}, "ports": {"client": 7000, "admin": 7001}}, r"app.port \(7000\) equals ports.client \(7000\)"),
    ({"ports": {"client": 9090, "admin": 9090}}, r"ports.client \(9090\) and ports.admin \(9090\) must differ"),
], ids=["client", "admin", "moved-client", "client-is-admin"])
def test_the_app_port_must_not_be_a_wsgate_port(helm, chart, render, values, message):
    assert_render_refuses(helm, chart, render, values, message)


def test_the_app_port_is_free_when_no_app_uses_it(render):
    r = render({"app": {"enabled": False, "port": 8080}, "nativeSidecar": False, "upstream": "backend:8080"})
    assert r.one("Deployment")


@pytest.mark.parametrize("app", [{"port": 8080}, {"enabled": False, "port": 8080}], ids=["app", "no-app-no-upstream"])
def test_the_app_port_check_reaches_a_chart_that_includes_the_container(helm, tmp_path, app):
    # Without an app in this chart's pod and without `upstream`, wsgate dials 127.0.0.1:<app.port>:
    # itself, here.
    parent = parent_chart(tmp_path, {"deployment": {"enabled": False}, "service": {"enabled": False}, "app": app})
    with helm.Chart.load(str(parent)) as c:
        with pytest.raises(helm.HelmRenderError, match=r"app.port \(8080\) equals ports.client \(8080\)"):
            c.render({}, name="myapp", namespace="prod")


# ---- KEDA ----------------------------------------------------------------------------------------

KEDA = {"maxClients": 500, "keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}}


def test_scaled_object_scales_the_deployment_on_the_hpas_signal(render, tmp_path):
    r = render(KEDA)
    so = r.one("ScaledObject")
    dep = r.one("Deployment")
    assert "replicas" not in dep["spec"], "KEDA's HPA owns the replica count"
    assert r.maybe("HorizontalPodAutoscaler") is None
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (2, 10, 30)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["serverAddress"] == PROMETHEUS
    assert meta["query"] == 'sum(wsgate_connections_active{namespace="prod", pod=~"chat-wsgate-[a-z0-9]+-[a-z0-9]+"})'
    # The same metric and target as the chart's HPA for the same values (70 % of maxClients).
    hpa = render({"maxClients": 500, "autoscaling": {"enabled": True}}).one("HorizontalPodAutoscaler")
    (m,) = hpa["spec"]["metrics"]
    assert m["pods"]["metric"]["name"] in meta["query"]
    assert meta["threshold"] == m["pods"]["target"]["averageValue"] == "350"
    # Scale-down: the HPA's pace, and at least one drain long per step.
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down == hpa["spec"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}
    # The query is PromQL Prometheus accepts.
    rules = tmp_path / "keda-query.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "keda:query", "expr": meta["query"]}]}]}))
    res = subprocess.run([PROMTOOL_BIN, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scaled_object_query_selects_exactly_the_deployments_pods(render):
    query = render(KEDA).one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    pattern = re.search(r'pod=~"([^"]+)"', query).group(1)
    # PromQL anchors regular expressions at both ends.
    assert re.fullmatch(pattern, "chat-wsgate-7d9f8b6c5d-x2x9q")
    assert not re.fullmatch(pattern, "chat-wsgate-canary-7d9f8b6c5d-x2x9q"), "another Deployment's pods"
    assert not re.fullmatch(pattern, "chat-wsgate-7d9f8b6c5d")


def test_scaled_object_values(render):
    so = render(deep_merge(KEDA, {"keda": {
        "minReplicas": 3, "maxReplicas": 30, "targetActiveConnectionsPerPod": 400, "pollingInterval": 15,
        "prometheus": {"query": 'sum(wsgate_connections_active{cluster="eu-1", namespace="prod"})',
                       "authenticationRef": {"name": "prom-auth"}},
        "scaleDown": {"stabilizationWindowSeconds": 900, "pods": 2, "periodSeconds": 300}}})).one("ScaledObject")
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (3, 30, 15)
    (trigger,) = spec["triggers"]
    assert trigger["metadata"]["threshold"] == "400"
    assert trigger["metadata"]["query"] == 'sum(wsgate_connections_active{cluster="eu-1", namespace="prod"})'
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 900, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 300}]}


KEDA_RENDER_REFUSES = {
    "with the HPA": ({**KEDA, "autoscaling": {"enabled": True}}, "autoscaling.enabled and keda.enabled are both true"),
    "no Prometheus": ({"maxClients": 500, "keda": {"enabled": True}}, "set keda.prometheus.serverAddress"),
    "no target, no cap": ({"keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}},
                          "keda.targetActiveConnectionsPerPod is required when maxClients is 0"),
    "step shorter than a drain": (deep_merge(KEDA, {"keda": {"scaleDown": {"periodSeconds": 15}}}),
                                  r"keda.scaleDown.periodSeconds \(15\) must be at least shutdownDelay \(5s\) \+ "
                                  r"drainPeriod \(15s\) = 20 s"),
    "min above max": (deep_merge(KEDA, {"keda": {"minReplicas": 5, "maxReplicas": 4}}),
                      r"keda.minReplicas \(5\) must not exceed keda.maxReplicas \(4\)"),
}


@pytest.mark.parametrize("case", sorted(KEDA_RENDER_REFUSES))
def test_scaled_object_refusals(helm, chart, render, case):
    values, message = KEDA_RENDER_REFUSES[case]
    assert_render_refuses(helm, chart, render, values, message)


# ---- what the schema refuses ---------------------------------------------------------------------

SCHEMA_REFUSES = {
    "pdb bound not a count or percentage": {"podDisruptionBudget": {"maxUnavailable": "half"}},
    "pdb negative bound": {"podDisruptionBudget": {"maxUnavailable": -1}},
    "pdb unknown eviction policy": {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Sometimes"}},
    "network peers not a list": {"networkPolicy": {"clientFrom": {"namespaceSelector": {}}}},
    "monitor label not a string": {"podMonitor": {"labels": {"release": 1}}},
    "monitor namespace not a name": {"serviceMonitor": {"namespace": "Mon_itoring"}},
    "rule severity for all alerts (per alert now)": {"prometheusRule": {"severity": "page"}},
    "rejecting threshold as a count": {"prometheusRule": {"rejecting": {"threshold": 5}}},
    "rejecting guard of 0": {"prometheusRule": {"rejecting": {"minRefusals": 0}}},
    "alert enabled not a boolean": {"prometheusRule": {"saturation": {"enabled": "yes"}}},
    "runbook base not a URL": {"prometheusRule": {"runbookBaseUrl": "docs/operations.md"}},
    "target selector not matchers": {"prometheusRule": {"targetMissing": {"selector": "wsgate"}}},
    "descriptor threshold above 1": {"prometheusRule": {"descriptorsNearLimit": {"threshold": 80}}},
    "reload window not a duration": {"prometheusRule": {"configReloadFailed": {"window": "a while"}}},
    "keda scale to zero": {"keda": {"minReplicas": 0}},
    "keda server not a URL": {"keda": {"prometheus": {"serverAddress": "prometheus:9090"}}},
    "keda unknown value": {"keda": {"cooldownPeriod": 300}},
    "spread without topologyKey": {"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]},
    "extra volume without name": {"extraVolumes": [{"emptyDir": {}}]},
    "extra mount without path": {"extraVolumeMounts": [{"name": "x"}]},
    "priority class not a name": {"priorityClassName": "Edge Critical"},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses(helm, chart, render, case):
    assert_schema_refuses(helm, chart, render, case, SCHEMA_REFUSES[case])


def test_chart_readme_names_every_new_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for top in ("podDisruptionBudget", "networkPolicy", "serviceMonitor", "keda"):
        for key in values[top]:
            assert key in readme, f"{top}.{key}"
    for key in values["keda"]["prometheus"]:
        assert key in readme, f"keda.prometheus.{key}"
    for key in values["keda"]["scaleDown"]:
        assert key in readme, f"keda.scaleDown.{key}"
    for alert, settings in values["prometheusRule"].items():
        if isinstance(settings, dict) and "severity" in settings:
            assert f"`{alert}" in readme, alert
            for key in settings:
                assert key in readme, f"prometheusRule.{alert}.{key}"
