"""Fleet-wide limits (docs/operations.md#fleet-wide-limits) in the Helm chart: `fleet.*` rendered as WSGATE_FLEET_* variables on
the wsgate container (the Redis URL as a plain value or through secretKeyRef), the fleet namespace
defaulting to the release's fullname, `keyLimits[].fleet: true` in the rendered config.toml, and the
schema and template checks refusing what cannot work; a release without a Redis renders none of it.

Like every other wsgate setting in this chart (maxClients included), the fleet keys are environment
variables, not part of the mounted config.toml: that file exists only with keyLimits or jwt, and the
environment takes precedence over it anyway. A change of a fleet value therefore rolls the pods.
"""

from __future__ import annotations

import copy
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import (
    chart_readme_section,
    fenced,
    assert_schema_refuses,
    assert_render_refuses,
    CHART,
    FLEET_ENV,
    FLEET_VALUES,
    deep_merge,
    env_of,
    parent_chart,
    wsgate_container,
)

URL = "redis://redis.prod.svc:6379/0"
SECRET_URL = {"name": "wsgate-redis", "key": "url"}
FLEET_NAMES = {"WSGATE_FLEET_REDIS_URL", *FLEET_ENV.values()}

# Variants rendered, linted and validated against the Kubernetes schemas.
VARIANTS: dict[str, dict[str, Any]] = {
    "everything": FLEET_VALUES,
    "everything-classic-monitored": {**FLEET_VALUES, "nativeSidecar": False, "podMonitor": {"enabled": True},
                                     "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "plain-url-cap-only": {"fleet": {"redisUrl": URL, "maxClients": 1000}},
    "tls-url": {"fleet": {"redisUrl": "rediss://default@redis.prod.svc:6380/2", "maxClients": 10}},
    "unix-url": {"fleet": {"redisUrl": "unix:///run/redis/redis.sock", "maxClients": 10}},
    "key-rule-only": {"fleet": {"redisUrlSecret": SECRET_URL},
                      "keyLimits": [{"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 5, "fleet": True}]},
}


def wsgate_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def env_entries(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the whole EnvVar (value or valueFrom)."""
    return {e["name"]: e for e in container.get("env", [])}


def fleet_env(r) -> dict[str, dict[str, Any]]:
    return {n: e for n, e in env_entries(wsgate_of(r)).items() if n.startswith("WSGATE_FLEET_")}


def test_every_value_reaches_its_variable(render):
    env = fleet_env(render(FLEET_VALUES))
    assert set(env) == FLEET_NAMES
    want = {FLEET_ENV[k]: str(v) for k, v in FLEET_VALUES["fleet"].items() if k in FLEET_ENV}
    assert {n: e["value"] for n, e in env.items() if n != "WSGATE_FLEET_REDIS_URL"} == want
    assert want == {"WSGATE_FLEET_NAMESPACE": "chat-eu", "WSGATE_FLEET_MAX_CLIENTS": "2000",
                    "WSGATE_FLEET_LEASE_TTL": "45s", "WSGATE_FLEET_TIMEOUT": "250ms",
                    "WSGATE_FLEET_FAIL_MODE": "closed"}
    # The per-pod cap stays in force beside the fleet cap (docs/operations.md#fleet-wide-limits: a hard ceiling).
    assert env_of(wsgate_of(render(FLEET_VALUES)))["WSGATE_MAX_CLIENTS"] == "500"


def test_defaults_of_a_fleet_release(render):
    env = fleet_env(render({"fleet": {"redisUrl": URL}}))
    assert {n: e["value"] for n, e in env.items()} == {
        "WSGATE_FLEET_REDIS_URL": URL, "WSGATE_FLEET_NAMESPACE": "chat-wsgate", "WSGATE_FLEET_MAX_CLIENTS": "0",
        "WSGATE_FLEET_LEASE_TTL": "30s", "WSGATE_FLEET_TIMEOUT": "100ms", "WSGATE_FLEET_FAIL_MODE": "open"}


def test_secret_url_comes_through_secret_key_ref(render):
    r = render(FLEET_VALUES)
    entry = fleet_env(r)["WSGATE_FLEET_REDIS_URL"]
    assert entry == {"name": "WSGATE_FLEET_REDIS_URL",
                     "valueFrom": {"secretKeyRef": {"name": "wsgate-redis", "key": "url"}}}
    # A custom key, and one YAML would read as a number, stay strings.
    entry = fleet_env(render({"fleet": {"redisUrlSecret": {"name": "redis-auth", "key": "1"}}}))["WSGATE_FLEET_REDIS_URL"]
    assert entry["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "1"}
    # The Secret is read by the kubelet into the variable: no volume, no mount.
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert "wsgate-redis" not in yaml.safe_dump(pod.get("volumes", []))


CLUSTER_AND_SENTINEL_URLS = (
    "redis+cluster://redis-0.redis:6379,redis-1.redis:6379,redis-2.redis:6379",
    "rediss+cluster://default@redis-0.redis:6380/",
    "redis+sentinel://sentinel-0.sentinel:26379,sentinel-1.sentinel:26379/mymaster",
    "redis+sentinel://sentinel:26379/mymaster/2",
)


def test_plain_url_is_a_plain_value(render):
    for url in (URL, "rediss://default@redis.prod.svc:6380/2", "unix:///run/redis/redis.sock", "redis://[::1]:6379",
                *CLUSTER_AND_SENTINEL_URLS):
        entry = fleet_env(render({"fleet": {"redisUrl": url}}))["WSGATE_FLEET_REDIS_URL"]
        assert entry == {"name": "WSGATE_FLEET_REDIS_URL", "value": url}


def test_namespace_defaults_to_the_fullname(render):
    def ns(values, name="chat"):
        return fleet_env(render(deep_merge({"fleet": {"redisUrl": URL}}, values), name=name))["WSGATE_FLEET_NAMESPACE"]["value"]

    # Two releases sharing a Redis get different namespaces, so they do not share caps.
    assert ns({}, "chat") == "chat-wsgate"
    assert ns({}, "billing") == "billing-wsgate"
    assert ns({}, "wsgate-eu") == "wsgate-eu"  # the fullname rule: the release name contains the chart name
    assert ns({"fullnameOverride": "edge.gate"}) == "edge.gate"
    assert ns({"nameOverride": "gate"}) == "chat-gate"
    # Set: taken as given, whatever the release (pods of several releases may share on purpose).
    assert ns({"fleet": {"namespace": "Shared_Fleet.1"}}, "billing") == "Shared_Fleet.1"


def test_instance_id_is_left_to_wsgate(render):
    # In a pod HOSTNAME is the pod name; wsgate adds a random suffix so a restarted container's
    # holds never collide with its predecessor's.
    for values in VARIANTS.values():
        assert "WSGATE_FLEET_INSTANCE_ID" not in env_entries(wsgate_of(render(values)))


def test_no_redis_no_fleet_variables(render):
    base = env_entries(wsgate_of(render({})))
    for values in ({}, {"maxClients": 10}, {"fleet": {"namespace": "x", "leaseTtl": "1m", "failMode": "closed"}},
                   {"keyLimits": [{"name": "t", "key": "header:X", "maxPerKey": 1, "fleet": False}]}):
        env = env_entries(wsgate_of(render(values)))
        assert not [n for n in env if n.startswith("WSGATE_FLEET_")], values
    # Values that only take effect with a Redis change nothing without one.
    assert env_entries(wsgate_of(render({"fleet": {"namespace": "x", "timeout": "1s"}}))) == base
    assert "Limits across replicas" not in render({}).notes


def test_fleet_key_rule_is_rendered_into_the_toml(render):
    cfg = tomllib.loads(render(FLEET_VALUES).config_toml())
    tenant, room = cfg["key_limits"]
    assert tenant == {"name": "tenant", "key": "header:X-Tenant-Id", "max_per_key": 100, "fleet": True}
    assert "fleet" not in room, "an omitted field takes wsgate's default (false)"
    # The fleet settings themselves are variables, never in the file.
    assert not [k for k in cfg if k.startswith("fleet")]


def test_integers_and_bare_second_durations(render):
    env = fleet_env(render({"fleet": {"redisUrl": URL, "maxClients": 1000000, "leaseTtl": 3600, "timeout": "1s"}}))
    assert env["WSGATE_FLEET_MAX_CLIENTS"]["value"] == "1000000"
    assert env["WSGATE_FLEET_LEASE_TTL"]["value"] == "3600"
    assert env["WSGATE_FLEET_TIMEOUT"]["value"] == "1s"


def test_limits_at_the_edges_are_accepted(render):
    for ttl, timeout in (("3s", "999ms"), ("1h", "19m"), ("30s", "9999ms"), ("1m 30s", "29s")):
        render({"fleet": {"redisUrl": URL, "leaseTtl": ttl, "timeout": timeout}})


def test_a_fleet_change_rolls_the_pods(render):
    """Environment variables, like maxClients: a changed fleet cap reaches the pods through a
    rolling update (a running container's environment never changes, so a reload could not see it)."""
    before = render(FLEET_VALUES)
    after = render(deep_merge(FLEET_VALUES, {"fleet": {"maxClients": 2500}}))
    assert before.one("Deployment") != after.one("Deployment")
    assert fleet_env(after)["WSGATE_FLEET_MAX_CLIENTS"]["value"] == "2500"


def test_notes_describe_the_fleet(render):
    notes = render(FLEET_VALUES).notes
    assert "Limits across replicas (Redis URL from Secret wsgate-redis, namespace chat-eu)" in notes
    assert "fleet cap 2000 connections over all pods" in notes
    assert "fleet-wide key rules: tenant." in notes
    assert "503 fleet_unavailable (failMode closed)" in notes
    notes = render({"fleet": {"redisUrl": URL}}).notes
    assert f"Redis {URL}, namespace chat-wsgate" in notes
    assert "fleet cap off" in notes and "key rules: none" in notes and "(failMode open)" in notes


R = {"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 50}

# Refused by values.schema.json (so `helm lint` reports them too).
SCHEMA_REFUSES = {
    "failMode unknown": {"fleet": {"redisUrl": URL, "failMode": "ajar"}},
    "failMode capitalised": {"fleet": {"redisUrl": URL, "failMode": "Open"}},
    "failMode empty": {"fleet": {"redisUrl": URL, "failMode": ""}},
    "maxClients negative": {"fleet": {"redisUrl": URL, "maxClients": -1}},
    "maxClients fractional": {"fleet": {"redisUrl": URL, "maxClients": 1.5}},
    "maxClients string": {"fleet": {"redisUrl": URL, "maxClients": "lots"}},
    "leaseTtl not a duration": {"fleet": {"redisUrl": URL, "leaseTtl": "soon"}},
    "timeout not a duration": {"fleet": {"redisUrl": URL, "timeout": "fast"}},
    "namespace with a space": {"fleet": {"redisUrl": URL, "namespace": "my fleet"}},
    "namespace with a brace": {"fleet": {"redisUrl": URL, "namespace": "{x}"}},
    "namespace too long": {"fleet": {"redisUrl": URL, "namespace": "n" * 65}},
    "url with another scheme": {"fleet": {"redisUrl": "http://redis:6379"}},
    "url without a scheme": {"fleet": {"redisUrl": "redis.prod.svc:6379"}},
    "sentinel url without a master name": {"fleet": {"redisUrl": "redis+sentinel://sentinel:26379"}},
    "cluster url with a database": {"fleet": {"redisUrl": "redis+cluster://redis:6379/1"}},
    "sentinel over TLS": {"fleet": {"redisUrl": "rediss+sentinel://sentinel:26379/mymaster"}},
    "bad Secret name": {"fleet": {"redisUrlSecret": {"name": "Redis_URL", "key": "url"}}},
    "bad Secret key": {"fleet": {"redisUrlSecret": {"name": "redis", "key": "a/b"}}},
    "unknown fleet value": {"fleet": {"redis_url": URL}},
    "fleet rule as a string": {"keyLimits": [{**R, "fleet": "true"}]},
    "alert for: not a duration": {"prometheusRule": {"fleetRedisDown": {"for": "a minute"}}},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_values(helm, chart, render, case):
    assert_schema_refuses(helm, chart, render, case, SCHEMA_REFUSES[case])


def test_schema_accepts_every_documented_form(chart):
    for url in ("", URL, "redis://redis:6379", "rediss://redis.prod.svc:6380/1", "redis://default@redis:6379/0",
                "redis://[::1]:6379/0", "unix:///run/redis/redis.sock", *CLUSTER_AND_SENTINEL_URLS):
        chart.validate_schema(deep_merge(chart.values, {"fleet": {"redisUrl": url}}))
    for fleet in ({"failMode": "open"}, {"failMode": "closed"}, {"leaseTtl": 60, "timeout": "1s"},
                  {"leaseTtl": "1m 30s", "timeout": "250ms"}, {"namespace": "A-z_0.9"}, {"namespace": "n" * 64},
                  {"maxClients": 0}, {"maxClients": 100000}, {"redisUrlSecret": {"name": "redis", "key": "redis.url"}}):
        chart.validate_schema(deep_merge(chart.values, {"fleet": fleet}))


# Refused at render time by wsgate.validateFleet: JSON Schema cannot look at another value or
# compare durations.
RENDER_REFUSES = {
    "both a URL and a Secret": ({"fleet": {"redisUrl": URL, "redisUrlSecret": SECRET_URL}},
                                r"fleet.redisUrl and fleet.redisUrlSecret.name are both set: set one"),
    "fleet cap without a Redis": ({"fleet": {"maxClients": 100}},
                                  r"fleet.maxClients \(100\) counts the connections of all pods in a Redis they share: "
                                  r"set fleet.redisUrl or fleet.redisUrlSecret.name"),
    "fleet key rule without a Redis": ({"keyLimits": [R, {**R, "name": "user", "key": "jwt_claim:sub", "fleet": False},
                                                      {**R, "name": "room", "key": "path_segment:1", "fleet": True}],
                                        "jwt": {"jwksSecret": {"name": "jwks", "key": "jwks.json"}}},
                                       r"keyLimits rule\(s\) room have fleet: true, which counts across pods in a Redis "
                                       r"they share: set fleet.redisUrl or fleet.redisUrlSecret.name"),
    "password in the plain URL": ({"fleet": {"redisUrl": "redis://:s3cret@redis:6379/0"}},
                                  r"fleet.redisUrl holds a password, which would be rendered in plain text"),
    "user and password in the plain URL": ({"fleet": {"redisUrl": "rediss://app:s3cret@redis:6380"}},
                                           r"fleet.redisUrl holds a password"),
    "password in a unix URL": ({"fleet": {"redisUrl": "unix:///run/redis.sock?db=1&pass=s3cret"}},
                               r"fleet.redisUrl holds a password"),
    "password in a cluster URL": ({"fleet": {"redisUrl": "redis+cluster://:s3cret@redis-0:6379,redis-1:6379"}},
                                  r"fleet.redisUrl holds a password"),
    "password in a sentinel URL": ({"fleet": {"redisUrl": "redis+sentinel://app:s3cret@sentinel:26379/mymaster"}},
                                   r"fleet.redisUrl holds a password"),
    "sentinel password in a sentinel URL": (
        {"fleet": {"redisUrl": "redis+sentinel://sentinel:26379/mymaster?sentinel_password=s3cret"}},
        r"fleet.redisUrl holds a password"),
    "lease too short": ({"fleet": {"redisUrl": URL, "leaseTtl": "2s", "timeout": "100ms"}},
                        r"fleet.leaseTtl \(2s\) must be between 3s and 1h"),
    "lease too long": ({"fleet": {"redisUrl": URL, "leaseTtl": "61m"}}, r"fleet.leaseTtl \(61m\) must be between 3s and 1h"),
    "timeout not below a third of the lease": ({"fleet": {"redisUrl": URL, "timeout": "10s"}},
                                              r"fleet.timeout \(10s\) must be below fleet.leaseTtl / 3 \(30s / 3\)"),
    "timeout zero": ({"fleet": {"redisUrl": URL, "timeout": "0s"}}, r"fleet.timeout \(0s\) must be longer than 0"),
    "fullname unusable as a namespace": ({"fleet": {"redisUrl": URL}, "fullnameOverride": "chat+gate"},
                                         r"the fleet namespace \"chat\+gate\" .* must be 1 to 64 of"),
}


@pytest.mark.parametrize("case", sorted(RENDER_REFUSES))
def test_render_refuses_what_the_schema_cannot_say(helm, chart, render, case):
    values, message = RENDER_REFUSES[case]
    assert_render_refuses(helm, chart, render, values, message)


def test_a_password_free_url_is_not_mistaken_for_one(render):
    for url in ("redis://redis:6379/0", "redis://default@redis:6379", "redis://[::1]:6379/0",
                "unix:///run/redis.sock?db=2", "rediss://redis:6380/0?protocol=resp3"):
        render({"fleet": {"redisUrl": url}})


def test_fail_mode_is_checked_by_the_template_too(helm, tmp_path):
    """The schema refuses a bad failMode first; the template refuses it as well, for a parent chart
    that skips schema validation or pins an older copy of the schema."""
    copy_dir = tmp_path / "wsgate"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(str(copy_dir)) as c:
        with pytest.raises(helm.HelmRenderError, match=r"fleet.failMode \"ajar\": must be open .* or closed"):
            c.render({"fleet": {"redisUrl": URL, "failMode": "ajar"}}, name="chat", namespace="prod")
        with pytest.raises(helm.HelmRenderError, match=r"fleet.failMode \"ajar\""):
            c.render({"fleet": {"failMode": "ajar"}}, name="chat", namespace="prod")


def _parent_docs(helm, parent: Path) -> list[dict[str, Any]]:
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    return [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]


def test_included_by_another_chart(helm, tmp_path):
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    # With fleet.namespace set, the README's include (Values and Chart, no Release) works as it is.
    parent = parent_chart(tmp_path / "a", {**off, "fleet": {"redisUrlSecret": SECRET_URL, "namespace": "myapp"}})
    (dep,) = [d for d in _parent_docs(helm, parent) if d["kind"] == "Deployment"]
    env = env_entries(wsgate_container(dep)[0])
    assert env["WSGATE_FLEET_NAMESPACE"]["value"] == "myapp"
    assert env["WSGATE_FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"] == SECRET_URL
    # Without it, an include without Release has no release to name the namespace after: refused, saying how.
    parent = parent_chart(tmp_path / "b", {**off, "fleet": {"redisUrl": URL}})
    with pytest.raises(helm.HelmRenderError, match=r"fleet.namespace is empty, and wsgate.container was included "
                                                   r"without Release and Chart"):
        _parent_docs(helm, parent)
    # Passing Release and Chart as for wsgate.volumes: the namespace is the subchart's fullname.
    ctx = '(dict "Values" .Values.wsgate "Release" .Release "Chart" .Subcharts.wsgate.Chart)'
    parent = parent_chart(tmp_path / "c", {**off, "fleet": {"redisUrl": URL}}, container_context=ctx)
    (dep,) = [d for d in _parent_docs(helm, parent) if d["kind"] == "Deployment"]
    assert env_entries(wsgate_container(dep)[0])["WSGATE_FLEET_NAMESPACE"]["value"] == "myapp-wsgate"
    report = helm.lint(str(parent), strict=True)
    assert report["errors"] == [], report
    # The checks run for the parent too.
    parent = parent_chart(tmp_path / "d", {**off, "fleet": {"maxClients": 10}})
    with pytest.raises(helm.HelmRenderError, match=r"fleet.maxClients \(10\)"):
        _parent_docs(helm, parent)


def test_readme_example_renders_as_it_says(render):
    section = chart_readme_section("Limits across replicas")
    values = yaml.safe_load(fenced(section, "yaml"))
    env = fleet_env(render(values))
    assert set(env) == FLEET_NAMES
    secret = values["fleet"]["redisUrlSecret"]
    assert env["WSGATE_FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"] == secret
    # The Secret recipe creates the Secret and key the example names.
    assert f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}=" in section


def test_readme_names_every_fleet_value_and_failure_mode(chart):
    section = chart_readme_section("Limits across replicas")
    for key in chart.values["fleet"]:
        assert f"`{key}" in section or f"`fleet.{key}" in section, key
    for needle in ("fleet_unavailable", "(pods − 1)", "leaseTtl / 3", "{namespace}", "Redis Cluster", "readiness",
                   "WsgateFleetRedisDown", "fleet: true"):
        assert needle in section, needle


def test_fleet_variables_sit_before_the_config_file_and_extra_env(render):
    """The fleet variables come after the docs/configuration.md and docs/operations.md#rollouts/§8 ones and before WSGATE_CONFIG and extraEnv,
    so that extraEnv can still override any of them."""
    values = copy.deepcopy(FLEET_VALUES)
    values["extraEnv"] = [{"name": "WSGATE_FLEET_INSTANCE_ID", "value": "fixed"}]
    names = [e["name"] for e in wsgate_of(render(values))["env"]]
    fleet_at = [i for i, n in enumerate(names) if n.startswith("WSGATE_FLEET_") and n != "WSGATE_FLEET_INSTANCE_ID"]
    assert fleet_at == list(range(fleet_at[0], fleet_at[0] + len(FLEET_NAMES)))
    assert names.index("WSGATE_CLOSE_TIMEOUT") < fleet_at[0] and fleet_at[-1] < names.index("WSGATE_CONFIG")
    assert names[-1] == "WSGATE_FLEET_INSTANCE_ID"
