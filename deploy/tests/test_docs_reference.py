"""The reference pages of docs/ against the real binary and the chart, so that they cannot drift.

- docs/configuration.md: every key `wsgate check-config` prints is in the keys table, with the default
  the binary prints (and no key is documented that the binary does not know); every field of a
  `[[key_limits]]` rule likewise; the exit codes of the command line.
- docs/metrics.md: a wsgate with every feature on (key rules with a `jwt_claim` rule and a JWKS file,
  fleet limits against a private redis-server, message guards, admin token, access log, watermarks,
  rate, per-IP) is scraped; every metric family it exports has its section, with its type, every
  label and every label value seen (and no section names a family it does not export).
- the Helm chart: every key is reachable from the chart's values (a WSGATE_* variable of the
  rendered container, or a key of the rendered config.toml), or on EXCLUDED_FROM_CHART with the reason.

The binary is WSGATE_BIN (run.sh sets it: debug/wsgate of the cargo target directory). Processes run
on 127.0.0.1 with ephemeral ports, and only the processes started here are stopped, by PID.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    FLEET_VALUES,
    HANDSHAKE_VALUES,
    KEY_LIMITS_VALUES,
    MESSAGE_GUARDS_VALUES,
    ROOT,
    WSGATE_BIN,
    deep_merge,
    env_of,
    wsgate_container,
)
from test_e2e_prometheus import start_redis, stop, wait_until

DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
METRICS = DOCS / "metrics.md"
JWKS = ROOT / "tests" / "fixtures" / "jwt" / "jwks.json"

# Keys of check-config that the chart does not set, each with the reason. The test fails if a key
# here is in fact rendered, so the list cannot go stale.
EXCLUDED_FROM_CHART = {
    # Left unset on purpose: wsgate then names a pod's holds after the pod ($HOSTNAME, the pod name)
    # plus a random suffix, which is unique per pod without a value per pod. `extraEnv` can set it.
    "fleet_instance_id": "unset on purpose: $HOSTNAME-<random> is unique per pod",
}

# Labels whose values are not a closed list, so the page cannot enumerate them: `rule` is the name
# of a configured [[key_limits]] rule (the operator's choice), `version` the binary's version.
OPEN_LABELS = {"rule", "version"}

TOKEN = "docs-reference-token"
HOSTNAME = "docs-test"


def run_check_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`wsgate check-config` with only `env` (and PATH) in its environment."""
    assert WSGATE_BIN.exists(), f"wsgate binary not built at {WSGATE_BIN} (run deploy/tests/run.sh)"
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": HOSTNAME, **env}
    return subprocess.run([str(WSGATE_BIN), "check-config", *args], env=clean, capture_output=True, text=True,
                          timeout=60)


def check_config(env: dict[str, str], *args: str) -> dict[str, Any]:
    res = run_check_config(env, *args)
    assert res.returncode == 0, res.stderr
    return tomllib.loads(res.stdout)


def section(text: str, heading: str) -> str:
    """The body of the first heading `heading` (any level) up to the next heading of the same or a
    higher level; `#` lines inside fenced code blocks (shell comments) are not headings."""
    lines = text.split("\n")
    fenced = False
    start = level = None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^(#+) (.*)$", line)
        if not m:
            continue
        if start is None:
            if m.group(2) == heading:
                start, level = i + 1, len(m.group(1))
        elif len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
    assert start is not None, f"no heading {heading!r}"
    return "\n".join(lines[start:])


def table(body: str) -> list[list[str]]:
    """The rows of the first Markdown table in `body` (header and separator dropped), cells stripped."""
    rows = []
    for line in body.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, body[:300]
    return rows[2:]


def unquote(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else cell


def same_default(cell: str, printed: Any) -> bool:
    """Whether a default cell says the value check-config printed."""
    if isinstance(printed, bool):
        return cell == f"`{str(printed).lower()}`"
    if isinstance(printed, (int, float)):
        try:
            return float(unquote(cell)) == float(printed) and cell.startswith("`")
        except ValueError:
            return False
    if isinstance(printed, str):
        return cell == "(empty)" if printed == "" else cell == f"`{printed}`"
    if isinstance(printed, list):
        return printed == [] and cell == "`[]`"
    if isinstance(printed, dict):
        return printed == {} and cell == "`{}`"
    return False


def documented_keys() -> dict[str, dict[str, str]]:
    rows = table(section(CONFIGURATION.read_text(), "Keys"))
    out = {}
    for key, default, accepted, reload, env in rows:
        name = unquote(key)
        assert name not in out, f"{name} documented twice"
        out[name] = {"default": default, "accepted": accepted, "reload": reload, "env": env}
    return out


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    """check-config's output with the one required key set, and with the optional keys that are
    printed only when set (admin token, JWT) set as well."""
    tmp = tmp_path_factory.mktemp("check-config")
    (tmp / "token").write_text(TOKEN)
    minimal = check_config({"WSGATE_UPSTREAM": "127.0.0.1:9"})
    full = check_config({"WSGATE_UPSTREAM": "127.0.0.1:9", "WSGATE_ADMIN_TOKEN_FILE": str(tmp / "token"),
                         "WSGATE_JWT_JWKS_FILE": str(JWKS), "WSGATE_JWT_ISSUER": "https://issuer.example",
                         "WSGATE_JWT_AUDIENCE": "chat"})
    return minimal, full


def test_every_key_check_config_prints_is_documented_with_its_default(printed):
    minimal, full = printed
    docs = documented_keys()
    assert set(minimal) <= set(full)
    missing = sorted(set(full) - set(docs))
    assert not missing, f"keys wsgate check-config prints but docs/configuration.md lacks: {missing}"
    stale = sorted(set(docs) - set(full))
    assert not stale, f"keys docs/configuration.md lists but wsgate check-config does not print: {stale}"
    wrong = []
    for key, doc in docs.items():
        if key == "upstream":  # required: the test gives it, so what is printed is the test's value
            ok = doc["default"] == "required" and minimal[key] == "127.0.0.1:9"
        elif key == "fleet_instance_id":  # drawn per process: $HOSTNAME-<8 random hex digits>
            ok = (doc["default"] == "`$HOSTNAME-xxxxxxxx`"
                  and re.fullmatch(rf"{HOSTNAME}-[0-9a-f]{{8}}", minimal[key]) is not None)
        elif key in minimal:
            ok = same_default(doc["default"], minimal[key])
        else:  # printed only when set
            ok = doc["default"] == "unset"
        if not ok:
            wrong.append(f"{key}: docs say {doc['default']}, check-config prints {minimal.get(key, '(nothing)')!r}")
    assert not wrong, "defaults in docs/configuration.md differ from the binary's:\n" + "\n".join(wrong)


def test_every_key_names_its_variable_and_how_it_reloads(printed):
    docs = documented_keys()
    for key, doc in docs.items():
        assert doc["reload"] in ("yes", "new connections", "restart"), f"{key}: reload {doc['reload']!r}"
        if key == "key_limits":
            assert doc["env"] == "none (file only)", doc
        else:
            assert f"`WSGATE_{key.upper()}`" in doc["env"], f"{key}: env {doc['env']!r}"
    assert "`WS_MAX_CLIENTS`" in docs["max_clients"]["env"]
    # The keys whose change a reload refuses to apply (the binary logs "needs a restart" for them).
    for key in ("listen", "admin_listen", "upstream", "workers", "fleet_redis_url"):
        assert docs[key]["reload"] == "restart", key


def test_every_key_limits_field_is_documented_with_its_default(tmp_path):
    """A rule with only its required fields, printed back by check-config with every field."""
    config = tmp_path / "rules.toml"
    config.write_text('[[key_limits]]\nname = "tenant"\nkey = "header:X-Tenant"\nmax_per_key = 5\n')
    (rule,) = check_config({"WSGATE_UPSTREAM": "127.0.0.1:9"}, "--config", str(config))["key_limits"]
    rows = {unquote(r[0]): r[1] for r in table(section(CONFIGURATION.read_text(), "`[[key_limits]]` rules"))}
    required = {"name", "key", "max_per_key"}
    assert set(rows) == set(rule) | {"overrides"}, (sorted(rows), sorted(rule))
    for field in required:
        assert rows[field] == "required", field
    for field, value in rule.items():
        if field not in required:
            assert same_default(rows[field], value), f"key_limits.{field}: docs {rows[field]}, printed {value!r}"
    if "overrides" not in rule:  # an empty table is not printed
        assert rows["overrides"] == "`{}`"


def test_the_exit_codes_of_the_command_line_are_documented():
    body = section(CONFIGURATION.read_text(), "Command line")
    codes = {unquote(r[0]) for r in table(body.split("Exit codes", 1)[1])}
    assert codes == {"0", "1", "2"}, codes
    assert run_check_config({"WSGATE_UPSTREAM": "127.0.0.1:9"}).returncode == 0
    bad = run_check_config({"WSGATE_UPSTREAM": "127.0.0.1:9", "WSGATE_MAX_CLIENTS": "abc"})
    assert bad.returncode == 2 and "max_clients" in bad.stderr, bad.stderr
    for command in ("`wsgate`", "`wsgate --config FILE`", "`wsgate check-config`", "`wsgate demo`"):
        assert command in body, command


# ---- metrics --------------------------------------------------------------------------------------


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Families of a Prometheus text exposition: type, and each label's values seen (`le` left out)."""
    families: dict[str, dict[str, Any]] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        families[name] = {"type": kind, "labels": {}}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$", line)
        assert m, line
        sample, labels = m.groups()
        family = next((f for f in (sample, re.sub(r"_(bucket|sum|count)$", "", sample)) if f in families), None)
        assert family, f"sample {sample} of no declared family"
        for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""):
            if label != "le":
                families[family]["labels"].setdefault(label, set()).add(value)
    return families


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """/metrics of a wsgate with every feature on."""
    tmp = tmp_path_factory.mktemp("all-features")
    redis, redis_port = start_redis(tmp)
    proc = None
    try:
        (tmp / "token").write_text(TOKEN)
        (tmp / "wsgate.toml").write_text(f"""
upstream = "127.0.0.1:9"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_clients = 100
max_clients_per_ip = 10
admission_rate = 50
ready_high_watermark = 0.9
ready_low_watermark = 0.7
enforce = true
access_log = true
max_connection_lifetime = "1h"
idle_timeout = "10m"
close_code_lifetime = 1012
close_code_idle = 4000
admin_token_file = "{tmp / 'token'}"
jwt_jwks_file = "{JWKS}"
jwt_from = "query:access_token"
fleet_redis_url = "redis://127.0.0.1:{redis_port}/0"
fleet_namespace = "docs-reference"
fleet_max_clients = 1000
max_message_size = 65536
message_rate = 20
message_rate_action = "close"
byte_rate = 1048576

[[key_limits]]
name = "tenant"
key = "header:X-Tenant-Id"
max_per_key = 50
fleet = true

[[key_limits]]
name = "user"
key = "jwt_claim:sub"
max_per_key = 5
""")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": "docs-test", "RUST_LOG": "info"}
        stderr = open(tmp / "wsgate.stderr", "wb")  # noqa: SIM115 - the child keeps its own descriptor
        with stderr:
            proc = subprocess.Popen([str(WSGATE_BIN), "--config", str(tmp / "wsgate.toml")], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

        def admin_address() -> str | None:
            assert proc.poll() is None, (tmp / "wsgate.stderr").read_text(errors="replace")[-3000:]
            m = re.search(r"admin listening addr=(\S+)", (tmp / "wsgate.stderr").read_text(errors="replace"))
            return m and m.group(1)

        admin = wait_until(admin_address, 30, "wsgate to log its admin address")

        def scrape() -> str | None:
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
                text = r.read().decode()
            # The fleet worker has reached Redis once the gauge says so.
            return text if re.search(r"^wsgate_fleet_up 1$", text, re.M) else None

        yield parse_exposition(wait_until(scrape, 30, "wsgate_fleet_up 1 (wsgate connected to redis-server)"))
    finally:
        stop(proc)
        stop(redis)


def metric_sections() -> dict[str, str]:
    text = METRICS.read_text()
    names = re.findall(r"^### (\S+)$", text, re.M)
    return {n: section(text, n) for n in names}


def test_the_instance_exports_every_feature(exported):
    """A guard against a scrape that shows less than it should (which would let the docs check pass
    vacuously): the families of every feature are there."""
    for family in ("wsgate_connections_rejected_total", "wsgate_key_busiest_ratio", "wsgate_fleet_up",
                   "wsgate_fleet_request_duration_seconds", "wsgate_message_guard_total",
                   "wsgate_sessions_ended_total", "wsgate_close_codes_total", "process_open_fds"):
        assert family in exported, family
    assert exported["wsgate_keys_tracked"]["labels"]["rule"] == {"tenant", "user"}
    assert {"1012", "4xxx"} <= exported["wsgate_close_codes_total"]["labels"]["code"]


def test_every_exported_family_label_and_value_is_documented(exported):
    text = METRICS.read_text()
    sections = metric_sections()
    problems = []
    for name, family in sorted(exported.items()):
        if name.startswith("process_"):
            if f"`{name}`" not in section(text, "Process metrics"):
                problems.append(f"{name}: not in the process metrics note")
            continue
        body = sections.get(name)
        if body is None:
            problems.append(f"{name}: no ### section")
            continue
        if f"type: {family['type']}" not in body:
            problems.append(f"{name}: type {family['type']} not stated")
        if not family["labels"] and "no labels" not in body:
            problems.append(f"{name}: exported without labels, the section does not say 'no labels'")
        for label, values in sorted(family["labels"].items()):
            if f"`{label}`" not in body:
                problems.append(f"{name}: label {label} not documented")
            if label in OPEN_LABELS:
                continue
            for value in sorted(values):
                if f"`{value}`" not in body:
                    problems.append(f"{name}: {label}={value} not documented")
    assert not problems, "docs/metrics.md is behind /metrics:\n" + "\n".join(problems)


def test_every_documented_family_is_exported(exported):
    stale = sorted(set(metric_sections()) - set(exported))
    assert not stale, f"docs/metrics.md documents families the binary does not export: {stale}"
    noted = set(re.findall(r"`(process_\w+)`", section(METRICS.read_text(), "Process metrics")))
    assert noted, "the process metrics note names no family"
    assert not noted - set(exported), f"the process metrics note names families not exported: {noted - set(exported)}"


# ---- the chart ------------------------------------------------------------------------------------


def chart_values_with_everything() -> dict[str, Any]:
    values = deep_merge(deep_merge(KEY_LIMITS_VALUES, FLEET_VALUES), MESSAGE_GUARDS_VALUES)
    values["keyLimits"] = KEY_LIMITS_VALUES["keyLimits"] + [
        r for r in FLEET_VALUES["keyLimits"] if r["name"] not in {k["name"] for k in KEY_LIMITS_VALUES["keyLimits"]}]
    values = deep_merge(values, HANDSHAKE_VALUES)
    # jwt_subprotocol_prefix reaches config.toml only when it differs from the default, and only with
    # jwt_from = "subprotocol" (where it does something).
    values["jwt"] = {**values["jwt"], "from": "subprotocol", "subprotocolPrefix": "chat.token."}
    return deep_merge(values, {"readyLowWatermark": 0.7, "workers": 2, "maxClients": 500})


def test_every_key_is_reachable_from_the_chart(render, printed):
    _, full = printed
    rendered = render(chart_values_with_everything())
    container, _ = wsgate_container(rendered.one("Deployment"))
    env = set(env_of(container))
    config = tomllib.loads(rendered.config_toml() or "")
    reached = {key for key in full if f"WSGATE_{key.upper()}" in env or key in config}
    unreached = sorted(set(full) - reached - set(EXCLUDED_FROM_CHART))
    assert not unreached, f"keys no chart value reaches (set them, or add them to EXCLUDED_FROM_CHART): {unreached}"
    needless = sorted(set(EXCLUDED_FROM_CHART) & reached)
    assert not needless, f"EXCLUDED_FROM_CHART lists keys the chart does render: {needless}"
    assert set(EXCLUDED_FROM_CHART) <= set(full), "EXCLUDED_FROM_CHART names keys wsgate does not have"
    assert config.get("key_limits"), "the rendered config.toml has no [[key_limits]] rules"


# ---- anchors other files point at -----------------------------------------------------------------

# Headings that code comments, the chart and the alerts link to by anchor: renaming one breaks them.
ANCHORED_HEADINGS = {
    "configuration.md": ["Command line"],
    "behaviour.md": ["The client port", "The admin port", "Admission check order", "Status codes", "Close frames",
                     "Shutdown", "Invariants"],
    "operations.md": ["Rollouts", "Limits per key", "Fleet-wide limits", "Automatic rebalancing", "Message guards",
                      "Access log", "Operator drain", "Unix-socket upstream", "Sizing", "Troubleshooting"],
}


def test_the_anchored_headings_exist():
    for page, headings in ANCHORED_HEADINGS.items():
        text = (DOCS / page).read_text()
        for heading in headings:
            assert f"\n## {heading}\n" in text, f"docs/{page} lacks ## {heading}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_in_troubleshooting(render):
    """docs/operations.md#<alert name in lower case> for every alert of the rule file, and every
    alert's runbook_url (the rule file's, the plain PrometheusRule's and the chart's, all alerts
    enabled) points at such a section of docs/operations.md."""
    import yaml

    rules_file = ROOT / "deploy" / "prometheus" / "wsgate-alerts.yaml"
    rules = [r for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    assert alerts
    troubleshooting = section((DOCS / "operations.md").read_text(), "Troubleshooting")
    runbooks = set(re.findall(r"^### (\w+)$", troubleshooting, re.M))
    assert alerts <= runbooks, f"alerts without a runbook in docs/operations.md: {sorted(alerts - runbooks)}"
    anchors = {github_anchor(h) for h in re.findall(r"^#{3} (.+)$", troubleshooting, re.M)}
    plain = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml").read_text())
    chart = render({"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}).one("PrometheusRule")
    for source, rs in (("rule file", rules), ("plain PrometheusRule", plain["spec"]["groups"][0]["rules"]),
                       ("chart", chart["spec"]["groups"][0]["rules"])):
        assert {r["alert"] for r in rs} == alerts, source
        for r in rs:
            url = r["annotations"]["runbook_url"]
            page, _, anchor = url.partition("#")
            assert page.endswith("/docs/operations.md"), (source, url)
            assert anchor == r["alert"].lower() and anchor in anchors, (source, url)
    assert github_anchor("WsgateTargetMissing") == "wsgatetargetmissing"
    assert github_anchor("Descriptors, memory and vanished peers") == "descriptors-memory-and-vanished-peers"
