"""Limits per key (docs/operations.md#limits-per-key) in the Helm chart: keyLimits and jwt rendered into config.toml in a
ConfigMap, mounted as a directory and named by WSGATE_CONFIG; the JWKS and admin-token Secrets
mounted read-only; the schema and the template checks refuse bad rules; and nothing changes for a
release that sets none of it.

The TOML is parsed with Python's tomllib (a TOML 1.0 parser independent of the chart) and compared
with the values given, so quoting and escaping are checked, not just eyeballed.
"""

from __future__ import annotations

import copy
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
    parent_chart,
    KEY_LIMITS_VALUES,
    WEIRD_KEY,
    deep_merge,
    env_of,
    expected_key_limits,
    wsgate_container,
)
from test_kubernetes_schemas import validate_all

CONFIG_DIR = "/etc/wsgate/config"

# Variants rendered, linted and validated against the Kubernetes schemas.
VARIANTS: dict[str, dict[str, Any]] = {
    "everything": KEY_LIMITS_VALUES,
    "everything-classic": {**KEY_LIMITS_VALUES, "nativeSidecar": False, "maxClients": 1000,
                           "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "header-rule-only": {"keyLimits": [{"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 50}]},
    "jwt-only": {"jwt": {"jwksSecret": {"name": "auth-jwks", "key": "keys"}}},
    "admin-token-only": {"adminToken": {"secretName": "wsgate-admin", "key": "token"}},
}


def pod_of(r) -> dict[str, Any]:
    return r.one("Deployment")["spec"]["template"]["spec"]


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def volumes_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def parsed_config(r) -> dict[str, Any]:
    text = r.config_toml()
    assert text is not None, "no keyLimits ConfigMap rendered"
    return tomllib.loads(text)


def test_config_map_is_mounted_as_a_directory_and_named_by_wsgate_config(render):
    r = render(KEY_LIMITS_VALUES)
    cm = r.named("ConfigMap", "-config")
    assert cm["metadata"]["name"] == "chat-wsgate-config"
    assert set(cm["data"]) == {"config.toml"}
    c, native = wsgate_container(r.one("Deployment"))
    assert native
    env = env_of(c)
    assert env["WSGATE_CONFIG"] == f"{CONFIG_DIR}/config.toml"
    mount = mounts_of(c)["wsgate-config"]
    # The directory, never subPath: a subPath mount is never updated, so edits would not reach wsgate.
    assert mount == {"name": "wsgate-config", "mountPath": CONFIG_DIR, "readOnly": True}
    assert not any("subPath" in m or "subPathExpr" in m for m in c["volumeMounts"])
    vol = volumes_of(pod_of(r))["wsgate-config"]
    assert vol == {"name": "wsgate-config", "configMap": {"name": "chat-wsgate-config"}}
    # No checksum annotation: a rule edit must reload in place, not roll the pods.
    annotations = r.one("Deployment")["spec"]["template"]["metadata"].get("annotations") or {}
    assert not [k for k in annotations if "checksum" in k], annotations


def test_classic_sidecar_mounts_the_same(render):
    r = render(VARIANTS["everything-classic"])
    c, native = wsgate_container(r.one("Deployment"))
    assert not native
    assert set(mounts_of(c)) == {"wsgate-config", "wsgate-jwks", "wsgate-admin-token"}
    app = next(x for x in pod_of(r)["containers"] if x["name"] == "app")
    assert "volumeMounts" not in app, "the app gets none of wsgate's files"


def test_toml_equals_the_values(render):
    cfg = parsed_config(render(KEY_LIMITS_VALUES))
    assert cfg["key_limits"] == expected_key_limits(KEY_LIMITS_VALUES)
    # Spelled out once, so a mistake shared by the helper and the template would still show.
    tenant, user, room = cfg["key_limits"]
    assert tenant["overrides"] == {"big-customer": 500, "internal": 0, 'acme"eu"\\west': 7}
    assert WEIRD_KEY in tenant["overrides"]
    assert user == {"name": "user", "key": "jwt_claim:sub", "max_per_key": 5, "path_prefix": "/chat",
                    "missing": "reject", "status": 503, "max_keys": 1000000, "fleet": False}
    assert room == {"name": "room", "key": "path_segment:2", "max_per_key": 200, "missing": "allow"}
    assert {k: v for k, v in cfg.items() if k != "key_limits"} == {
        "jwt_jwks_file": "/etc/wsgate/jwks/jwks.json",
        "jwt_issuer": "https://auth.example.com/",
        "jwt_audience": "chat",
        "jwt_require_exp": False,
        "jwt_from": "query:access_token",
    }


def test_integers_stay_integers(render):
    # Helm reads numbers as float64; 1e+06 would not be a TOML integer.
    cfg = parsed_config(render({"keyLimits": [{"name": "big", "key": "query:room", "maxPerKey": 10000000,
                                               "maxKeys": 5000000, "overrides": {"x": 123456789}}]}))
    (rule,) = cfg["key_limits"]
    assert rule["max_per_key"] == 10000000 and rule["max_keys"] == 5000000
    assert rule["overrides"] == {"x": 123456789}
    assert "e+" not in render({"keyLimits": [{"name": "big", "key": "query:room", "maxPerKey": 10000000}]}).config_toml()


def test_optional_fields_are_left_to_wsgates_defaults(render):
    cfg = parsed_config(render(VARIANTS["header-rule-only"]))
    assert cfg == {"key_limits": [{"name": "tenant", "key": "header:X-Tenant-Id", "max_per_key": 50}]}


def test_rule_order_is_kept(render):
    # wsgate checks rules in file order (first refusal wins).
    names = [f"r{i}" for i in (5, 1, 9, 3, 7, 2)]
    cfg = parsed_config(render({"keyLimits": [{"name": n, "key": f"header:X-{n}", "maxPerKey": 1} for n in names]}))
    assert [r["name"] for r in cfg["key_limits"]] == names


# Override keys: any visible ASCII, no spaces (what a key value can be). Issuer and audience: anything,
# including what TOML must escape (control characters, DEL) and what Go's JSON encoder escapes
# differently from other encoders (< > &, U+2028).
OVERRIDE_KEYS = ['a"b', "back\\slash", '\\"', "<&>", "#hash", "'single'", '"""', "\\u0041", "${x}",
                 "{{.Values}}", "a=1", "[table]", "", "x" * 256]
ISSUERS = ["tab\there", "nl\nx", "cr\rx", "del\x7fx", "ctl\x01\x1f", "üñí€ 日本", "\u2028\u2029", "'''", "back\\slash \"quote\""]


def test_strings_are_toml_escaped(render):
    overrides = {k: i for i, k in enumerate(OVERRIDE_KEYS)}
    for issuer in ISSUERS:
        values = {"keyLimits": [{"name": "t", "key": 'header:X-"odd"\\', "maxPerKey": 1, "overrides": overrides,
                                 "pathPrefix": "/a b/\"c\"/"}],
                  "jwt": {"jwksSecret": {"name": "j", "key": "k"}, "issuer": issuer, "audience": issuer + "2"}}
        cfg = parsed_config(render(values))
        assert cfg["jwt_issuer"] == issuer and cfg["jwt_audience"] == issuer + "2", repr(issuer)
        (rule,) = cfg["key_limits"]
        assert rule["key"] == 'header:X-"odd"\\'
        assert rule["path_prefix"] == '/a b/"c"/'
        assert rule["overrides"] == overrides


def test_secret_volumes(render):
    r = render(KEY_LIMITS_VALUES)
    c, _ = wsgate_container(r.one("Deployment"))
    mounts, vols, env = mounts_of(c), volumes_of(pod_of(r)), env_of(c)
    cfg = parsed_config(r)
    assert vols["wsgate-jwks"]["secret"] == {"secretName": "auth-jwks",
                                             "items": [{"key": "jwks.json", "path": "jwks.json"}]}
    assert mounts["wsgate-jwks"]["readOnly"] is True and "subPath" not in mounts["wsgate-jwks"]
    assert cfg["jwt_jwks_file"] == f"{mounts['wsgate-jwks']['mountPath']}/jwks.json"
    assert vols["wsgate-admin-token"]["secret"] == {"secretName": "wsgate-admin",
                                                    "items": [{"key": "token", "path": "token"}]}
    assert mounts["wsgate-admin-token"]["readOnly"] is True and "subPath" not in mounts["wsgate-admin-token"]
    assert env["WSGATE_ADMIN_TOKEN_FILE"] == f"{mounts['wsgate-admin-token']['mountPath']}/token"
    # The admin token is the binary's own key (admin_token_file), not part of the rules file.
    assert "admin_token_file" not in cfg
    # Custom Secret keys land under the fixed file names.
    r2 = render({"jwt": {"jwksSecret": {"name": "idp", "key": "keys.json"}},
                 "adminToken": {"secretName": "ops", "key": "bearer"}})
    vols2 = volumes_of(pod_of(r2))
    assert vols2["wsgate-jwks"]["secret"]["items"] == [{"key": "keys.json", "path": "jwks.json"}]
    assert vols2["wsgate-admin-token"]["secret"]["items"] == [{"key": "bearer", "path": "token"}]


def test_jwt_without_rules_renders_the_verifier_only(render):
    r = render(VARIANTS["jwt-only"])
    assert parsed_config(r) == {"jwt_jwks_file": "/etc/wsgate/jwks/jwks.json"}
    c, _ = wsgate_container(r.one("Deployment"))
    assert set(mounts_of(c)) == {"wsgate-config", "wsgate-jwks"}


def test_admin_token_alone_needs_no_config_file(render):
    r = render(VARIANTS["admin-token-only"])
    # No ConfigMap (the PodDisruptionBudget is the chart's automatic one for 2 replicas).
    assert r.kinds() == ["Deployment", "PodDisruptionBudget", "Service"]
    c, _ = wsgate_container(r.one("Deployment"))
    env = env_of(c)
    assert "WSGATE_CONFIG" not in env
    assert env["WSGATE_ADMIN_TOKEN_FILE"] == "/etc/wsgate/admin/token"
    assert set(mounts_of(c)) == {"wsgate-admin-token"} == set(volumes_of(pod_of(r)))


def test_defaults_render_no_config_map_volume_or_variable(render):
    for values in ({}, {"maxClients": 10}, {"nativeSidecar": False}, {"keyLimits": []}):
        r = render(values)
        assert r.kinds() == ["Deployment", "PodDisruptionBudget", "Service"], values
        pod = pod_of(r)
        c, _ = wsgate_container(r.one("Deployment"))
        assert "volumes" not in pod and "volumeMounts" not in c, values
        assert not {"WSGATE_CONFIG", "WSGATE_ADMIN_TOKEN_FILE"} & set(env_of(c)), values
        assert "Limits per key" not in r.notes


def test_a_rule_edit_changes_the_config_map_only(render):
    """helm upgrade with edited rules must not touch the pod template (that would roll the pods):
    wsgate reloads the mounted file in place."""
    before = render(KEY_LIMITS_VALUES)
    edited = copy.deepcopy(KEY_LIMITS_VALUES)
    edited["keyLimits"][0]["maxPerKey"] = 60
    edited["keyLimits"][0]["overrides"]["newcomer"] = 5
    edited["keyLimits"].append({"name": "extra", "key": "cookie:team", "maxPerKey": 3})
    edited["jwt"]["audience"] = "chat-v2"
    after = render(edited)
    assert before.one("Deployment") == after.one("Deployment")
    assert before.config_toml() != after.config_toml()
    assert parsed_config(after)["key_limits"][0]["max_per_key"] == 60


def test_notes_name_the_rules_and_the_keys_endpoint(render):
    notes = render(KEY_LIMITS_VALUES).notes
    assert "tenant (header:X-Tenant-Id, 50 per key)" in notes
    assert "chat-wsgate-config" in notes
    assert "/keys?rule=tenant" in notes and "secret wsgate-admin" in notes


R = {"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 50}

# Refused by values.schema.json (so `helm lint` reports them too).
SCHEMA_REFUSES = {
    "bad name (upper case)": {"keyLimits": [{**R, "name": "Tenant"}]},
    "bad name (dash)": {"keyLimits": [{**R, "name": "my-tenant"}]},
    "bad name (too long)": {"keyLimits": [{**R, "name": "a" * 33}]},
    "bad name (empty)": {"keyLimits": [{**R, "name": ""}]},
    "bad key (unknown source)": {"keyLimits": [{**R, "key": "ip:client"}]},
    "bad key (no name)": {"keyLimits": [{**R, "key": "header:"}]},
    "bad key (segment 0)": {"keyLimits": [{**R, "key": "path_segment:0"}]},
    "bad key (segment not a number)": {"keyLimits": [{**R, "key": "path_segment:x"}]},
    "maxPerKey 0": {"keyLimits": [{**R, "maxPerKey": 0}]},
    "maxPerKey fractional": {"keyLimits": [{**R, "maxPerKey": 1.5}]},
    "status 404": {"keyLimits": [{**R, "status": 404}]},
    "missing maybe": {"keyLimits": [{**R, "missing": "maybe"}]},
    "negative override": {"keyLimits": [{**R, "overrides": {"a": -1}}]},
    "string override": {"keyLimits": [{**R, "overrides": {"a": "lots"}}]},
    "override key with a control character": {"keyLimits": [{**R, "overrides": {"a\tb": 1}}]},
    "override key with a space": {"keyLimits": [{**R, "overrides": {"a b": 1}}]},
    "override key too long": {"keyLimits": [{**R, "overrides": {"x" * 257: 1}}]},
    "pathPrefix without slash": {"keyLimits": [{**R, "pathPrefix": "chat"}]},
    "maxKeys 0": {"keyLimits": [{**R, "maxKeys": 0}]},
    "fleet as a string": {"keyLimits": [{**R, "fleet": "yes"}]},
    "unknown rule field": {"keyLimits": [{**R, "max_per_key": 5}]},
    "no name": {"keyLimits": [{"key": "header:X", "maxPerKey": 1}]},
    "no key": {"keyLimits": [{"name": "t", "maxPerKey": 1}]},
    "no maxPerKey": {"keyLimits": [{"name": "t", "key": "header:X"}]},
    "rules not a list": {"keyLimits": {"tenant": R}},
    "jwt.from unknown source": {"jwt": {"from": "body:token"}},
    "jwt unknown field": {"jwt": {"jwks": "x"}},
    "bad Secret name": {"jwt": {"jwksSecret": {"name": "Auth_JWKS", "key": "jwks.json"}}},
    "bad Secret key": {"adminToken": {"secretName": "ops", "key": "a/b"}},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_rules(helm, chart, render, case):
    assert_schema_refuses(helm, chart, render, case, SCHEMA_REFUSES[case])


def test_schema_accepts_every_documented_form(chart):
    for key in ("header:X-Tenant-Id", "query:room", "cookie:session", "path_segment:1", "path_segment:12",
                "jwt_claim:sub", "jwt_claim:https://example.com/tenant"):
        chart.validate_schema(deep_merge(chart.values, {"keyLimits": [{**R, "key": key}]}))
    for rule in ({**R, "missing": m, "status": s} for m in ("shared", "allow", "reject") for s in (429, 503)):
        chart.validate_schema(deep_merge(chart.values, {"keyLimits": [rule]}))
    chart.validate_schema(deep_merge(chart.values, {"keyLimits": [{**R, "overrides": {"": 3, WEIRD_KEY: 0}}]}))
    for src in ("", "header:Authorization", "query:access_token", "cookie:jwt"):
        chart.validate_schema(deep_merge(chart.values, {"jwt": {"from": src}}))


# Refused at render time by wsgate.validateKeyLimits: JSON Schema cannot compare list items with
# each other or look at another value.
RENDER_REFUSES = {
    "duplicate rule names": ({"keyLimits": [R, {**R, "key": "query:t"}, {**R, "name": "other"}]},
                             r"keyLimits\[1\]: the rule name \"tenant\" is used twice \(keyLimits\[0\]"),
    "jwt_claim rule without a JWKS Secret": ({"keyLimits": [R, {**R, "name": "user", "key": "jwt_claim:sub"}]},
                                             r"keyLimits\[1\] \(user\): key \"jwt_claim:sub\" needs jwt.jwksSecret.name"),
    "jwt settings without a JWKS Secret": ({"jwt": {"issuer": "https://auth.example.com/"}},
                                           r"jwt.issuer, jwt.audience and jwt.from take effect only with jwt.jwksSecret.name"),
}


@pytest.mark.parametrize("case", sorted(RENDER_REFUSES))
def test_render_refuses_what_the_schema_cannot_say(helm, chart, render, case):
    values, message = RENDER_REFUSES[case]
    assert_render_refuses(helm, chart, render, values, message)


def _readme_example() -> tuple[dict[str, Any], str]:
    section = chart_readme_section("Limits per tenant")
    values = yaml.safe_load(fenced(section, "yaml"))
    toml_text = fenced(section, "toml")
    return values, toml_text


def test_readme_example_is_what_the_chart_renders(render):
    values, toml_text = _readme_example()
    assert tomllib.loads(toml_text) == parsed_config(render(values))
    assert toml_text.strip() in render(values).config_toml()


def test_included_by_another_chart_with_its_volumes(helm, tmp_path: Path):
    """A parent chart that includes wsgate.container also includes wsgate.volumes; the subchart
    renders the ConfigMap under the name the volume refers to."""
    parent = parent_chart(tmp_path, {**KEY_LIMITS_VALUES, "deployment": {"enabled": False},
                                     "service": {"enabled": False}}, with_volumes=True)
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    c, _ = wsgate_container(dep)
    assert set(mounts_of(c)) == set(volumes_of(pod)) == {"wsgate-config", "wsgate-jwks", "wsgate-admin-token"}
    assert volumes_of(pod)["wsgate-config"]["configMap"]["name"] == cm["metadata"]["name"] == "myapp-wsgate-config"
    assert tomllib.loads(cm["data"]["config.toml"])["key_limits"] == expected_key_limits(KEY_LIMITS_VALUES)
    validate_all(docs, tmp_path)
