"""Session telemetry and operator controls (docs/operations.md#access-log, issue 14) on the deployment side: `accessLog`
rendered as WSGATE_ACCESS_LOG; `readyHighWatermark` automatic (docs/operations.md#rollouts: 0.9 whenever maxClients is
set, off without a cap, an explicit number winning) and the low-watermark check made against the
value actually rendered; the admin token, which now also enables POST/DELETE/GET /drain, mounted as
before and shown commented out in the plain manifests; and the documentation's examples (chart
README "Admin token" and "Sizing rules", docs/operations.md "Access log" and "Operator
drain") rendered, validated against the Kubernetes schemas or run through jq, not
eyeballed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from conftest import (
    ACCESS_LOG_FIELDS,
    CHART,
    CLOSED_BY,
    END_CAUSES,
    KUBE_DIR,
    ROOT,
    assert_render_refuses,
    assert_schema_refuses,
    chart_readme_section,
    deep_merge,
    env_of,
    fenced,
    load_yaml_docs,
    parent_chart,
    readme_section,
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
    "abnormal-closes-thresholds": {"prometheusRule": {"enabled": True, "abnormalCloses": {
        "severity": "critical", "threshold": 0.1, "minSessions": 0, "for": "30m"}}},
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


# ---- the chart README ------------------------------------------------------------------------------

def _secret_refs(text: str) -> set[tuple[str, str]]:
    """(Secret name, key) pairs a shell snippet creates or reads."""
    made = re.findall(r"create secret generic (\S+) --from-literal=(\w+)=", text)
    read = re.findall(r"get secret (\S+) -o jsonpath='\{\.data\.(\w+)\}'", text)
    return set(made) | set(read)


def test_chart_readme_admin_token_example_renders_as_it_says(render):
    section = chart_readme_section("Admin token")
    values = yaml.safe_load(fenced(section, "yaml"))
    token = values["adminToken"]
    r = render(values)
    c = container_of(r)
    assert env_of(c)["WSGATE_ADMIN_TOKEN_FILE"] == "/etc/wsgate/admin/token"
    assert "/etc/wsgate/admin/" in section and "WSGATE_ADMIN_TOKEN_FILE=/etc/wsgate/admin/token" in section
    # Every command of the section creates or reads that Secret and key.
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    assert _secret_refs(shell) == {(token["secretName"], token["key"])}, _secret_refs(shell)
    # Rotation: replacing the Secret in place, no restart.
    assert "--dry-run=client -o yaml | kubectl -n prod apply -f -" in shell
    for needle in ("no restart", "subPath", "401", "404", "POST /drain", "DELETE /drain", "GET /drain"):
        assert needle in section, needle


def test_chart_readme_drain_examples_follow_the_contract():
    section = chart_readme_section("Admin token")
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    (body,) = re.findall(r"-d '(\{.*?\})'", shell)
    body = json.loads(body)
    assert set(body) == {"fraction", "period"} and 0 < body["fraction"] <= 1
    answers = [json.loads(a) for a in re.findall(r"^# (\{.*\})$", shell, re.M)]
    post, get, delete = answers
    assert set(post) == {"planned", "period_ms"} and post["period_ms"] == 60000
    assert set(get) == {"running", "planned", "drained", "period_ms"} and get["planned"] == post["planned"]
    assert set(delete) == {"stopped", "planned", "drained"} and delete["drained"] >= get["drained"]
    # "0.33 of 500 is 165": planned = round(fraction x live connections).
    fraction, live, planned = re.search(r"(0\.\d+)\s+of (\d+) is (\d+)", section).groups()
    assert round(float(fraction) * int(live)) == int(planned) == post["planned"]
    assert float(fraction) == body["fraction"]


def test_chart_readme_explains_the_automatic_watermark():
    section = chart_readme_section("Sizing rules")
    for needle in ("`readyHighWatermark` is automatic by default", "0.9 whenever `maxClients` is set",
                   "**409**", "3,000 clients", "**0** with 0.9", "1,396 / 1,125 / 479",
                   "(../../../docs/operations.md#operator-drain)"):
        assert needle in section, needle
    values_table = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    assert "| `readyHighWatermark` | `null` (automatic) |" in values_table
    assert "| `accessLog` | `true` |" in values_table
    assert "abnormalCloses.{threshold: 0.05, minSessions: 20, for: 10m}" in values_table


# ---- docs/operations.md (the access log, the operator drain) -------------------------------------------------------------------------------

README = ROOT / "docs" / "operations.md"
BENCH_README = ROOT / "docs" / "benchmarks.md"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md", "deploy/helm/wsgate/README.md", "benches/README.md",
                                 *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))])
def test_readme_links_resolve(doc):
    """Relative links and #anchors (the READMEs and docs/ link to each other's sections)."""
    path = ROOT / doc
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{doc}: {link}"
        if anchor and file.suffix == ".md":
            headings = {github_anchor(m) for m in re.findall(r"^#+\s+(.*)$", file.read_text(), re.M)}
            assert anchor in headings, f"{doc}: {link}"


def access_log_examples() -> tuple[dict[str, Any], dict[str, Any]]:
    """The section's example session record and refusal summary."""
    section = readme_section(README, "Access log")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", section, re.S)]
    (session,) = [b for b in blocks if b["message"] == "session"]
    (refusals,) = [b for b in blocks if b["message"] == "refusals"]
    return session, refusals


def test_access_log_section_documents_every_field_and_end():
    section = readme_section(README, "Access log")
    session, refusals = access_log_examples()
    # The example record, in the order wsgate writes it: the event's fields between the message and
    # the target.
    assert list(session) == ["timestamp", "level", "message", *ACCESS_LOG_FIELDS, "target"]
    assert (session["level"], session["target"]) == ("INFO", "wsgate::access")
    assert re.fullmatch(r"[0-9a-f]{16}", session["session"])
    assert session["closed_by"] in CLOSED_BY and session["end"] in END_CAUSES
    # The text example is the same record.
    (text,) = re.findall(r"```text\n(.*?)\n```", section, re.S)
    head, _, pairs = text.partition(" session ")
    assert head.split() == [session["timestamp"], "INFO", "wsgate::access:"], head
    parsed = {k: json.loads(v) if v.startswith('"') else v for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', pairs)}
    assert list(parsed) == ACCESS_LOG_FIELDS
    assert parsed == {k: v if isinstance(v, str) and k in ("path", "subprotocol", "keys", "close_reason", "closed_by",
                                                           "end") else str(v) for k, v in
                      ((k, session[k]) for k in ACCESS_LOG_FIELDS)}, parsed
    # Every field has its row, every end its row.
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for field in ACCESS_LOG_FIELDS:
        assert any(re.match(rf"^\| (`\w+` / )?`{field}`( / `\w+`)? \|", row) for row in rows), field
    ends = {e for row in rows for e in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert set(END_CAUSES) <= ends, set(END_CAUSES) - ends
    for value in CLOSED_BY:
        assert f"`{value}`" in section, value
    # The refusal summary: its fields, counts adding up to the total.
    assert refusals["window_s"] == 10
    counts = {k: v for k, v in refusals.items()
              if k not in ("timestamp", "level", "target", "message", "window_s", "total")}
    assert counts and all(v > 0 for v in counts.values()) and sum(counts.values()) == refusals["total"]
    for reason in ("capacity", "loop", "draining", "rate", "per_ip", "key", "key_missing", "key_table_full", "jwt", "fleet",
                   "fleet_unavailable", "bad_handshake", "upstream_connect", "upstream_timeout", "upstream_refused"):
        assert f"`{reason}`" in section, reason
    for needle in ("access_log = false", "WSGATE_ACCESS_LOG=false", "accessLog: false",
                   "RUST_LOG=info,wsgate::access=off", "at most one line per 10 s", "DEBUG", "123 bytes", "\\xNN",
                   "1005", "1006", "wsgate_sessions_ended_total", "wsgate_close_codes_total"):
        assert needle in section, needle


def jq_commands(section: str) -> list[list[str]]:
    """The jq invocations of a section's shell blocks (what follows `| jq` / `|\\n  jq`)."""
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    shell = re.sub(r"\|\s*\n\s*jq", "| jq", shell)
    return [shlex.split(m) for m in re.findall(r"\|\s*(jq .*)$", shell, re.M)]


def run_jq(args: list[str], lines: list[str]) -> list[Any]:
    jq = shutil.which("jq")
    assert jq, "no jq: run deploy/tests/run.sh, which installs it"
    res = subprocess.run([jq, *args[1:]], input="".join(line + "\n" for line in lines), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_access_log_jq_examples_find_what_they_say():
    """The section's jq filters, run by jq over a log: the example record, the example summary, a
    session that ended with 1006 (no Close frame), and one of wsgate's other JSON log lines."""
    session, refusals = access_log_examples()
    vanished = {**session, "session": "0123456789abcdef", "client": "198.51.100.4", "path": "/feed",
                "keys": "tenant=globex", "duration_ms": 98765, "close_code": 1006, "close_reason": "",
                "closed_by": "none", "end": "client_eof"}
    other = {"timestamp": session["timestamp"], "level": "INFO", "message": "proxy listening", "addr": "0.0.0.0:8080",
             "target": "wsgate"}
    log = [json.dumps(x) for x in (other, session, vanished, refusals, session)]
    cmds = jq_commands(readme_section(README, "Access log"))
    assert len(cmds) == 3, cmds
    who_1006, by_end, summaries = (run_jq(c, log) for c in cmds)
    # The filter the issue asks for, with "end" quoted: `{..., end}` is a syntax error in jq 1.6
    # (end is a keyword there), which this check runs with where Debian 12 is the base.
    assert cmds[0][-1] == ('select(.target=="wsgate::access" and .message=="session" and .close_code==1006) '
                           '| {client, path, keys, duration_ms, "end"}')
    assert who_1006 == [{"client": "198.51.100.4", "path": "/feed", "keys": "tenant=globex", "duration_ms": 98765,
                         "end": "client_eof"}]
    assert by_end == [[{"end": "client_close", "sessions": 2}, {"end": "client_eof", "sessions": 1}]]
    assert summaries == [refusals]


def test_rebalancing_section_formula_and_measured_figures():
    section = readme_section(README, "Operator drain")
    # The measured figures are benches/rebalance.py's, as docs/benchmarks.md records them.
    assert section.count("Measured (") == 1
    bench = readme_section(BENCH_README, "Rebalancing after a scale-out")
    for figures in ("333 / 334 / 333", "445 / 444 / 111", "112 / 111 / 111", "334 / 333 / 333", "8.8 s"):
        assert figures in section and figures in bench, figures
    # The worked example is the formula's: N old pods with C each, M new, each old pod drains
    # C - N*C/(N+M), the fraction M/(N+M).
    n, c, m = 2, 1500, 1
    even = n * c // (n + m)
    assert f"{n} old pods with {c:,} each and {m} new pod" in section
    assert f"{n * c:,} ÷ {n + m} = {even:,}" in section and f"{c:,} − {even:,} = {c - even:,}" in section
    assert "**M ÷ (N + M)**" in section and '`{"fraction": 0.33}`' in section and round(m / (n + m), 2) == 0.33
    assert f'`{{"count": {c - even}}}`' in section and f"({round(0.33 * c)})" in section
    for needle in ("max_connection_lifetime", "POST /drain", "DELETE /drain", "GET /drain", "409", "least-connections",
                   "C × (1 − f)", '{"fraction": 1}', "node maintenance", "admin_drain", "wsgate_admin_drained_total"):
        assert needle in section, needle


def test_rebalancing_recipes_use_the_chart_secret_and_the_contract():
    section = readme_section(README, "Operator drain")
    admin = yaml.safe_load(fenced(chart_readme_section("Admin token"), "yaml"))["adminToken"]
    shell = fenced(section, "sh")
    # kubectl-exec-free: a port-forward to one pod and curl with the token read from the Secret.
    assert re.search(r"kubectl -n prod port-forward pod/\S+ 9090:9090 &", shell)
    assert _secret_refs(shell) == {(admin["secretName"], admin["key"])}
    assert "base64 -d" in shell and "localhost:9090/drain" in shell
    (body,) = re.findall(r"-d '(\{.*?\})'", shell)
    body = json.loads(body)
    assert body == {"fraction": 0.33, "period": "60s"}
    (answer,) = [json.loads(a) for a in re.findall(r"^# (\{.*\})$", shell, re.M)]
    assert answer == {"planned": round(0.33 * 1500), "period_ms": 60000}


def test_rebalancing_job_is_valid_kubernetes_and_drains_every_listed_pod(tmp_path):
    section = readme_section(README, "Operator drain")
    job = yaml.safe_load(fenced(section, "yaml"))
    validate_all([job], tmp_path)
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("curlimages/curl:")
    admin = yaml.safe_load(fenced(chart_readme_section("Admin token"), "yaml"))["adminToken"]
    envs = {e["name"]: e for e in c["env"]}
    assert envs["TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": admin["secretName"], "key": admin["key"]}
    body = json.loads(envs["BODY"]["value"])
    assert len({"fraction", "count"} & set(body)) == 1 and set(body) <= {"fraction", "count", "period"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+\.\d+", ip) for ip in envs["PODS"]["value"].split())
    script = c["args"][0]
    assert c["command"] == ["/bin/sh", "-c"] and script.startswith("set -e\n")
    assert 'curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" -d "$BODY" "http://$ip:9090/drain"' in script
    # The shell itself parses the loop (a typo there would only show in the cluster).
    res = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr


def test_rebalancing_job_runs_against_a_stand_in_for_the_pods():
    """The Job's script, run by sh with curl on this machine against a local HTTP server standing
    in for two pods' admin ports (the script's port 9090 replaced by the server's): each pod gets
    one POST /drain with the Bearer token and the body, in the order listed."""
    import http.server
    import threading

    section = readme_section(README, "Operator drain")
    (c,) = yaml.safe_load(fenced(section, "yaml"))["spec"]["template"]["spec"]["containers"]
    envs = {e["name"]: e.get("value") for e in c["env"]}
    assert shutil.which("curl"), "no curl on this machine"
    seen: list[tuple[str, str, str, str]] = []

    class Pod(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen.append((self.headers["Host"].split(":")[0], self.path, self.headers["Authorization"], body))
            answer = b'{"period_ms":60000,"planned":5}'
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    # Two "pods" on one port, on two loopback addresses.
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pod)]
    port = servers[0].server_address[1]
    servers.append(http.server.ThreadingHTTPServer(("127.0.0.2", port), Pod))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = c["args"][0].replace(":9090/", f":{port}/")
        assert script != c["args"][0]
        res = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                             env={"PATH": "/usr/bin:/bin", "TOKEN": "t0ken", "PODS": "127.0.0.1 127.0.0.2",
                                  "BODY": envs["BODY"]})
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert res.returncode == 0, res.stderr
    assert [(host, path, auth, json.loads(body)) for host, path, auth, body in seen] == [
        (ip, "/drain", "Bearer t0ken", json.loads(envs["BODY"])) for ip in ("127.0.0.1", "127.0.0.2")]
    assert res.stdout.splitlines() == [f'{ip}: {{"period_ms":60000,"planned":5}}' for ip in ("127.0.0.1", "127.0.0.2")]
