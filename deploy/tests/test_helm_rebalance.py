"""Automatic rebalancing (docs/operations.md#automatic-rebalancing) in the Helm chart.

`fleet.rebalance.{enabled,tolerance,after,period,cooldown,closeCode}` are rendered as WSGATE_REBALANCE*
and WSGATE_CLOSE_CODE_REBALANCE on the wsgate container (templates/_helpers.tpl: wsgate.rebalanceEnv),
each only when it differs from wsgate's default (false, 0.1, 30s, 30s, 2m, 1012; durations compared in
seconds) and only with a Redis configured, like the WSGATE_FLEET_* variables: a release that sets none
of them renders exactly what it did before. `enabled: true` without a Redis fails the render naming
the fix (wsgate would exit 2), also for a chart that includes the container and skips the schema
(wsgate.validateRebalance); the schema refuses the values wsgate would refuse. The chart README and
NOTES say the same. The plain manifests (deploy/kubernetes/) carry no fleet variables, commented or
not, so they carry no rebalancing variables either.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import (
    CHART,
    FLEET_VALUES,
    KUBE_DIR,
    REBALANCE_ENV,
    REBALANCE_RENDERED,
    Rendered,
    assert_lint_clean,
    assert_render_refuses,
    assert_schema_refuses,
    chart_readme_section,
    deep_merge,
    env_of,
    fenced,
    parent_chart,
    wsgate_container,
)

URL = "redis://redis.prod.svc:6379/0"
SECRET_URL = {"name": "wsgate-redis", "key": "url"}
NAMES = [name for name, _ in REBALANCE_ENV.values()]
REFUSED = (r"fleet.rebalance.enabled is true, but no Redis is configured: pods find each other through the "
           r"fleet's Redis. Set fleet.redisUrl or fleet.redisUrlSecret.name, or set fleet.rebalance.enabled to false")

# One value alone away from its default (with a Redis), and the variable it renders.
ALONE: dict[str, tuple[str, Any, str]] = {
    "enabled": ("enabled", True, "true"),
    "tolerance": ("tolerance", 0.25, "0.25"),
    "tolerance-zero": ("tolerance", 0, "0"),
    "tolerance-max": ("tolerance", 10, "10"),
    "after": ("after", "1m", "1m"),
    "after-bare-seconds": ("after", 45, "45"),
    "after-sub-second": ("after", "500ms", "500ms"),
    "period": ("period", "10s", "10s"),
    "period-compound": ("period", "1m 30s", "1m 30s"),
    "cooldown": ("cooldown", "10m", "10m"),
    "cooldown-zero": ("cooldown", "0s", "0s"),
    "closeCode": ("closeCode", 4000, "4000"),
    "closeCode-going-away": ("closeCode", 1001, "1001"),
}

# Another spelling of the default: renders nothing.
SAME_AS_DEFAULT: list[dict[str, Any]] = [
    {"after": "30"}, {"after": 30}, {"after": "30000ms"}, {"after": "0m 30s"}, {"after": "30s"},
    {"period": "30"}, {"period": 30}, {"period": "30000ms"}, {"period": "30s"},
    {"cooldown": "120s"}, {"cooldown": 120}, {"cooldown": "120000ms"}, {"cooldown": "1m 60s"}, {"cooldown": "2m"},
    {"tolerance": 0.10}, {"tolerance": 0.1}, {"closeCode": 1012}, {"enabled": False},
]

# Variants rendered, linted and validated against the Kubernetes schemas (test_chart_variants.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "everything": FLEET_VALUES,
    "enabled-plain-url-defaults": {"fleet": {"redisUrl": URL, "rebalance": {"enabled": True}}},
    "enabled-classic-monitored": {"nativeSidecar": False, "fleet": {"redisUrlSecret": SECRET_URL,
                                                                     "rebalance": {"enabled": True, "tolerance": 0.5}},
                                  "maxClients": 1000, "shutdownDelay": "10s",
                                  "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                  "grafanaDashboard": {"enabled": True}},
}


def wsgate_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def new_env(r) -> dict[str, str]:
    return {n: v for n, v in env_of(wsgate_of(r)).items() if n in NAMES}


def with_redis(rebalance: dict[str, Any]) -> dict[str, Any]:
    return {"fleet": {"redisUrl": URL, "rebalance": rebalance}}


def test_every_value_reaches_its_variable(render):
    env = new_env(render(FLEET_VALUES))
    assert env == REBALANCE_RENDERED
    assert list(env) == NAMES  # in the order of REBALANCE_ENV
    assert set(FLEET_VALUES["fleet"]["rebalance"]) == set(REBALANCE_ENV)


@pytest.mark.parametrize("case", sorted(ALONE))
def test_each_value_alone_renders_its_variable_only(render, case):
    key, value, rendered = ALONE[case]
    assert new_env(render(with_redis({key: value}))) == {REBALANCE_ENV[key][0]: rendered}


def test_defaults_render_none_of_them(render, chart):
    assert chart.values["fleet"]["rebalance"] == {k: default for k, (_, default) in REBALANCE_ENV.items()}
    base = wsgate_of(render({"fleet": {"redisUrl": URL}}))
    assert not set(NAMES) & set(env_of(base))
    # The defaults given explicitly change nothing at all: the same container.
    explicit = with_redis({k: default for k, (_, default) in REBALANCE_ENV.items()})
    assert wsgate_of(render(explicit)) == base
    assert not set(NAMES) & set(env_of(wsgate_of(render({}))))
    assert "Rebalancing" not in render({"fleet": {"redisUrl": URL}}).notes


@pytest.mark.parametrize("same", SAME_AS_DEFAULT, ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()))
def test_durations_are_compared_in_seconds(render, same):
    """"30s", "30", 30 and "30000ms" are all wsgate's 30 s: no variable; the container is the default one."""
    base = wsgate_of(render({"fleet": {"redisUrl": URL}}))
    assert wsgate_of(render(with_redis(same))) == base


def test_durations_near_the_default_are_rendered_as_given(render):
    for key, default in (("after", 30), ("period", 30), ("cooldown", 120)):
        for given in (f"{default - 1}s", f"{default + 1}s", f"{default * 1000 + 1}ms", default + 1):
            assert new_env(render(with_redis({key: given}))) == {REBALANCE_ENV[key][0]: str(given)}, (key, given)


def test_without_a_redis_the_tuning_values_render_nothing(render):
    """Like the WSGATE_FLEET_* variables: without a Redis the values only take effect with, nothing is rendered
    (and the render does not fail while rebalancing stays off)."""
    base = wsgate_of(render({}))
    tuned = {k: v for k, v in FLEET_VALUES["fleet"]["rebalance"].items() if k != "enabled"}
    assert wsgate_of(render({"fleet": {"rebalance": tuned}})) == base


def test_variables_sit_after_the_fleet_ones_and_before_the_config_file_and_extra_env(render):
    values = deep_merge(FLEET_VALUES, {"messageGuards": {"maxMessageSize": 1024},
                                       "extraEnv": [{"name": "WSGATE_REBALANCE", "value": "false"}]})
    names = [e["name"] for e in wsgate_of(render(values))["env"]]
    at = [i for i, n in enumerate(names) if n in NAMES][:-1]  # the last one is extraEnv's
    assert [names[i] for i in at] == NAMES
    assert at == list(range(at[0], at[0] + len(NAMES)))
    assert names[at[0] - 1] == "WSGATE_FLEET_FAIL_MODE"
    assert at[-1] < names.index("WSGATE_MAX_MESSAGE_SIZE") < names.index("WSGATE_CONFIG")
    assert names[-1] == "WSGATE_REBALANCE", "extraEnv comes last, so it can override them"


def test_a_change_rolls_the_pods_and_never_touches_the_config_file(render):
    before = render(FLEET_VALUES)
    after = render(deep_merge(FLEET_VALUES, {"fleet": {"rebalance": {"tolerance": 0.3}}}))
    assert before.one("Deployment") != after.one("Deployment")
    assert new_env(after)["WSGATE_REBALANCE_TOLERANCE"] == "0.3"
    toml = before.config_toml()
    assert toml and not re.search(r"^(rebalance|close_code_rebalance)", toml, re.M)


# ---- enabled without a Redis --------------------------------------------------------------------------


@pytest.mark.parametrize("values", [
    {"fleet": {"rebalance": {"enabled": True}}},
    {"fleet": {"rebalance": {"enabled": True}, "namespace": "chat", "maxClients": 0}},
    {"fleet": {"redisUrl": "", "redisUrlSecret": {"name": "", "key": "url"},
               "rebalance": {**FLEET_VALUES["fleet"]["rebalance"]}}},
    {"fleet": {"rebalance": {"enabled": True}}, "keyLimits": [{"name": "tenant", "key": "header:X", "maxPerKey": 5}]},
], ids=["alone", "with-fleet-values", "every-rebalance-value", "with-key-rules"])
def test_enabled_without_a_redis_is_refused_naming_the_fix(helm, chart, render, values):
    assert_render_refuses(helm, chart, render, values, REFUSED)


def test_enabled_with_either_kind_of_redis_renders(render):
    for fleet in ({"redisUrl": URL}, {"redisUrlSecret": SECRET_URL}):
        env = new_env(render({"fleet": {**fleet, "rebalance": {"enabled": True}}}))
        assert env == {"WSGATE_REBALANCE": "true"}


@pytest.fixture(scope="module")
def schemaless(helm, tmp_path_factory):
    copy_dir = tmp_path_factory.mktemp("schemaless") / "wsgate"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(str(copy_dir)) as c:
        yield c


def test_the_template_refuses_it_without_the_schema(helm, render, schemaless):
    with pytest.raises(helm.HelmRenderError, match=REFUSED):
        schemaless.render({"fleet": {"rebalance": {"enabled": True}}}, name="chat", namespace="prod")
    # Good values render alike.
    r = Rendered(schemaless.render(FLEET_VALUES, name="chat", namespace="prod"))
    assert wsgate_of(r) == wsgate_of(render(FLEET_VALUES))


def _parent_deployment(helm, parent: Path) -> dict[str, Any]:
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    return dep


@pytest.mark.parametrize("schema", [True, False], ids=["with-schema", "schema-removed"])
def test_included_by_another_chart(helm, tmp_path, schema):
    """A parent chart that includes wsgate.container gets the variables, and the same refusal; with
    the subchart's schema removed too (a parent that vendors the templates only)."""
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}

    def parent(sub: str, values: dict[str, Any]) -> Path:
        p = parent_chart(tmp_path / sub, {**off, **values})
        if not schema:
            (p / "charts" / "wsgate" / "values.schema.json").unlink()
        return p

    good = parent("good", {"fleet": {**FLEET_VALUES["fleet"], "namespace": "myapp"}})
    env = env_of(wsgate_container(_parent_deployment(helm, good))[0])
    assert {n: v for n, v in env.items() if n in NAMES} == REBALANCE_RENDERED
    report = helm.lint(str(good), strict=True)
    assert report["errors"] == [], report
    bad = parent("bad", {"fleet": {"namespace": "myapp", "rebalance": {"enabled": True}}})
    with pytest.raises(helm.HelmRenderError, match=REFUSED):
        _parent_deployment(helm, bad)


# ---- the schema ---------------------------------------------------------------------------------------

# Refused by values.schema.json (so `helm lint` reports them too), each with the path the error names.
SCHEMA_REFUSES: dict[str, tuple[dict[str, Any], str]] = {
    "tolerance negative": (with_redis({"tolerance": -0.1}), "/fleet/rebalance/tolerance"),
    "tolerance above 10": (with_redis({"tolerance": 10.5}), "/fleet/rebalance/tolerance"),
    "tolerance a string": (with_redis({"tolerance": "0.2"}), "/fleet/rebalance/tolerance"),
    "closeCode 1006": (with_redis({"closeCode": 1006}), "/fleet/rebalance/closeCode"),
    "closeCode 1004": (with_redis({"closeCode": 1004}), "/fleet/rebalance/closeCode"),
    "closeCode 1015": (with_redis({"closeCode": 1015}), "/fleet/rebalance/closeCode"),
    "closeCode 999": (with_redis({"closeCode": 999}), "/fleet/rebalance/closeCode"),
    "closeCode 2000": (with_redis({"closeCode": 2000}), "/fleet/rebalance/closeCode"),
    "closeCode 5000": (with_redis({"closeCode": 5000}), "/fleet/rebalance/closeCode"),
    "closeCode fractional": (with_redis({"closeCode": 1012.5}), "/fleet/rebalance/closeCode"),
    "after a word": (with_redis({"after": "soon"}), "/fleet/rebalance/after"),
    "after negative": (with_redis({"after": "-30s"}), "/fleet/rebalance/after"),
    "period fractional": (with_redis({"period": "1.5m"}), "/fleet/rebalance/period"),
    "period unit unknown": (with_redis({"period": "30 sec"}), "/fleet/rebalance/period"),
    "cooldown negative number": (with_redis({"cooldown": -1}), "/fleet/rebalance/cooldown"),
    "cooldown a bool": (with_redis({"cooldown": False}), "/fleet/rebalance/cooldown"),
    "enabled a string": (with_redis({"enabled": "true"}), "/fleet/rebalance/enabled"),
    "unknown key": (with_redis({"enable": True}), "/fleet/rebalance"),
    "snake_case key": (with_redis({"close_code": 1012}), "/fleet/rebalance"),
    "rebalance a bool": ({"fleet": {"redisUrl": URL, "rebalance": True}}, "/fleet/rebalance"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_values_naming_them(helm, chart, render, case):
    values, path = SCHEMA_REFUSES[case]
    assert_schema_refuses(helm, chart, render, case, values)
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert f"'{path}'" in str(err.value), str(err.value)


def test_schema_accepts_every_documented_form(chart):
    accepted = [{"tolerance": t} for t in (0, 0.05, 0.1, 1, 10)]
    accepted += [{"closeCode": c} for c in (1000, 1003, 1007, 1012, 1014, 3000, 4000, 4999)]
    accepted += [{k: d} for k in ("after", "period", "cooldown") for d in ("0s", "30s", "1m 30s", "250ms", 45, "2h")]
    accepted += [{"enabled": True}, {"enabled": False}, {}, FLEET_VALUES["fleet"]["rebalance"]]
    for rebalance in accepted:
        chart.validate_schema(deep_merge(chart.values, with_redis(rebalance)))


# ---- lint, NOTES, README, plain manifests -----------------------------------------------------------------


def test_lint_is_clean_with_every_value(helm):
    assert_lint_clean(helm, FLEET_VALUES)


def test_notes_say_rebalancing_is_on(render):
    notes = render(FLEET_VALUES).notes
    assert ("Rebalancing on: a pod above the fleet mean x (1 + 0.2) for 1m turns unready, waits shutdownDelay (5s), "
            "then closes its excess over the mean, oldest first, over 45s (Close 4012); at most one shed per 5m. "
            'Dashboard row "Fleet balance".') in notes
    notes = render({"fleet": {"redisUrl": URL, "rebalance": {"enabled": True}}}).notes
    assert "fleet mean x (1 + 0.1) for 30s" in notes and "over 30s (Close 1012); at most one shed per 2m." in notes
    # Under the fleet's own lines.
    assert notes.index("Limits across replicas") < notes.index("Rebalancing on")
    for off in ({"fleet": {"redisUrl": URL}}, with_redis({"tolerance": 0.5}), {}):
        assert "Rebalancing" not in render(off).notes, off


def test_readme_example_renders_as_it_says(render):
    section = chart_readme_section("Limits across replicas").split("### Rebalancing after a scale-out", 1)[1]
    values = yaml.safe_load(fenced(section, "yaml"))
    assert values["fleet"]["rebalance"] == {"enabled": True}
    assert new_env(render(values)) == {"WSGATE_REBALANCE": "true"}


def test_readme_documents_every_value():
    section = chart_readme_section("Limits across replicas").split("### Rebalancing after a scale-out", 1)[1]
    for key, (env, default) in REBALANCE_ENV.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `fleet.rebalance.{key}` |")), None)
        assert row, f"no table row for fleet.rebalance.{key}"
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert f"`{env}`" in row and f"`{shown}`" in row, row
    for needle in ("shutdownDelay", "readiness", "1012", "Fleet balance", "operations.md#automatic-rebalancing",
                   "compared in", "without a Redis"):
        assert needle in section, needle
    values_row = next(line for line in (CHART / "README.md").read_text().split("## Values", 1)[1].splitlines()
                      if line.startswith("| `fleet` |"))
    assert "rebalance.{enabled: false,tolerance: 0.1,after: 30s,period: 30s,cooldown: 2m,closeCode: 1012}" in values_row


def test_values_yaml_names_each_variable():
    text = (CHART / "values.yaml").read_text()
    block = text.split("\n  rebalance:\n", 1)[1].split("\n\n", 1)[0]
    for key, (env, _) in REBALANCE_ENV.items():
        assert f"    {key}:" in block and env in block, key


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_follow_what_they_do_for_the_fleet(file):
    """The plain manifests list no WSGATE_FLEET_* variable, commented or not (a fleet needs a Redis the
    examples do not have), so they list no rebalancing variable either; should they ever show the fleet's,
    the rebalancing ones belong beside them."""
    text = (KUBE_DIR / file).read_text()
    has_fleet = "WSGATE_FLEET_" in text
    for name in NAMES:
        assert (name in text) == has_fleet, (file, name)
