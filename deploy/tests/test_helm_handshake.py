"""The handshake policy and the signals to clients in the Helm chart (docs/configuration.md:
allowed_origins, require_origin, subprotocols, require_subprotocol, refusal_mode, max_close_refusals,
ping_interval, pong_timeout, send_timeout; jwt_from = "subprotocol" with jwt_subprotocol_prefix).

`handshake.*`, `refusalMode`, `maxCloseRefusals`, `clientPings.*` and `sendTimeout` are rendered as
WSGATE_* variables on the wsgate container, each only when its value differs from wsgate's default,
so a release without them renders exactly what it did before; the two lists as one comma-separated
value. The schema refuses what wsgate would refuse (and a few things it would take but that could
never match, such as an origin with a path), naming the value; the template refuses the same for a
parent chart that skips the schema, and `requireSubprotocol` without `subprotocols` (wsgate exits 2
on it) whatever the schema. `jwt.subprotocolPrefix` goes into the mounted config.toml with the other
jwt values. The chart README, NOTES and the plain manifests' commented block say the same.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
import yaml

from conftest import (
    CHART,
    HANDSHAKE_ENV,
    HANDSHAKE_RENDERED,
    HANDSHAKE_VALUES,
    KUBE_DIR,
    assert_lint_clean,
    assert_render_refuses,
    assert_schema_refuses,
    at_path,
    chart_readme_section,
    commented_env_block,
    deep_merge,
    env_of,
    fenced,
    load_yaml_docs,
    parent_chart,
    wsgate_container,
)

NAMES = {name for name, _ in HANDSHAKE_ENV.values()}
JWKS = {"jwksSecret": {"name": "auth-jwks", "key": "jwks.json"}}
USER_RULE = [{"name": "user", "key": "jwt_claim:sub", "maxPerKey": 5}]

# One value per key, alone and away from its default, and the variable it renders.
ALONE: dict[str, tuple[Any, str]] = {
    "handshake.allowedOrigins": (["https://chat.example.com"], "https://chat.example.com"),
    "handshake.requireOrigin": (True, "true"),
    "handshake.subprotocols": (["graphql-transport-ws"], "graphql-transport-ws"),
    "refusalMode": ("close", "close"),
    "maxCloseRefusals": (0, "0"),
    "clientPings.interval": ("25s", "25s"),
    "clientPings.pongTimeout": ("3s", "3s"),
    "sendTimeout": ("45s", "45s"),
}

# Variants rendered, linted and validated against the Kubernetes schemas (test_chart_variants.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "everything": HANDSHAKE_VALUES,
    "everything-classic-monitored": {**HANDSHAKE_VALUES, "nativeSidecar": False, "podMonitor": {"enabled": True},
                                     "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    "origins-only": {"handshake": {"allowedOrigins": ["https://chat.example.com"]}},
    "require-origin-any-origin": {"handshake": {"requireOrigin": True}},
    "pings-only": {"clientPings": {"interval": "20s"}},
    "jwt-in-subprotocol": {"jwt": {**JWKS, "from": "subprotocol", "subprotocolPrefix": "chat.token."},
                           "keyLimits": USER_RULE, "handshake": {"subprotocols": ["chat.v2"]}},
}


def wsgate_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def new_env(r) -> dict[str, str]:
    return {n: v for n, v in env_of(wsgate_of(r)).items() if n in NAMES}


def test_every_value_reaches_its_variable(render):
    assert new_env(render(HANDSHAKE_VALUES)) == HANDSHAKE_RENDERED
    assert set(HANDSHAKE_RENDERED) == NAMES


@pytest.mark.parametrize("path", sorted(ALONE))
def test_each_value_alone_renders_its_variable_only(render, path):
    value, rendered = ALONE[path]
    assert new_env(render(at_path(path, value))) == {HANDSHAKE_ENV[path][0]: rendered}


def test_require_subprotocol_renders_with_its_list(render):
    env = new_env(render({"handshake": {"subprotocols": ["chat.v1"], "requireSubprotocol": True}}))
    assert env == {"WSGATE_SUBPROTOCOLS": "chat.v1", "WSGATE_REQUIRE_SUBPROTOCOL": "true"}


def test_defaults_render_none_of_them(render, chart):
    for path, (_, default) in HANDSHAKE_ENV.items():
        node: Any = chart.values
        for part in path.split("."):
            node = node[part]
        assert node == default, path
    assert chart.values["jwt"]["subprotocolPrefix"] == "base64url.bearer.authorization.k8s.io."
    base = wsgate_of(render({}))
    assert not NAMES & set(env_of(base))
    # The defaults given explicitly, or spelled another way, change nothing at all: the same container.
    explicit: dict[str, Any] = {}
    for path, (_, default) in HANDSHAKE_ENV.items():
        explicit = deep_merge(explicit, at_path(path, default))
    assert wsgate_of(render(explicit)) == base
    for same in ({"clientPings": {"interval": 0, "pongTimeout": 10}},
                 {"clientPings": {"interval": "0ms", "pongTimeout": "10000ms"}},
                 {"clientPings": {"pongTimeout": "0m 10s"}}, {"sendTimeout": 0}, {"sendTimeout": "0m"}):
        assert wsgate_of(render(same)) == base, same
    notes = render({}).notes
    assert "Handshake policy" not in notes and "Signals to clients" not in notes


def test_zero_is_not_a_default_where_it_means_something_else(render):
    """maxCloseRefusals 0 (no close-mode refusal at all: every refusal an HTTP answer) is a value,
    not the default; a sub-second pongTimeout is not 0."""
    assert new_env(render({"maxCloseRefusals": 0})) == {"WSGATE_MAX_CLOSE_REFUSALS": "0"}
    assert new_env(render({"clientPings": {"pongTimeout": "500ms"}})) == {"WSGATE_PONG_TIMEOUT": "500ms"}


def test_lists_are_one_comma_separated_value_in_order(render):
    origins = ["https://b.example.com", "http://localhost:8080", "https://*.a.example.com", "null",
               "http://[::1]:3000", "capacitor://localhost"]
    env = new_env(render({"handshake": {"allowedOrigins": origins, "subprotocols": ["v2.chat", "v1.chat", "mqtt"]}}))
    assert env == {"WSGATE_ALLOWED_ORIGINS": ",".join(origins), "WSGATE_SUBPROTOCOLS": "v2.chat,v1.chat,mqtt"}
    # Nothing in an entry may be taken for the separator.
    assert [e.split(",") for e in env.values()] == [origins, ["v2.chat", "v1.chat", "mqtt"]]


def test_durations_are_rendered_as_given(render):
    for given, text in (("1m 30s", "1m 30s"), ("1500ms", "1500ms"), (45, "45"), ("2m", "2m")):
        env = new_env(render({"clientPings": {"interval": given}, "sendTimeout": given}))
        assert env == {"WSGATE_PING_INTERVAL": text, "WSGATE_SEND_TIMEOUT": text}, given


def test_variables_sit_after_the_guards_and_before_the_config_file_and_extra_env(render):
    """After every other WSGATE_* value (the message guards' too), before WSGATE_CONFIG and extraEnv,
    so extraEnv can still override any of them."""
    values = deep_merge(HANDSHAKE_VALUES, {"messageGuards": {"maxMessageSize": 1024}, "jwt": JWKS,
                                           "keyLimits": USER_RULE,
                                           "extraEnv": [{"name": "WSGATE_REFUSAL_MODE", "value": "status"}]})
    names = [e["name"] for e in wsgate_of(render(values))["env"]]
    at = [i for i, n in enumerate(names) if n in NAMES][:-1]  # the last one is extraEnv's
    assert [names[i] for i in at] == [name for name, _ in HANDSHAKE_ENV.values()]
    assert at == list(range(at[0], at[0] + len(NAMES)))
    assert names.index("WSGATE_MAX_MESSAGE_SIZE") < at[0] and at[-1] < names.index("WSGATE_CONFIG")
    assert names[-1] == "WSGATE_REFUSAL_MODE"


def test_a_change_rolls_the_pods_and_never_touches_the_config_file(render):
    values = deep_merge(HANDSHAKE_VALUES, {"jwt": JWKS, "keyLimits": USER_RULE})
    before = render(values)
    after = render(deep_merge(values, {"handshake": {"allowedOrigins": ["https://new.example.com"]}}))
    assert before.one("Deployment") != after.one("Deployment")
    assert new_env(after)["WSGATE_ALLOWED_ORIGINS"] == "https://new.example.com"
    toml = before.config_toml()
    assert toml and not re.search(r"^(allowed_origins|require_|subprotocols|refusal_mode|max_close|ping_|pong_|send_)",
                                  toml, re.M)


def test_require_origin_without_origins_is_allowed(render):
    """It only requires the header: no render error, the one variable."""
    assert new_env(render({"handshake": {"requireOrigin": True, "allowedOrigins": []}})) == {
        "WSGATE_REQUIRE_ORIGIN": "true"}


def test_require_subprotocol_without_subprotocols_is_refused(helm, chart, render):
    message = (r"handshake.requireSubprotocol is true but handshake.subprotocols is empty: no upgrade could offer "
               r"one of them, and wsgate refuses that configuration \(exit 2\)")
    assert_render_refuses(helm, chart, render, {"handshake": {"requireSubprotocol": True}}, message)
    assert_render_refuses(helm, chart, render, {"handshake": {"requireSubprotocol": True, "subprotocols": []}},
                          message)
    # With every other value set too, and from a chart that includes the container.
    assert_render_refuses(helm, chart, render, deep_merge(HANDSHAKE_VALUES, {"handshake": {"subprotocols": []}}),
                          message)


# ---- jwt_from = "subprotocol" ---------------------------------------------------------------------


def test_jwt_from_subprotocol_goes_into_the_config_file(render):
    toml = render({"jwt": {**JWKS, "from": "subprotocol"}, "keyLimits": USER_RULE}).config_toml()
    assert 'jwt_from = "subprotocol"' in toml.splitlines()
    assert "jwt_subprotocol_prefix" not in toml, "the default prefix is wsgate's own: not rendered"
    toml = render({"jwt": {**JWKS, "from": "subprotocol", "subprotocolPrefix": "base64url.bearer.authorization.k8s.io."},
                   "keyLimits": USER_RULE}).config_toml()
    assert "jwt_subprotocol_prefix" not in toml
    toml = render(VARIANTS["jwt-in-subprotocol"]).config_toml()
    lines = toml.splitlines()
    assert lines.index('jwt_subprotocol_prefix = "chat.token."') == lines.index('jwt_from = "subprotocol"') + 1
    # Never an environment variable.
    assert not any(n.startswith("WSGATE_JWT") for n in env_of(wsgate_of(render(VARIANTS["jwt-in-subprotocol"]))))


@pytest.mark.parametrize("values", [
    {"jwt": {"subprotocolPrefix": "chat.token."}},
    {"jwt": {**JWKS, "subprotocolPrefix": "chat.token."}, "keyLimits": USER_RULE},
    {"jwt": {**JWKS, "from": "query:access_token", "subprotocolPrefix": "chat.token."}, "keyLimits": USER_RULE},
], ids=["no-jwks", "no-from", "from-query"])
def test_a_prefix_that_would_do_nothing_is_refused(helm, chart, render, values):
    assert_render_refuses(helm, chart, render, values,
                          r'jwt.subprotocolPrefix \("chat.token."\) is used only with jwt.from: subprotocol and '
                          r"jwt.jwksSecret.name")


# ---- the schema --------------------------------------------------------------------------------------

# Refused by values.schema.json (so `helm lint` reports them too), each with the path of the value the
# error names.
SCHEMA_REFUSES: dict[str, tuple[dict[str, Any], str]] = {
    "origin with a trailing slash": ({"handshake": {"allowedOrigins": ["https://chat.example.com/"]}},
                                     "/handshake/allowedOrigins/0"),
    "origin with a path": ({"handshake": {"allowedOrigins": ["https://chat.example.com/ws"]}},
                           "/handshake/allowedOrigins/0"),
    "origin without a scheme": ({"handshake": {"allowedOrigins": ["chat.example.com"]}},
                                "/handshake/allowedOrigins/0"),
    "bare star": ({"handshake": {"allowedOrigins": ["*"]}}, "/handshake/allowedOrigins/0"),
    "star in the middle": ({"handshake": {"allowedOrigins": ["https://chat.*.com"]}}, "/handshake/allowedOrigins/0"),
    "star in the scheme": ({"handshake": {"allowedOrigins": ["*://chat.example.com"]}},
                           "/handshake/allowedOrigins/0"),
    "two origins in one entry": ({"handshake": {"allowedOrigins": ["https://a.example.com,https://b.example.com"]}},
                                 "/handshake/allowedOrigins/0"),
    "origin with a space": ({"handshake": {"allowedOrigins": ["https://a.example.com "]}},
                            "/handshake/allowedOrigins/0"),
    "second origin bad": ({"handshake": {"allowedOrigins": ["https://a.example.com", "https://b.example.com:"]}},
                          "/handshake/allowedOrigins/1"),
    "port too long": ({"handshake": {"allowedOrigins": ["https://a.example.com:123456"]}},
                      "/handshake/allowedOrigins/0"),
    "port zero": ({"handshake": {"allowedOrigins": ["https://a.example.com:0"]}}, "/handshake/allowedOrigins/0"),
    "port above 65535": ({"handshake": {"allowedOrigins": ["https://a.example.com:65536"]}},
                         "/handshake/allowedOrigins/0"),
    "origins a string": ({"handshake": {"allowedOrigins": "https://a.example.com"}}, "/handshake/allowedOrigins"),
    "origin a number": ({"handshake": {"allowedOrigins": [8080]}}, "/handshake/allowedOrigins/0"),
    "duplicate origins": ({"handshake": {"allowedOrigins": ["https://a.example.com", "https://a.example.com"]}},
                          "/handshake/allowedOrigins"),
    "requireOrigin a string": ({"handshake": {"requireOrigin": "yes"}}, "/handshake/requireOrigin"),
    "subprotocol with a space": ({"handshake": {"subprotocols": ["chat v1"]}}, "/handshake/subprotocols/0"),
    "subprotocol with a comma": ({"handshake": {"subprotocols": ["chat.v1,chat.v2"]}}, "/handshake/subprotocols/0"),
    "subprotocol empty": ({"handshake": {"subprotocols": [""]}}, "/handshake/subprotocols/0"),
    "subprotocol with a slash": ({"handshake": {"subprotocols": ["chat/v1"]}}, "/handshake/subprotocols/0"),
    "subprotocols a string": ({"handshake": {"subprotocols": "chat.v1"}}, "/handshake/subprotocols"),
    "duplicate subprotocols": ({"handshake": {"subprotocols": ["chat.v1", "chat.v1"]}}, "/handshake/subprotocols"),
    "requireSubprotocol a string": ({"handshake": {"requireSubprotocol": "true"}}, "/handshake/requireSubprotocol"),
    "unknown handshake value": ({"handshake": {"allowedOrigin": ["https://a.example.com"]}}, "/handshake"),
    "snake_case key": ({"handshake": {"allowed_origins": ["https://a.example.com"]}}, "/handshake"),
    "handshake not an object": ({"handshake": "strict"}, "/handshake"),
    "refusalMode unknown": ({"refusalMode": "websocket"}, "/refusalMode"),
    "refusalMode capitalised": ({"refusalMode": "Close"}, "/refusalMode"),
    "refusalMode empty": ({"refusalMode": ""}, "/refusalMode"),
    "maxCloseRefusals negative": ({"maxCloseRefusals": -1}, "/maxCloseRefusals"),
    "maxCloseRefusals fractional": ({"maxCloseRefusals": 2.5}, "/maxCloseRefusals"),
    "maxCloseRefusals a string": ({"maxCloseRefusals": "1024"}, "/maxCloseRefusals"),
    "ping interval a word": ({"clientPings": {"interval": "often"}}, "/clientPings/interval"),
    "ping interval negative": ({"clientPings": {"interval": "-30s"}}, "/clientPings/interval"),
    "ping interval unit unknown": ({"clientPings": {"interval": "30 sec"}}, "/clientPings/interval"),
    "pong timeout negative number": ({"clientPings": {"pongTimeout": -1}}, "/clientPings/pongTimeout"),
    "pong timeout fractional": ({"clientPings": {"pongTimeout": "1.5s"}}, "/clientPings/pongTimeout"),
    "pong timeout zero": ({"clientPings": {"pongTimeout": 0}}, "/clientPings/pongTimeout"),
    "pong timeout 0s": ({"clientPings": {"pongTimeout": "0s"}}, "/clientPings/pongTimeout"),
    "pong timeout 0ms 0s": ({"clientPings": {"pongTimeout": "0ms 0s"}}, "/clientPings/pongTimeout"),
    "unknown clientPings value": ({"clientPings": {"timeout": "10s"}}, "/clientPings"),
    "sendTimeout a word": ({"sendTimeout": "never"}, "/sendTimeout"),
    "sendTimeout a bool": ({"sendTimeout": False}, "/sendTimeout"),
    "jwt.from subprotocol with a name": ({"jwt": {"from": "subprotocol:chat"}}, "/jwt/from"),
    "jwt.subprotocolPrefix empty": ({"jwt": {"subprotocolPrefix": ""}}, "/jwt/subprotocolPrefix"),
    "jwt.subprotocolPrefix with a space": ({"jwt": {"subprotocolPrefix": "bearer token."}}, "/jwt/subprotocolPrefix"),
    "originRefusals threshold negative": ({"prometheusRule": {"originRefusals": {"threshold": -0.1}}},
                                          "/prometheusRule/originRefusals/threshold"),
    "originRefusals for not a duration": ({"prometheusRule": {"originRefusals": {"for": "ten minutes"}}},
                                          "/prometheusRule/originRefusals/for"),
    "originRefusals unknown value": ({"prometheusRule": {"originRefusals": {"minRefusals": 3}}},
                                     "/prometheusRule/originRefusals"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REFUSES))
def test_schema_refuses_bad_values_naming_them(helm, chart, render, case):
    values, path = SCHEMA_REFUSES[case]
    assert_schema_refuses(helm, chart, render, case, values)
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert f"'{path}'" in str(err.value), str(err.value)


@pytest.mark.parametrize("values,says", [
    ({"refusalMode": "websocket"}, "'status', 'close'"),
    ({"handshake": {"allowedOrigins": ["https://chat.example.com/"]}}, "does not match pattern"),
    ({"handshake": {"subprotocols": ["chat v1"]}}, "does not match pattern"),
    ({"maxCloseRefusals": -1}, "minimum"),
    ({"handshake": {"allowedOrigins": "https://a.example.com"}}, "want array"),
])
def test_schema_refusal_says_what_is_wrong(helm, render, values, says):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert says in str(err.value), str(err.value)


def test_schema_accepts_every_documented_form(chart):
    accepted = [
        {"handshake": {"allowedOrigins": ["https://app.example.com", "https://*.example.com", "null",
                                          "http://localhost:8080", "HTTPS://App.Example.COM:443",
                                          "https://*.eu.example.com", "http://[::1]:3000", "http://10.0.0.1",
                                          "capacitor://localhost", "chrome-extension://abcdefghijklmnop",
                                          "http://build_host.internal:65535", "https://a.example.com:1"]}},
        {"handshake": {"allowedOrigins": []}}, {"handshake": {"requireOrigin": True}},
        {"handshake": {"subprotocols": ["chat.v1", "graphql-transport-ws", "v10.stomp", "mqtt", "wamp.2.json",
                                        "x_custom~1"]}},
        {"handshake": {"subprotocols": ["chat"], "requireSubprotocol": True}},
        {"refusalMode": "status"}, {"refusalMode": "close"},
        {"maxCloseRefusals": 0}, {"maxCloseRefusals": 1}, {"maxCloseRefusals": 10000000},
        {"clientPings": {"interval": "30s", "pongTimeout": "10s"}}, {"clientPings": {"interval": "1m 30s"}},
        {"clientPings": {"interval": 0, "pongTimeout": 5}}, {"clientPings": {"interval": "250ms"}},
        {"clientPings": {"pongTimeout": "1ms"}}, {"clientPings": {"pongTimeout": "0s 500ms"}},
        {"sendTimeout": "0s"}, {"sendTimeout": "2m"}, {"sendTimeout": 30},
        {"jwt": {"from": "subprotocol", "subprotocolPrefix": "chat.token."}},
        {"prometheusRule": {"originRefusals": {"enabled": False, "severity": "critical", "threshold": 0,
                                               "for": "1h"}}},
        HANDSHAKE_VALUES,
    ]
    for values in accepted:
        chart.validate_schema(deep_merge(chart.values, values))


# ---- the template's own checks, for a parent chart that skips the schema ----------------------------


@pytest.fixture(scope="module")
def schemaless(helm, tmp_path_factory):
    copy_dir = tmp_path_factory.mktemp("schemaless") / "wsgate"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(str(copy_dir)) as c:
        yield c


@pytest.mark.parametrize("values,message", [
    ({"refusalMode": "websocket"}, r'refusalMode "websocket": must be status .* or close'),
    ({"handshake": {"allowedOrigins": ["https://a.example.com,https://b.example.com"]}},
     r'handshake.allowedOrigins\[0\] "https://a.example.com,https://b.example.com": must be an origin'),
    ({"handshake": {"allowedOrigins": ["https://a.example.com", "https://b.example.com/"]}},
     r'handshake.allowedOrigins\[1\] "https://b.example.com/": must be an origin .* without a path or trailing slash'),
    ({"handshake": {"allowedOrigins": ["*"]}}, r'handshake.allowedOrigins\[0\] "\*": must be an origin'),
    ({"handshake": {"allowedOrigins": "https://a.example.com"}}, r"handshake.allowedOrigins must be a list of strings"),
    ({"handshake": {"subprotocols": ["chat v1"]}}, r'handshake.subprotocols\[0\] "chat v1": must be a subprotocol name'),
    ({"handshake": {"subprotocols": ["a,b"]}}, r'handshake.subprotocols\[0\] "a,b": must be a subprotocol name'),
    ({"handshake": {"subprotocols": "chat.v1"}}, r"handshake.subprotocols must be a list of strings"),
    ({"handshake": {"requireSubprotocol": True}}, r"handshake.requireSubprotocol is true but handshake.subprotocols"),
    ({"handshake": {"allowedOrigins": ["https://a.example.com:70000"]}},
     r'handshake.allowedOrigins\[0\] "https://a.example.com:70000": must be an origin'),
    ({"clientPings": {"pongTimeout": "0s"}}, r"clientPings.pongTimeout \(0s\) must be longer than 0"),
    ({"clientPings": {"pongTimeout": 0}}, r"clientPings.pongTimeout \(0\) must be longer than 0"),
], ids=["refusal-mode", "origin-comma", "origin-slash", "origin-star", "origins-string", "subprotocol-space",
        "subprotocol-comma", "subprotocols-string", "require-without-list", "origin-port", "pong-0s", "pong-0"])
def test_the_template_checks_what_the_schema_checks_too(helm, schemaless, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        schemaless.render(values, name="chat", namespace="prod")


def test_the_schemaless_chart_renders_good_values_alike(render, schemaless):
    """The checks above refuse only what they should: every good value renders in the copy too."""
    from conftest import Rendered

    r = Rendered(schemaless.render(HANDSHAKE_VALUES, name="chat", namespace="prod"))
    assert new_env(r) == HANDSHAKE_RENDERED
    assert wsgate_of(r) == wsgate_of(render(HANDSHAKE_VALUES))


# ---- from another chart, NOTES, README, plain manifests ----------------------------------------------


def test_included_by_another_chart(helm, tmp_path):
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    parent = parent_chart(tmp_path / "a", {**off, **HANDSHAKE_VALUES})
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert {n: v for n, v in env_of(wsgate_container(dep)[0]).items() if n in NAMES} == HANDSHAKE_RENDERED
    report = helm.lint(str(parent), strict=True)
    assert report["errors"] == [], report
    # The parent's render fails on the same misconfiguration.
    bad = parent_chart(tmp_path / "b", {**off, "handshake": {"requireSubprotocol": True}})
    with helm.Chart.load(str(bad)) as c:
        with pytest.raises(helm.HelmRenderError, match="handshake.requireSubprotocol is true"):
            c.render({}, name="myapp", namespace="prod")


def test_lint_is_clean_with_every_value(helm):
    assert_lint_clean(helm, HANDSHAKE_VALUES)


def test_notes_describe_them(render):
    notes = render(HANDSHAKE_VALUES).notes
    assert ("Handshake policy: origins https://chat.example.com, https://*.example.com, null (any other gets 403 "
            "origin), and an Origin header required (403 origin without); subprotocols chat.v2, chat.v1 (others "
            "removed from the offer), one of them required (400 subprotocol without).") in notes
    assert ('Signals to clients: refusals of WebSocket upgrades as Close 1013 "retry after N s" (at most 256 at '
            "once, then HTTP); pings after 30s without a frame from the client, session ended 5s later without "
            "one; send timeout 1m.") in notes
    notes = render({"handshake": {"subprotocols": ["mqtt"]}}).notes
    assert "Handshake policy: origins any; subprotocols mqtt (others removed from the offer)." in notes
    assert "Signals to clients" not in notes
    notes = render({"sendTimeout": "30s"}).notes
    assert "Signals to clients: refusals as HTTP answers; pings off; send timeout 30s." in notes
    assert "Handshake policy" not in notes


def test_readme_examples_render_as_they_say(render):
    section = chart_readme_section("Handshake policy")
    values_block, env_block = re.findall(r"```yaml\n(.*?)```", section, re.S)[:2]
    assert new_env(render(yaml.safe_load(values_block))) == {
        e["name"]: e["value"] for e in yaml.safe_load(env_block)}
    signals = yaml.safe_load(fenced(chart_readme_section("Signals to clients"), "yaml"))
    # pongTimeout: 10s is the default, spelled out: no variable for it.
    assert new_env(render(signals)) == {"WSGATE_REFUSAL_MODE": "close", "WSGATE_PING_INTERVAL": "30s",
                                        "WSGATE_SEND_TIMEOUT": "1m"}
    tokens = section.split("### Tokens in `Sec-WebSocket-Protocol`", 1)[1]
    toml = render(yaml.safe_load(fenced(tokens, "yaml"))).config_toml()
    assert 'jwt_from = "subprotocol"' in toml and "jwt_subprotocol_prefix" not in toml


def test_readme_documents_every_value(chart):
    readme = (CHART / "README.md").read_text()
    body = chart_readme_section("Handshake policy") + chart_readme_section("Signals to clients")
    for path, (env, default) in HANDSHAKE_ENV.items():
        row = next((line for line in body.splitlines() if line.startswith(f"| `{path}` |")), None)
        assert row, f"no table row for {path}"
        shown = "[]" if default == [] else str(default).lower() if isinstance(default, bool) else str(default)
        assert f"`{env}`" in row and f"`{shown}`" in row, row
    for needle in ("Cross-Site WebSocket Hijacking", "403", "400", "1013", "retry after N s", "bad_subprotocol",
                   "wsgate_pings_sent_total", "ping_timeout", "send_timeout", "WsgateOriginRefusals",
                   "comma-separated", "exit 2", "jwt_subprotocol_prefix"):
        assert needle in body, needle
    values_table = readme.split("## Values", 1)[1]
    for value in ("handshake", "refusalMode", "maxCloseRefusals", "clientPings", "sendTimeout"):
        assert f"| `{value}` |" in values_table, value
    assert "`jwt.subprotocolPrefix`" in values_table and "originRefusals.{threshold: 0.1, for: 10m}" in values_table


def _manifest_block(file: str) -> list[dict[str, str]]:
    return commented_env_block(file, "# Handshake policy and signals to clients")


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_show_them_as_the_chart_renders_them(render, file):
    """The plain manifests carry the nine variables commented out; uncommented, they are what the
    chart renders for the same values (pongTimeout's default, spelled out, renders none)."""
    block = _manifest_block(file)
    assert [e["name"] for e in block] == [name for name, _ in HANDSHAKE_ENV.values()]
    given = {e["name"]: e["value"] for e in block}
    values = {
        "handshake": {"allowedOrigins": given["WSGATE_ALLOWED_ORIGINS"].split(","),
                      "requireOrigin": given["WSGATE_REQUIRE_ORIGIN"] == "true",
                      "subprotocols": given["WSGATE_SUBPROTOCOLS"].split(","),
                      "requireSubprotocol": given["WSGATE_REQUIRE_SUBPROTOCOL"] == "true"},
        "refusalMode": given["WSGATE_REFUSAL_MODE"], "maxCloseRefusals": int(given["WSGATE_MAX_CLOSE_REFUSALS"]),
        "clientPings": {"interval": given["WSGATE_PING_INTERVAL"], "pongTimeout": given["WSGATE_PONG_TIMEOUT"]},
        "sendTimeout": given["WSGATE_SEND_TIMEOUT"],
    }
    rendered = new_env(render(values))
    assert {**rendered, "WSGATE_PONG_TIMEOUT": "10s", "WSGATE_MAX_CLOSE_REFUSALS": "1024"} == given
    # Commented out: the manifests' wsgate has none of them.
    dep = next(o for o in load_yaml_docs((KUBE_DIR / file).read_text()) if o["kind"] == "Deployment")
    assert not NAMES & set(env_of(wsgate_container(dep)[0]))
