"""grafana/wsgate.json: structure (ids, datasources, expressions, units) and content."""

from __future__ import annotations

import re

import yaml

from conftest import CLOSED_BY, END_CAUSES, RULES_FILE, SPEC_METRICS, all_panels, dashboard

METRIC_RE = re.compile(r"\b((?:wsgate|process)_[a-z_]+)\b")


def panels():
    return [p for p in all_panels(dashboard()) if p["type"] != "row"]


# Panel plugins that ship with Grafana (10.x/11.x); anything else would need a plugin installed.
CORE_PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "state-timeline",
                    "heatmap", "text", "piechart", "status-history"}


def test_dashboard_is_provisionable():
    d = dashboard()
    assert d["uid"] == "wsgate-admission" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None, "a provisioned dashboard must not pin a database id"
    for p in all_panels(d):
        assert p["type"] in CORE_PANEL_TYPES, p["type"]
        assert p["title"]
        if p["type"] != "row":
            assert p.get("description"), f"{p['title']}: say what the panel shows"


def test_panel_ids_are_unique():
    ids = [p["id"] for p in all_panels(dashboard())]
    assert len(ids) == len(set(ids)), ids
    assert all(isinstance(i, int) for i in ids)


def test_every_panel_has_a_templated_datasource():
    for p in all_panels(dashboard()):
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == p["datasource"], p["title"]


def test_every_target_has_an_expression_and_unique_refid():
    for p in panels():
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), p["title"]


def test_units_are_set():
    for p in panels():
        unit = p["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{p['title']} has no unit"
    by_title = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels()}
    assert by_title["Saturation per pod (active / max)"] == "percentunit"
    assert by_title["Bytes per second by direction"] == "Bps"
    assert by_title["Connection duration quantiles"] == "s"
    assert by_title["Resident memory per pod"] == "bytes"


def test_panels_fit_the_grid_without_overlap():
    cells = set()
    for p in all_panels(dashboard()):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_templated_on_datasource_namespace_and_pod():
    tv = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert tv["datasource"]["type"] == "datasource" and tv["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        assert tv[name]["type"] == "query" and tv[name]["multi"] and tv[name]["includeAll"]
        assert tv[name]["allValue"] == ".*"
    for p in panels():
        for t in p["targets"]:
            assert 'namespace=~"$namespace"' in t["expr"] and 'pod=~"$pod"' in t["expr"], (p["title"], t["expr"])


def test_only_spec_metric_names_are_used():
    for p in panels():
        for t in p["targets"]:
            for name in METRIC_RE.findall(t["expr"]):
                assert name in SPEC_METRICS, f"{p['title']}: unknown metric {name}"


def test_saturation_panel_thresholds_and_unlimited_pods():
    p = next(p for p in panels() if p["title"] == "Saturation per pod (active / max)")
    steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 0.8, 0.95]
    expr = p["targets"][0]["expr"]
    assert "wsgate_connections_active" in expr and "wsgate_connections_max" in expr
    assert "> 0" in expr, "max = 0 (unlimited) must not divide into +Inf"
    titles = [p["title"] for p in panels()]
    assert any("Unlimited" in t for t in titles)
    cap = next(p for p in panels() if p["title"] == "Cap per pod")
    assert cap["fieldConfig"]["defaults"]["mappings"][0]["options"]["0"]["text"] == "unlimited"


def test_required_views_are_present():
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for needle in ("wsgate_connections_admitted_total", "sum by (reason) (rate(wsgate_connections_rejected_total",
                   "sum by (kind) (rate(wsgate_upstream_errors_total", "histogram_quantile(0.99",
                   "sum by (direction) (rate(wsgate_transferred_bytes_total", "process_resident_memory_bytes",
                   "process_open_fds", "wsgate_ready", "wsgate_connections_drained_total",
                   'reason=~"rate|per_ip"'):
        assert needle in exprs, needle


def test_limits_per_key_row():
    """docs/operations.md#limits-per-key: refusals by rule, keys tracked and the busiest key's ratio, with thresholds at 0.8 / 1."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Limits per key") == rows.index("Admission") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    refusals = by_title["Key-limit refusals by rule"]
    assert refusals["targets"][0]["expr"].startswith("sum by (rule) (rate(wsgate_key_rejected_total{")
    assert refusals["targets"][0]["legendFormat"] == "{{rule}}"
    assert refusals["fieldConfig"]["defaults"]["unit"] == "cps"
    assert 'reason=~"key|key_missing|key_table_full|jwt"' in refusals["targets"][1]["expr"]
    tracked = by_title["Keys tracked"]
    assert tracked["targets"][0]["expr"].startswith("max by (rule) (wsgate_keys_tracked{")
    busiest = by_title["Busiest key ratio"]
    (t,) = busiest["targets"]
    assert t["expr"].startswith("max by (rule) (wsgate_key_busiest_ratio{")
    defaults = busiest["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 0.8, 1]
    assert [s["color"] for s in defaults["thresholds"]["steps"]] == ["green", "orange", "red"]
    # A limit lowered under the active count leaves the ratio above 1: the axis must not clip it.
    assert "max" not in defaults


def test_fleet_limits_row():
    """docs/operations.md#fleet-wide-limits: fleet count vs fleet limit (max over pods, never a sum: every pod reports the same
    fleet-wide number), Redis up per pod, round-trip latency p50/p99 by op, requests by op and
    result, and the fleet / fleet_unavailable refusals."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Fleet limits (Redis)") == rows.index("Limits per key") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    sel = '{namespace=~"$namespace", pod=~"$pod"}'

    active = by_title["Fleet active vs fleet limit"]
    a, b = active["targets"]
    assert a["expr"] == f"max by (namespace) (wsgate_fleet_active{sel})"
    assert b["expr"] == 'max by (namespace) (wsgate_fleet_max{namespace=~"$namespace", pod=~"$pod"} > 0)', \
        "fleet_max_clients = 0 (off) must not draw a limit line at 0"
    assert active["fieldConfig"]["defaults"]["unit"] == "short"
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    assert "sum(wsgate_fleet_active" not in exprs and "sum by (namespace) (wsgate_fleet_active" not in exprs

    up = by_title["Redis up per pod"]
    assert up["type"] == "state-timeline"
    (t,) = up["targets"]
    assert t["expr"] == f"max by (namespace, pod) (wsgate_fleet_up{sel})" and t["legendFormat"] == "{{pod}}"
    texts = {k: v["text"] for k, v in up["fieldConfig"]["defaults"]["mappings"][0]["options"].items()}
    assert texts == {"1": "up", "0": "down"}

    latency = by_title["Redis round-trip latency p50 / p99 by op"]
    assert latency["fieldConfig"]["defaults"]["unit"] == "s"
    p50, p99 = (t["expr"] for t in latency["targets"])
    bucket = f"rate(wsgate_fleet_request_duration_seconds_bucket{sel}[$__rate_interval])"
    assert p50 == f"histogram_quantile(0.5, sum by (op, le) ({bucket}))"
    assert p99 == f"histogram_quantile(0.99, sum by (op, le) ({bucket}))"
    assert [t["legendFormat"] for t in latency["targets"]] == ["{{op}} p50", "{{op}} p99"]

    requests = by_title["Fleet requests per second by op and result"]
    (t,) = requests["targets"]
    assert t["expr"] == f"sum by (op, result) (rate(wsgate_fleet_requests_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{op}} {{result}}"
    assert requests["fieldConfig"]["defaults"]["unit"] == "reqps"

    refusals = by_title["Fleet refusals per second"]
    (t,) = refusals["targets"]
    assert t["expr"].startswith("sum by (reason) (rate(wsgate_connections_rejected_total{")
    assert 'reason=~"fleet|fleet_unavailable"' in t["expr"]
    assert refusals["fieldConfig"]["defaults"]["unit"] == "cps"

    # Every wsgate_fleet_* name the dashboard uses is a docs/operations.md#fleet-wide-limits metric (conftest.SPEC_METRICS).
    used = {n for n in METRIC_RE.findall(exprs) if n.startswith("wsgate_fleet_")}
    # (wsgate_fleet_mean and wsgate_fleet_instances: the "Fleet balance" row, test_fleet_balance_row.)
    assert used == {"wsgate_fleet_active", "wsgate_fleet_max", "wsgate_fleet_up",
                    "wsgate_fleet_request_duration_seconds_bucket", "wsgate_fleet_requests_total",
                    "wsgate_fleet_mean", "wsgate_fleet_instances"}
    assert used <= SPEC_METRICS


def test_message_guards_row():
    """docs/operations.md#message-guards: guard actions per second by guard and action, and messages per second by direction,
    in a row after the fleet row, with the namespace/pod selectors of every other panel."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Message guards") == rows.index("Fleet limits (Redis)") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    sel = '{namespace=~"$namespace", pod=~"$pod"}'

    guards = by_title["Guard actions by kind"]
    (t,) = guards["targets"]
    assert t["expr"] == f"sum by (guard, action) (rate(wsgate_message_guard_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{guard}} {{action}}"
    assert guards["fieldConfig"]["defaults"]["unit"] == "cps"
    # The description explains every guard/action pair and that a throttle counts once per episode.
    for needle in ("size close", "1009", "rate close", "1008", "rate throttle", "bytes throttle", "once per episode"):
        assert needle in guards["description"], needle

    messages = by_title["Messages per second by direction"]
    (t,) = messages["targets"]
    assert t["expr"] == f"sum by (direction) (rate(wsgate_messages_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{direction}}"
    assert messages["fieldConfig"]["defaults"]["unit"] == "cps"

    for p in (guards, messages):
        assert p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["min"] == 0
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    used = {n for n in METRIC_RE.findall(exprs) if n.startswith(("wsgate_message_guard", "wsgate_messages"))}
    assert used == {"wsgate_message_guard_total", "wsgate_messages_total"} <= SPEC_METRICS


def test_sessions_row():
    """docs/operations.md#access-log: sessions ended by end (stacked) and by closed_by (stacked), close codes per second, the
    abnormal-close ratio with the alert's 5 % as a threshold line, and admin drains per pod, in a row
    after the message guards, with the selectors of every other panel."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Sessions") == rows.index("Message guards") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    sel = '{namespace=~"$namespace", pod=~"$pod"}'

    by_end = by_title["Sessions ended by cause"]
    (t,) = by_end["targets"]
    assert t["expr"] == f"sum by (end) (rate(wsgate_sessions_ended_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{end}}"
    by_who = by_title["Sessions ended by who closed"]
    (t,) = by_who["targets"]
    assert t["expr"] == f"sum by (closed_by) (rate(wsgate_sessions_ended_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{closed_by}}"
    for p in (by_end, by_who):
        assert p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal", p["title"]
    # The descriptions explain every value of the label they split by.
    for value in END_CAUSES:
        assert value in by_end["description"], value
    for value in CLOSED_BY:
        assert value in by_who["description"], value

    codes = by_title["Close codes per second"]
    (t,) = codes["targets"]
    assert t["expr"] == f"sum by (code) (rate(wsgate_close_codes_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{code}}"
    for value in ("1000", "1001", "1005", "3xxx", "4xxx", "other", "none"):
        assert value in codes["description"], value

    ratio = by_title["Abnormal-close ratio"]
    (t,) = ratio["targets"]
    total = f"sum(rate(wsgate_close_codes_total{sel}[$__rate_interval]))"
    abnormal = 'sum(rate(wsgate_close_codes_total{namespace=~"$namespace", pod=~"$pod", code=~"none|1006"}[$__rate_interval]))'
    # No sessions ended: no value rather than 0 / 0.
    assert t["expr"] == f"{abnormal} / ({total} > 0)"
    defaults = ratio["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert [(s["color"], s["value"]) for s in defaults["thresholds"]["steps"]] == [("green", None), ("red", 0.05)]
    assert defaults["custom"]["thresholdsStyle"] == {"mode": "line"}
    assert "stacking" not in defaults["custom"]
    # The line is the alert's threshold.
    rule = next(r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]
                if r["alert"] == "WsgateAbnormalCloses")
    assert "> 0.05\n" in rule["expr"]

    drains = by_title["Admin drains per second"]
    (t,) = drains["targets"]
    assert t["expr"] == f"sum by (pod) (rate(wsgate_admin_drained_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{pod}}"

    for p in (by_end, by_who, codes, drains):
        assert p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["unit"] == "cps", p["title"]
    for p in (by_end, by_who, codes, ratio, drains):
        assert p["fieldConfig"]["defaults"]["min"] == 0, p["title"]
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    used = {n for n in METRIC_RE.findall(exprs)
            if n.startswith(("wsgate_sessions", "wsgate_close_codes", "wsgate_admin"))}
    assert used == {"wsgate_sessions_ended_total", "wsgate_close_codes_total", "wsgate_admin_drained_total"}
    assert used <= SPEC_METRICS


def test_handshake_and_client_pings_row():
    """The handshake policy and the signals to clients (docs/configuration.md: allowed_origins,
    subprotocols, ping_interval, send_timeout): origin and subprotocol refusals with the app's
    bad_subprotocol answers, pings sent per pod, and the sessions ended by ping_timeout or
    send_timeout, in a row after the sessions, with the selectors of every other panel."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Handshake policy and client pings") == rows.index("Sessions") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    sel = '{namespace=~"$namespace", pod=~"$pod"'

    refusals = by_title["Origin and subprotocol refusals per second"]
    a, b = refusals["targets"]
    assert a["expr"] == ("sum by (reason) (rate(wsgate_connections_rejected_total"
                         f'{sel}, reason=~"origin|subprotocol"}}[$__rate_interval]))')
    assert a["legendFormat"] == "{{reason}}"
    assert b["expr"] == ("sum by (kind) (rate(wsgate_upstream_errors_total"
                         f'{sel}, kind="bad_subprotocol"}}[$__rate_interval]))')
    assert b["legendFormat"] == "upstream {{kind}}"
    for needle in ("origin = 403", "subprotocol = 400", "bad_subprotocol", "502", "Cross-Site WebSocket Hijacking",
                   "WsgateOriginRefusals", "allowed_origins", "require_subprotocol"):
        assert needle in refusals["description"], needle

    pings = by_title["Pings sent per second"]
    (t,) = pings["targets"]
    assert t["expr"] == f"sum by (pod) (rate(wsgate_pings_sent_total{sel}}}[$__rate_interval]))"
    assert t["legendFormat"] == "{{pod}}"
    assert "ping_interval" in pings["description"] and "pong_timeout" in pings["description"]

    timeouts = by_title["Sessions ended by ping or send timeout"]
    (t,) = timeouts["targets"]
    assert t["expr"] == ("sum by (end) (rate(wsgate_sessions_ended_total"
                         f'{sel}, end=~"ping_timeout|send_timeout"}}[$__rate_interval]))')
    assert t["legendFormat"] == "{{end}}"
    assert timeouts["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    for value in ("ping_timeout", "send_timeout", "pong_timeout", "Close 1001"):
        assert value in timeouts["description"], value
    # The new end values are explained where every other end is too.
    for value in ("ping_timeout", "send_timeout"):
        assert value in by_title["Sessions ended by cause"]["description"], value
    for value in ("origin (403)", "subprotocol (400)"):
        assert value in by_title["Rejected per second by reason"]["description"], value

    for p in (refusals, pings, timeouts):
        assert p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["unit"] == "cps", p["title"]
        assert p["fieldConfig"]["defaults"]["min"] == 0, p["title"]
    # The alert's metric and reason are what the panel shows.
    rule = next(r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]
                if r["alert"] == "WsgateOriginRefusals")
    assert 'wsgate_connections_rejected_total{reason="origin"}' in rule["expr"]
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    assert "wsgate_pings_sent_total" in METRIC_RE.findall(exprs) and "wsgate_pings_sent_total" in SPEC_METRICS


def test_fleet_balance_row():
    """docs/operations.md#automatic-rebalancing: connections per pod against the fleet mean (dashed), their
    spread ((max - min) / mean, with the default rebalance_tolerance of 10 % as a threshold line), the live
    instances and the sessions shed per pod, in a row after the handshake row, with the selectors of
    every other panel; every description names its metric, says what a healthy picture looks like and
    links the docs."""
    d = dashboard()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows.index("Fleet balance") == rows.index("Handshake policy and client pings") + 1, rows
    by_title = {p["title"]: p for p in panels()}
    sel = '{namespace=~"$namespace", pod=~"$pod"}'
    active = f"sum by (pod) (wsgate_connections_active{sel})"

    mean = by_title["Connections per pod vs the fleet mean"]
    a, b = mean["targets"]
    assert a["expr"] == active and a["legendFormat"] == "{{pod}}"
    # Every pod reports the same mean: max, never a sum.
    assert b["expr"] == f"max(wsgate_fleet_mean{sel})" and b["legendFormat"] == "fleet mean"
    assert mean["fieldConfig"]["defaults"]["unit"] == "short"
    (override,) = mean["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byFrameRefID", "options": "B"}
    assert {p["id"] for p in override["properties"]} == {"custom.lineStyle", "custom.fillOpacity"}

    spread = by_title["Spread"]
    (t,) = spread["targets"]
    # No connections anywhere: no value rather than 0 / 0.
    assert t["expr"] == f"(max({active}) - min({active}))\n/\n(avg({active}) > 0)"
    defaults = spread["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert [(s["color"], s["value"]) for s in defaults["thresholds"]["steps"]] == [("green", None), ("red", 0.1)]
    assert defaults["custom"]["thresholdsStyle"] == {"mode": "line"}

    instances = by_title["Live instances"]
    (t,) = instances["targets"]
    assert t["expr"] == f"max(wsgate_fleet_instances{sel})" and t["legendFormat"] == "live instances"
    assert instances["fieldConfig"]["defaults"]["unit"] == "short"

    shed = by_title["Sessions shed to rebalance per second"]
    (t,) = shed["targets"]
    assert t["expr"] == f"sum by (pod) (rate(wsgate_rebalance_shed_total{sel}[$__rate_interval]))"
    assert t["legendFormat"] == "{{pod}}"
    assert shed["fieldConfig"]["defaults"]["unit"] == "cps"

    row = (mean, spread, instances, shed)
    for p, metric in zip(row, ("wsgate_fleet_mean", "wsgate_connections_active", "wsgate_fleet_instances",
                               "wsgate_rebalance_shed_total")):
        assert p["type"] == "timeseries" and p["fieldConfig"]["defaults"]["min"] == 0, p["title"]
        assert metric in p["description"], (p["title"], metric)
        assert "Healthy:" in p["description"], p["title"]
        assert "docs/operations.md#automatic-rebalancing" in p["description"], p["title"]
    assert "10 %" in spread["description"] and "rebalance_tolerance" in spread["description"]
    for value in ("1012", "end = rebalance", "rebalance_period", "rebalance_cooldown"):
        assert value in shed["description"], value
    # The shed sessions are among the end causes the sessions row explains.
    assert "rebalance" in by_title["Sessions ended by cause"]["description"]
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    used = {n for n in METRIC_RE.findall(exprs) if n in ("wsgate_fleet_mean", "wsgate_fleet_instances",
                                                         "wsgate_rebalance_shed_total")}
    assert used == {"wsgate_fleet_mean", "wsgate_fleet_instances", "wsgate_rebalance_shed_total"} <= SPEC_METRICS


def test_metrics_reference_names_the_fleet_balance_panels():
    """docs/metrics.md's "Used by:" lines name the panels that read each rebalancing series."""
    from conftest import ROOT

    text = (ROOT / "docs" / "metrics.md").read_text()

    def used_by(metric: str) -> str:
        section = text.split(f"\n### {metric}\n", 1)[1].split("\n### ", 1)[0]
        return " ".join(section.split("- Used by:", 1)[1].split("\n- ", 1)[0].split())

    titles = {p["title"] for p in panels()}
    for metric, panel in (("wsgate_fleet_mean", "Connections per pod vs the fleet mean"),
                          ("wsgate_fleet_instances", "Live instances"),
                          ("wsgate_rebalance_shed_total", "Sessions shed to rebalance per second"),
                          ("wsgate_connections_active", "Spread")):
        assert panel in titles, panel
        assert f"*{panel}*" in used_by(metric), (metric, used_by(metric))
