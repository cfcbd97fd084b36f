"""Message guards (docs/operations.md#message-guards) in the Helm chart: `messageGuards.*` rendered as WSGATE_* variables on
the wsgate container, each only when its value differs from the default (all off, throttle), so a
release without guards renders exactly what it did before them; the schema (and, for the action,
the template) refusing what wsgate would refuse; the chart README and NOTES; and the commented-out
block of the plain manifests, which says the same as the chart.

Like the fleet values, the guards are environment variables, not part of the mounted config.toml:
a change rolls the pods.
"""

from __future__ import annotations

import copy
import re
import shutil
from typing import Any

import pytest
import yaml

from conftest import (
    chart_readme_section,
    commented_env_block,
    fenced,
    CHART,
    KUBE_DIR,
    MESSAGE_GUARDS_ENV,
    MESSAGE_GUARDS_VALUES,
    assert_schema_refuses,
    deep_merge,
    env_of,
    parent_chart,
    wsgate_container,
)

GUARD_NAMES = {name for name, _ in MESSAGE_GUARDS_ENV.values()}

# One value set per guard value, each alone and away from its default.
ALONE: dict[str, Any] = {"maxMessageSize": 65536, "messageRate": 100, "messageBurst": 10,
                         "messageRateAction": "close", "byteRate": 1048576, "byteBurst": 2097152,
                         "maxFragments": 0}
# ... and the variable each renders.
ALONE_ENV = {"maxMessageSize": "65536", "messageRate": "100", "messageBurst": "10", "messageRateAction": "close",
             "byteRate": "1048576", "byteBurst": "2097152", "maxFragments": "0"}

# Variants rendered, linted and validated against the Kubernetes schemas.
VARIANTS: dict[str, dict[str, Any]] = {
    "everything": MESSAGE_GUARDS_VALUES,
    "everything-classic-monitored": {**MESSAGE_GUARDS_VALUES, "nativeSidecar": False, "podMonitor": {"enabled": True},
                                     "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "size-only": {"messageGuards": {"maxMessageSize": 1048576}},
    "rate-throttle-fractional": {"messageGuards": {"messageRate": 0.5}},
    "bytes-only": {"messageGuards": {"byteRate": 65536}},
    "with-fleet-and-key-limits": {**MESSAGE_GUARDS_VALUES, "fleet": {"redisUrl": "redis://redis:6379/0"},
                                  "keyLimits": [{"name": "tenant", "key": "header:X-Tenant-Id", "maxPerKey": 5}]},
}


def wsgate_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def guard_env(r) -> dict[str, str]:
    return {n: v for n, v in env_of(wsgate_of(r)).items() if n in GUARD_NAMES}


def test_every_value_reaches_its_variable(render):
    env = guard_env(render(MESSAGE_GUARDS_VALUES))
    assert env == {"WSGATE_MAX_MESSAGE_SIZE": "16777216", "WSGATE_MESSAGE_RATE": "2.5", "WSGATE_MESSAGE_BURST": "10",
                   "WSGATE_MESSAGE_RATE_ACTION": "close", "WSGATE_BYTE_RATE": "1048576",
                   "WSGATE_BYTE_BURST": "4194304", "WSGATE_MAX_FRAGMENTS": "64"}
    want = {MESSAGE_GUARDS_ENV[k][0]: str(v) for k, v in MESSAGE_GUARDS_VALUES["messageGuards"].items()}
    assert env == want


@pytest.mark.parametrize("key", sorted(ALONE))
def test_each_value_alone_renders_its_variable_only(render, key):
    env = guard_env(render({"messageGuards": {key: ALONE[key]}}))
    assert env == {MESSAGE_GUARDS_ENV[key][0]: ALONE_ENV[key]}


def test_defaults_render_none_of_them(render, chart):
    assert chart.values["messageGuards"] == {k: default for k, (_, default) in MESSAGE_GUARDS_ENV.items()}
    base = wsgate_of(render({}))
    assert not GUARD_NAMES & set(env_of(base))
    # The defaults given explicitly (or as 0.0) change nothing at all: the same container.
    explicit = {k: default for k, (_, default) in MESSAGE_GUARDS_ENV.items()}
    assert wsgate_of(render({"messageGuards": explicit})) == base
    assert wsgate_of(render({"messageGuards": {"messageRate": 0.0, "messageRateAction": "throttle"}})) == base
    assert "Message guards" not in render({}).notes


def test_numbers_are_never_in_float_notation(render):
    env = guard_env(render({"messageGuards": {"maxMessageSize": 1073741824, "messageRate": 1000000,
                                              "messageBurst": 5000000, "byteRate": 104857600,
                                              "byteBurst": 209715200}}))
    assert env == {"WSGATE_MAX_MESSAGE_SIZE": "1073741824", "WSGATE_MESSAGE_RATE": "1000000",
                   "WSGATE_MESSAGE_BURST": "5000000", "WSGATE_BYTE_RATE": "104857600",
                   "WSGATE_BYTE_BURST": "209715200"}
    for rate, text in ((0.5, "0.5"), (2.0, "2"), (0.25, "0.25"), (12.75, "12.75"), (1, "1")):
        assert guard_env(render({"messageGuards": {"messageRate": rate}})) == {"WSGATE_MESSAGE_RATE": text}, rate


def test_a_burst_or_action_without_its_rate_is_passed_on_as_given(render):
    """Each value maps to its variable on its own; wsgate ignores a burst (or an action) whose rate is
    off, as the README says. Nothing is dropped or refused behind the operator's back."""
    env = guard_env(render({"messageGuards": {"messageBurst": 5, "messageRateAction": "close", "byteBurst": 10}}))
    assert env == {"WSGATE_MESSAGE_BURST": "5", "WSGATE_MESSAGE_RATE_ACTION": "close", "WSGATE_BYTE_BURST": "10"}


def test_guard_variables_sit_after_the_fleet_and_before_the_config_file_and_extra_env(render):
    """SPEC order (§2 ... §10, §11), before WSGATE_CONFIG and extraEnv, so extraEnv can still
    override any of them."""
    values = copy.deepcopy(VARIANTS["with-fleet-and-key-limits"])
    values["extraEnv"] = [{"name": "WSGATE_MESSAGE_RATE", "value": "7"}]
    names = [e["name"] for e in wsgate_of(render(values))["env"]]
    at = [i for i, n in enumerate(names) if n in GUARD_NAMES][:-1]  # the last one is extraEnv's
    assert [names[i] for i in at] == [name for name, _ in MESSAGE_GUARDS_ENV.values()]
    assert at == list(range(at[0], at[0] + len(GUARD_NAMES)))
    assert names.index("WSGATE_FLEET_FAIL_MODE") < at[0] and at[-1] < names.index("WSGATE_CONFIG")
    assert names[-1] == "WSGATE_MESSAGE_RATE"


def test_a_guard_change_rolls_the_pods(render):
    before = render(MESSAGE_GUARDS_VALUES)
    after = render(deep_merge(MESSAGE_GUARDS_VALUES, {"messageGuards": {"maxMessageSize": 65536}}))
    assert before.one("Deployment") != after.one("Deployment")
    assert guard_env(after)["WSGATE_MAX_MESSAGE_SIZE"] == "65536"
    # Never in the mounted config file (which exists only with keyLimits / jwt).
    toml = render(VARIANTS["with-fleet-and-key-limits"]).config_toml()
    assert toml and not re.search(r"^(max_message|message_|byte_)", toml, re.M)


def test_notes_describe_the_guards(render):
    notes = render(MESSAGE_GUARDS_VALUES).notes
    assert "Message guards (per connection, client -> upstream; upstream -> client is never limited):" in notes
    assert ("message size at most 16777216 bytes (Close 1009 over it); message rate 2.5/s, burst 10, then close "
            "(Close 1008); byte rate 1048576 bytes/s, burst 4194304, then throttle; frames per message at most 64 "
            "(Close 1009 over it).") in notes
    notes = render({"messageGuards": {"messageRate": 50}}).notes
    assert ("message size off; message rate 50/s, burst = rate, then throttle; byte rate off; frames per message "
            "at most 1024 (Close 1009 over it).") in notes
    notes = render({"messageGuards": {"maxFragments": 0}}).notes
    assert "message size off; message rate off; byte rate off; frames per message unlimited." in notes


# Refused by values.schema.json (so `helm lint` reports them too).
SCHEMA_REFUSES = {
    "action drop": {"messageGuards": {"messageRateAction": "drop"}},
    "action capitalised": {"messageGuards": {"messageRateAction": "Close"}},
    "action empty": {"messageGuards": {"messageRateAction": ""}},
    "maxMessageSize negative": {"messageGuards": {"maxMessageSize": -1}},
    "maxMessageSize fractional": {"messageGuards": {"maxMessageSize": 1.5}},
    "maxMessageSize with a unit": {"messageGuards": {"maxMessageSize": "1MiB"}},
    "messageRate a word": {"messageGuards": {"messageRate": "fast"}},
    "messageRate negative": {"messageGuards": {"messageRate": -0.5}},
    "messageRate a numeric string": {"messageGuards": {"messageRate": "100"}},
    "messageBurst negative": {"messageGuards": {"messageBurst": -1}},
    "messageBurst fractional": {"messageGuards": {"messageBurst": 2.5}},
    "byteRate negative": {"messageGuards": {"byteRate": -1}},
    "byteRate with a unit": {"messageGuards": {"byteRate": "1MiB/s"}},
    "byteRate fractional": {"messageGuards": {"byteRate": 0.5}},
    "byteBurst negative": {"messageGuards": {"byteBurst": -1}},
    "maxFragments negative": {"messageGuards": {"maxFragments": -1}},
    "maxFragments fractional": {"messageGuards": {"maxFragments": 2.5}},
    "maxFragments a string": {"messageGuards": {"maxFragments": "1024"}},
    "unknown guard value": {"messageGuards": {"maxMessageBytes": 1024}},
    "snake_case key": {"messageGuards": {"max_message_size": 1024}},
    "guards not an object": {"messageGuards": "on"},
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_values(helm, chart, render, case):
    assert_schema_refuses(helm, chart, render, case, SCHEMA_REFUSES[case])


@pytest.mark.parametrize("values,path,says", [
    ({"messageRateAction": "drop"}, "/messageGuards/messageRateAction", "'throttle', 'close'"),
    ({"maxMessageSize": -1}, "/messageGuards/maxMessageSize", "minimum"),
    ({"messageRate": "fast"}, "/messageGuards/messageRate", "want number"),
])
def test_schema_refusal_names_the_value(helm, render, values, path, says):
    """The message an operator sees names the value and what is wrong with it."""
    with pytest.raises(helm.HelmValuesError) as err:
        render({"messageGuards": values})
    assert path in str(err.value) and says in str(err.value), str(err.value)


def test_schema_accepts_every_documented_form(chart):
    for guards in ({"maxMessageSize": 0}, {"maxMessageSize": 1}, {"maxMessageSize": 16777216},
                   {"messageRate": 0}, {"messageRate": 0.5}, {"messageRate": 100}, {"messageRate": 1e6},
                   {"messageBurst": 0}, {"messageBurst": 200}, {"messageRateAction": "throttle"},
                   {"messageRateAction": "close"}, {"byteRate": 0}, {"byteRate": 1048576},
                   {"byteBurst": 0}, {"byteBurst": 4194304}, {"maxFragments": 0}, {"maxFragments": 1},
                   {"maxFragments": 1024}, {"maxFragments": 100000}, MESSAGE_GUARDS_VALUES["messageGuards"]):
        chart.validate_schema(deep_merge(chart.values, {"messageGuards": guards}))


def test_action_is_checked_by_the_template_too(helm, tmp_path):
    """The schema refuses a bad action first; the template refuses it as well, for a parent chart
    that skips schema validation or pins an older copy of the schema."""
    copy_dir = tmp_path / "wsgate"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(str(copy_dir)) as c:
        with pytest.raises(helm.HelmRenderError,
                           match=r"messageGuards.messageRateAction \"drop\": must be throttle .* or close"):
            c.render({"messageGuards": {"messageRate": 10, "messageRateAction": "drop"}}, name="chat", namespace="prod")


def test_included_by_another_chart(helm, tmp_path):
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    parent = parent_chart(tmp_path / "a", {**off, **MESSAGE_GUARDS_VALUES})
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = env_of(wsgate_container(dep)[0])
    assert {n: v for n, v in env.items() if n in GUARD_NAMES} == {
        MESSAGE_GUARDS_ENV[k][0]: str(v) for k, v in MESSAGE_GUARDS_VALUES["messageGuards"].items()}
    report = helm.lint(str(parent), strict=True)
    assert report["errors"] == [], report


def test_readme_example_renders_as_it_says(render):
    section = chart_readme_section("Message guards")
    values = yaml.safe_load(fenced(section, "yaml"))
    env = guard_env(render(values))
    # messageRateAction: throttle is the default, so the example renders no variable for it.
    assert env == {"WSGATE_MAX_MESSAGE_SIZE": "1048576", "WSGATE_MESSAGE_RATE": "50", "WSGATE_MESSAGE_BURST": "200",
                   "WSGATE_BYTE_RATE": "1048576"}


def test_readme_documents_every_value_and_the_semantics(chart):
    section = chart_readme_section("Message guards")
    for key, (env, default) in MESSAGE_GUARDS_ENV.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `messageGuards.{key}` |")), None)
        assert row, f"no table row for messageGuards.{key}"
        assert f"`{env}`" in row and f"`{default}`" in row, row
    for needle in ("1009", "1001", "1008", "throttle", "close", "on the wire", "permessage-deflate",
                   "never limited", "keep the values they started with", "once per episode",
                   "wsgate_message_guard_total", "wsgate_messages_total", "\"Message guards\"",
                   "closeTimeout", "ping"):
        assert needle in section, needle
    values_table = (CHART / "README.md").read_text().split("## Values", 1)[1]
    assert "| `messageGuards` |" in values_table


def _manifest_guard_block(file: str) -> list[dict[str, str]]:
    return commented_env_block(file, "# Message guards (docs/operations.md#message-guards)")


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_show_the_guards_as_the_chart_renders_them(render, file):
    """The plain manifests carry the seven variables commented out (all off but the fragment cap);
    uncommented, they are what the chart renders for the same values (plus the default action and
    the default fragment cap, spelled out)."""
    block = _manifest_guard_block(file)
    assert [e["name"] for e in block] == [name for name, _ in MESSAGE_GUARDS_ENV.values()]
    given = {e["name"]: e["value"] for e in block}
    values = {}
    for key, (name, _) in MESSAGE_GUARDS_ENV.items():
        raw = given[name]
        values[key] = raw if key == "messageRateAction" else (float(raw) if key == "messageRate" else int(raw))
    rendered = guard_env(render({"messageGuards": values}))
    assert {**rendered, "WSGATE_MESSAGE_RATE_ACTION": "throttle", "WSGATE_MAX_FRAGMENTS": "1024"} == given
    # Commented out: the manifests' wsgate has no guard variable.
    from conftest import load_yaml_docs

    dep = next(o for o in load_yaml_docs((KUBE_DIR / file).read_text()) if o["kind"] == "Deployment")
    assert not GUARD_NAMES & set(env_of(wsgate_container(dep)[0]))
