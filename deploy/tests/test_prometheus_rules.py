"""Alert rules checked and unit-tested by promtool (Prometheus' own rule engine)."""

from __future__ import annotations

import subprocess

import yaml

from conftest import PROMTOOL_BIN, RULES_FILE, RULES_TEST_FILE

# Each alert with its severity: critical pages (clients are being refused, or nothing watches
# wsgate any more), warning does not.
SEVERITIES = {
    "WsgateSaturationHigh": "warning", "WsgateRejectingConnections": "critical", "WsgateOriginRefusals": "warning",
    "WsgateUpstreamErrors": "warning",
    "WsgatePodNotReady": "warning", "WsgateKeyPinnedAtLimit": "warning", "WsgateFleetRedisDown": "warning",
    "WsgateAbnormalCloses": "warning", "WsgateConfigReloadFailed": "warning", "WsgateDescriptorsNearLimit": "warning",
    "WsgateTargetMissing": "critical",
}
EXPECTED_ALERTS = set(SEVERITIES)
RUNBOOK_BASE = "https://github.com/wsgate/wsgate/blob/main/docs/operations.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PROMTOOL_BIN, *args], capture_output=True, text=True, timeout=120,
                         cwd=RULES_FILE.parent)
    print(res.stdout, res.stderr)
    return res


def test_promtool_version():
    res = promtool("--version")
    assert res.returncode == 0
    assert "promtool, version" in res.stdout + res.stderr


def test_check_rules():
    res = promtool("check", "rules", RULES_FILE.name)
    assert res.returncode == 0
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in res.stdout


def test_rule_file_has_the_alerts_with_severity_and_text():
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for r in rules:
        assert r["labels"] == {"severity": SEVERITIES[r["alert"]]}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert r["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{r['alert'].lower()}"
        # A gauge compared with a bound needs a for: so one bad scrape does not page. The failed
        # reload is a counter's increase over a 15m window: a bad scrape cannot make one up.
        if r["alert"] == "WsgateConfigReloadFailed":
            assert r["for"] == "0m" and "[15m]" in r["expr"]
        else:
            assert r.get("for") and r["for"] != "0m", f"{r['alert']} needs a for: so one bad scrape does not page"
    sat = next(r for r in rules if r["alert"] == "WsgateSaturationHigh")
    assert sat["for"] == "5m" and "> 0" in sat["expr"], "unlimited pods (max = 0) must be excluded"
    pinned = next(r for r in rules if r["alert"] == "WsgateKeyPinnedAtLimit")
    # One alert per rule (and namespace), whichever pod holds the full key; never a key value in a
    # label (docs/operations.md#limits-per-key has none to give).
    assert pinned["for"] == "10m"
    assert pinned["expr"].split() == "max by (namespace, rule) (wsgate_key_busiest_ratio) >= 1".split()
    assert "/keys?rule={{ $labels.rule }}" in pinned["annotations"]["description"]
    # docs/operations.md#fleet-wide-limits: wsgate_fleet_up exists only where fleet_redis_url is set, so an absent series (no
    # fleet configured) never fires; per pod, since each pod has its own path to Redis.
    redis = next(r for r in rules if r["alert"] == "WsgateFleetRedisDown")
    assert redis["for"] == "1m" and redis["labels"]["severity"] == "warning"
    assert redis["expr"].split() == "min by (namespace, pod) (wsgate_fleet_up) == 0".split()
    for needle in ("fleet_fail_mode open", "with closed", "503 fleet_unavailable", "(pods - 1) x the per-pod cap",
                   "Existing connections are not dropped", "Check"):
        assert needle in redis["annotations"]["description"], needle
    # docs/operations.md#access-log: per pod, abnormal (no Close frame, or 1006) over every ended session, above 5 % for
    # 10m, and only where at least 20 sessions ended in the 5 minutes (the volume guard).
    abnormal = next(r for r in rules if r["alert"] == "WsgateAbnormalCloses")
    assert abnormal["for"] == "10m" and abnormal["labels"]["severity"] == "warning"
    assert abnormal["expr"].split() == """(
        sum by (namespace, pod) (rate(wsgate_close_codes_total{code=~"none|1006"}[5m]))
        /
        sum by (namespace, pod) (rate(wsgate_close_codes_total[5m]))
      ) > 0.05
      and
      sum by (namespace, pod) (increase(wsgate_close_codes_total[5m])) >= 20""".split()
    for needle in ("More than 5%", "at least 20 ended", "for 10m", "code none", "1006", "wsgate_sessions_ended_total",
                   "client_eof", "upstream_eof", "keepalive", "wsgate::access"):
        assert needle in abnormal["annotations"]["description"], needle
    # Never on a single refusal: a share of the pod's upgrades per reason, with a volume guard, for 5m.
    rejecting = next(r for r in rules if r["alert"] == "WsgateRejectingConnections")
    assert rejecting["for"] == "5m"
    ratio, guard = rejecting["expr"].split("\nand\n")
    assert ratio.strip().endswith(") > 0.05") and 'reason!="draining"' in ratio and "wsgate_connections_admitted_total" in ratio
    assert guard.split() == ('sum by (namespace, pod, reason) (increase(wsgate_connections_rejected_total'
                             '{reason!="draining"}[5m])) >= 10').split()
    # The descriptors of wsgate's own process (docs/metrics.md#process-metrics), not another
    # process's in the same pod.
    fds = next(r for r in rules if r["alert"] == "WsgateDescriptorsNearLimit")
    assert "process_open_fds / process_max_fds" in fds["expr"] and "and on (job, instance) wsgate_build_info" in fds["expr"]
    reload = next(r for r in rules if r["alert"] == "WsgateConfigReloadFailed")
    assert reload["expr"].split() == 'sum by (namespace, pod) (increase(wsgate_config_reloads_total{result="failure"}[15m])) > 0'.split()
    # The handshake policy (docs/configuration.md: allowed_origins): an absolute rate of origin
    # refusals per pod, not a share (one probing site is worth a look however busy the pod is), for
    # 10m; the text gives both readings (hijacking attempts, a front end missing from the list).
    origin = next(r for r in rules if r["alert"] == "WsgateOriginRefusals")
    assert origin["for"] == "10m"
    assert origin["expr"].split() == ('sum by (namespace, pod) (rate(wsgate_connections_rejected_total'
                                      '{reason="origin"}[5m])) > 0.1').split()
    for needle in ("more than 0.1 upgrades per second", "403 reason=origin", "allowed_origins", "require_origin",
                   "Cross-Site WebSocket Hijacking", "front end of your own is missing from the list",
                   "handshake.allowedOrigins", "Check which"):
        assert needle in origin["annotations"]["description"], needle
    missing = next(r for r in rules if r["alert"] == "WsgateTargetMissing")
    assert missing["expr"].split() == 'up{job=~".+/wsgate"} == 0 or absent(up{job=~".+/wsgate"})'.split()


def test_promtool_unit_tests_pass():
    res = promtool("test", "rules", RULES_TEST_FILE.name)
    assert res.returncode == 0
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    fired, silent = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else silent).add(a["alertname"])
    assert fired == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


def test_a_broken_rule_is_caught(tmp_path):
    # promtool really parses the expressions: a typo must fail (guards against a no-op check).
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum by (pod (wsgate_ready)\n")
    res = subprocess.run([PROMTOOL_BIN, "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
