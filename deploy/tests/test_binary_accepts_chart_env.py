"""The environment the chart and the example manifests give the container, fed to the real binary:
`wsgate check-config` must accept it and print the values the chart asked for.

docs/configuration.md keys must be accepted now. docs/operations.md#rollouts and docs/behaviour.md#close-frames keys (rollout safety, close frames) belong to later
issues: keys the binary still answers "unknown key" for are dropped, the rest must be accepted, and
the test is reported as xfail naming the missing keys (it passes once the binary has them all);
any other refusal fails.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import KUBE_DIR, ROOT, SPEC_KEYS, VALUE_SETS, WSGATE_BIN, env_of, load_yaml_docs, wsgate_container

SECTION2 = set(SPEC_KEYS[:12])
LATER = set(SPEC_KEYS[12:])


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if not WSGATE_BIN.exists():
        pytest.skip(f"wsgate binary not built at {WSGATE_BIN}")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run([str(WSGATE_BIN), "check-config"], env=clean, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)




def chart_env(render, name: str) -> dict[str, str]:
    return env_of(wsgate_container(render(VALUE_SETS[name]).one("Deployment"))[0])


def example_env(file: str) -> dict[str, str]:
    dep = next(o for o in load_yaml_docs((KUBE_DIR / file).read_text()) if o["kind"] == "Deployment")
    return env_of(wsgate_container(dep)[0])


UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """A humantime duration ("1m 40s", "250ms", or bare seconds) in seconds."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    assert parts, text
    return sum(int(n) * UNITS[u] for n, u in parts)


def effective(out: str, key: str) -> str:
    # TOML-ish `key = value`, maybe quoted, maybe with a trailing `# comment`.
    m = re.search(rf"^{key}\s*=\s*(\"[^\"\n]*\"|[^#\n]*?)\s*(#.*)?$", out, re.M)
    assert m, f"check-config printed no {key}: {out}"
    return m.group(1).strip('"')


def assert_effective(res: subprocess.CompletedProcess[str], env: dict[str, str]) -> None:
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert int(effective(out, "max_clients")) == int(env["WSGATE_MAX_CLIENTS"]), out
    assert effective(out, "listen") == env["WSGATE_LISTEN"], out
    assert effective(out, "upstream").removeprefix("http://") == env["WSGATE_UPSTREAM"], out
    assert effective(out, "log_format") == env["WSGATE_LOG_FORMAT"], out
    for key in ("shutdown_grace", "retry_after", "tcp_keepalive"):
        assert seconds(effective(out, key)) == seconds(env["WSGATE_" + key.upper()]), (key, out)
    # Every other value the binary prints must be the one the chart asked for.
    for name, want in env.items():
        key = name.removeprefix("WSGATE_").lower()
        if not re.search(rf"^{key}\s*=", out, re.M) or key in ("upstream", "listen", "admin_listen"):
            continue
        got = effective(out, key)
        if key == "admission_burst" and want == "0":
            continue  # 0 means "same as the rate": the binary prints the resolved size
        if got.startswith("["):  # a TOML array: a list the environment gives comma-separated
            import tomllib

            assert tomllib.loads(f"v = {got}")["v"] == want.split(","), (key, got, want)
            continue
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", want) and re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", got):
            assert float(got) == float(want), (key, got, want)
        elif re.fullmatch(r"([0-9]+\s*[a-z]+\s*)+", want):
            assert seconds(got) == seconds(want), (key, got, want)
        else:
            assert got == want, (key, got, want)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_binary_accepts_the_chart_section2_env(render, name):
    env = {k: v for k, v in chart_env(render, name).items() if k.removeprefix("WSGATE_").lower() in SECTION2}
    assert_effective(check_config(env), env)


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_binary_accepts_the_example_section2_env(file):
    env = {k: v for k, v in example_env(file).items() if k.removeprefix("WSGATE_").lower() in SECTION2}
    assert_effective(check_config(env), env)


def _full(env: dict[str, str]) -> None:
    """Everything the binary knows must be accepted now; keys it does not know yet are dropped
    one by one (only §7/§8 ones) and reported as xfail at the end."""
    env = dict(env)
    missing: list[str] = []
    while True:
        res = check_config(env)
        m = re.search(r"unknown key (\w+)", res.stderr) if res.returncode == 2 else None
        if not (m and m.group(1) in LATER and "WSGATE_" + m.group(1).upper() in env):
            break
        missing.append(m.group(1))
        del env["WSGATE_" + m.group(1).upper()]
    assert_effective(res, env)
    if missing:
        pytest.xfail(f"binary does not implement docs/operations.md#rollouts and docs/behaviour.md#close-frames keys {', '.join(missing)} yet; the rest is accepted")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_binary_accepts_the_full_chart_env(render, name):
    _full(chart_env(render, name))


def test_binary_accepts_the_full_example_env():
    _full(example_env("native-sidecar.yaml"))


# A JWKS with one HS256 key, for when the repository has no JWT fixture of its own.
TINY_JWKS = '{"keys":[{"kty":"oct","kid":"t","alg":"HS256","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}'


def test_binary_accepts_the_rendered_key_limits_config(render, tmp_path):
    """docs/operations.md#limits-per-key: the config.toml the chart renders from keyLimits and jwt (KEY_LIMITS_VALUES: three
    rules, every field, an override key with a quote and a backslash) is loaded by
    `wsgate check-config --config`, and the effective configuration it prints has the rules as
    given. The JWKS and admin-token paths of the pod do not exist here: the environment points
    them at local files, as it overrides the file in the pod too.

    Fails until the binary implements key_limits, jwt_* and admin_token_file (no skip, no xfail:
    it is the check that the chart and the binary agree)."""
    import tomllib

    from conftest import KEY_LIMITS_VALUES, expected_key_limits

    r = render(KEY_LIMITS_VALUES)
    (cm,) = [o for o in r.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
    config = tmp_path / "config.toml"
    config.write_text(cm["data"]["config.toml"])
    fixture = ROOT / "tests" / "fixtures" / "jwt" / "jwks.json"
    if fixture.is_file():
        jwks = fixture
    else:
        jwks = tmp_path / "jwks" / "jwks.json"
        jwks.parent.mkdir()
        jwks.write_text(TINY_JWKS)
    token = tmp_path / "admin" / "token"
    token.parent.mkdir()
    token.write_text("s3cret-admin-token\n")
    if not WSGATE_BIN.exists():
        pytest.skip(f"wsgate binary not built at {WSGATE_BIN}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WSGATE_UPSTREAM": "127.0.0.1:1",
           "WSGATE_JWT_JWKS_FILE": str(jwks), "WSGATE_ADMIN_TOKEN_FILE": str(token)}
    res = subprocess.run([str(WSGATE_BIN), "check-config", "--config", str(config)], env=env,
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"exit {res.returncode}\n--- config.toml\n{config.read_text()}\n--- stderr\n{res.stderr}"
    printed = tomllib.loads(res.stdout)  # check-config prints the effective configuration as TOML
    assert "key_limits" in printed, res.stdout
    want = expected_key_limits(KEY_LIMITS_VALUES)
    assert [rule["name"] for rule in printed["key_limits"]] == [rule["name"] for rule in want], res.stdout
    for got, rule in zip(printed["key_limits"], want):
        # Fields the values left out are printed with wsgate's defaults; those given must be as given.
        for field, value in rule.items():
            if field == "key" and value.startswith("header:"):
                value = value.lower()  # header names are case-insensitive; wsgate prints them lowercased
            assert got.get(field) == value, (rule["name"], field, got.get(field), value)
    assert printed["jwt_jwks_file"] == str(jwks)  # the environment overrides the file
    assert printed["jwt_issuer"] == KEY_LIMITS_VALUES["jwt"]["issuer"]
    assert printed["jwt_audience"] == KEY_LIMITS_VALUES["jwt"]["audience"]
    assert printed["jwt_from"] == KEY_LIMITS_VALUES["jwt"]["from"]
    assert printed["admin_token_file"] == str(token)


# docs/operations.md#fleet-wide-limits: what the Secret of FLEET_VALUES would hold (the kubelet turns the secretKeyRef into this).
SECRET_REDIS_URL = "redis://:s3cret@127.0.0.1:6379/0"
FLEET_CASES = {
    "secret-url-every-value": None,  # conftest.FLEET_VALUES, every rebalancing value set too
    "plain-url-defaults": {"fleet": {"redisUrl": "redis://127.0.0.1:6379/0"}},
    # docs/operations.md#automatic-rebalancing: values at the edges of what the schema lets through.
    "rebalance-edges": {"fleet": {"redisUrl": "redis://127.0.0.1:6379/0", "maxClients": 100,
                                  "rebalance": {"enabled": True, "tolerance": 10, "after": "500ms", "period": 45,
                                                "cooldown": "0s", "closeCode": 4999}}},
    "rebalance-tolerance-zero": {"fleet": {"redisUrl": "redis://127.0.0.1:6379/0",
                                           "rebalance": {"enabled": True, "tolerance": 0, "closeCode": 1000}}},
}


@pytest.mark.parametrize("case", sorted(FLEET_CASES))
def test_binary_accepts_the_chart_fleet_env(render, tmp_path, case):
    """docs/operations.md#fleet-wide-limits: the WSGATE_FLEET_* variables the chart renders (and, for FLEET_VALUES, the
    config.toml with a `fleet = true` rule) are accepted by `wsgate check-config`, which prints the
    values the chart asked for; so are the WSGATE_REBALANCE* ones (docs/operations.md#automatic-rebalancing),
    and where the chart left one out the binary has its default. check-config only validates: no
    Redis is needed."""
    import tomllib

    from conftest import FLEET_VALUES

    values = FLEET_CASES[case] or FLEET_VALUES
    r = render(values)
    container = wsgate_container(r.one("Deployment"))[0]
    env: dict[str, str] = {}
    for e in container["env"]:
        if "valueFrom" in e:
            assert e["name"] == "WSGATE_FLEET_REDIS_URL" and "secretKeyRef" in e["valueFrom"], e
            env[e["name"]] = SECRET_REDIS_URL
        else:
            env[e["name"]] = e["value"]
    if "WSGATE_CONFIG" in env:
        config = tmp_path / "config.toml"
        config.write_text(r.config_toml())
        env["WSGATE_CONFIG"] = str(config)
    res = check_config(env)
    assert res.returncode == 0, f"exit {res.returncode}\n--- env\n{env}\n--- stderr\n{res.stderr}"
    printed = tomllib.loads(res.stdout)
    for name, want in env.items():
        key = name.removeprefix("WSGATE_").lower()
        if not key.startswith("fleet_") or key == "fleet_redis_url":
            continue  # the URL may be printed with its password masked
        got = printed.get(key)
        assert got is not None, f"check-config printed no {key}: {res.stdout}"
        if key in ("fleet_lease_ttl", "fleet_timeout"):
            assert seconds(str(got)) == seconds(want), (key, got, want)
        elif key == "fleet_max_clients":
            assert int(got) == int(want), (key, got, want)
        else:
            assert got == want, (key, got, want)
    assert "fleet_redis_url" in printed, res.stdout
    for rule in printed.get("key_limits", []):
        given = next(x for x in values.get("keyLimits", []) if x["name"] == rule["name"])
        assert rule["fleet"] == given.get("fleet", False), rule
    # Automatic rebalancing: what the chart rendered is what the binary took, and what it left out
    # is wsgate's own default (conftest.REBALANCE_ENV).
    from conftest import REBALANCE_ENV

    for name, default in REBALANCE_ENV.values():
        key = name.removeprefix("WSGATE_").lower()
        got = printed.get(key)
        assert got is not None, f"check-config printed no {key}: {res.stdout}"
        want = env.get(name, str(default).lower() if isinstance(default, bool) else str(default))
        if key == "rebalance":
            assert got is (want == "true"), (key, got, want)
        elif key == "rebalance_tolerance":
            assert float(got) == float(want), (key, got, want)
        elif key == "close_code_rebalance":
            assert int(got) == int(want), (key, got, want)
        else:
            assert seconds(str(got)) == seconds(want), (key, got, want)


def printed_for(render, case: str, values: dict, names, marker: str) -> tuple[dict, dict, object]:
    """The environment of `case` — the chart rendered with `values` ("chart-every-value"), or the
    native manifest's example with its variables after the comment `marker` uncommented — checked
    to hold every name of `names`, and what `wsgate check-config` printed for it (it must exit 0)."""
    import tomllib

    from conftest import commented_env_block

    if case == "chart-every-value":
        env = env_of(wsgate_container(render(values).one("Deployment"))[0])
    else:
        env = {**example_env("native-sidecar.yaml"),
               **{e["name"]: e["value"] for e in commented_env_block("native-sidecar.yaml", marker)}}
    assert set(names) <= set(env), env
    res = check_config(env)
    assert res.returncode == 0, f"exit {res.returncode}\n--- env\n{env}\n--- stderr\n{res.stderr}"
    printed = tomllib.loads(res.stdout)
    for name in names:
        key = name.removeprefix("WSGATE_").lower()
        assert key in printed, f"check-config printed no {key}: {res.stdout}"
    return env, printed, res


# docs/operations.md#message-guards: the message guards, as the chart renders them with every value set, and as the plain
# manifests show them (commented out) once uncommented.
GUARD_CASES = ["chart-every-value", "native-manifest-uncommented"]


@pytest.mark.parametrize("case", GUARD_CASES)
def test_binary_accepts_the_message_guard_env(render, case):
    """The WSGATE_* variables of the message guards are accepted by `wsgate check-config`, which
    prints the values the chart (or the manifest) asked for; with them the rest of the environment
    is accepted too."""
    from conftest import MESSAGE_GUARDS_ENV, MESSAGE_GUARDS_VALUES

    names = {name: key for key, (name, _) in MESSAGE_GUARDS_ENV.items()}
    env, printed, res = printed_for(render, case, MESSAGE_GUARDS_VALUES, names,
                                    "# Message guards (docs/operations.md#message-guards)")
    for name in names:
        key = name.removeprefix("WSGATE_").lower()
        got, want = printed[key], env[name]
        if key == "message_rate_action":
            assert got == want, (key, got, want)
        else:
            assert float(got) == float(want), (key, got, want)
    assert_effective(res, env)


# docs/operations.md#access-log and §7 (issue 14): the access log switch and the automatic ready_high_watermark, as the
# chart renders them, and what the binary makes of them (its low watermark defaults to 0.1 below
# the high one, so the automatic 0.9 gives 0.8; off gives no watermarks at all, printed as 0).
SESSION_CASES = {
    "capped: watermark automatic": ({"maxClients": 1500}, {"access_log": True, "ready_high_watermark": 0.9,
                                                          "ready_low_watermark": 0.8}),
    "capped, access log off": ({"maxClients": 1500, "accessLog": False}, {"access_log": False,
                                                                          "ready_high_watermark": 0.9}),
    "capped, watermark explicitly off": ({"maxClients": 1500, "readyHighWatermark": 0}, {
        "ready_high_watermark": 0, "ready_low_watermark": 0}),
    "capped, explicit watermarks": ({"maxClients": 1500, "readyHighWatermark": 0.95, "readyLowWatermark": 0.85}, {
        "ready_high_watermark": 0.95, "ready_low_watermark": 0.85}),
    "uncapped: watermark off": ({}, {"access_log": True, "ready_high_watermark": 0}),
}


@pytest.mark.parametrize("case", list(SESSION_CASES))
def test_binary_takes_the_access_log_and_watermark_the_chart_renders(render, case):
    import tomllib

    values, want = SESSION_CASES[case]
    env = env_of(wsgate_container(render(values).one("Deployment"))[0])
    res = check_config(env)
    assert res.returncode == 0, f"exit {res.returncode}\n--- env\n{env}\n--- stderr\n{res.stderr}"
    printed = tomllib.loads(res.stdout)
    for key, value in want.items():
        assert key in printed, f"check-config printed no {key}: {res.stdout}"
        if isinstance(value, bool):
            assert printed[key] is value, (key, printed[key])
        else:
            assert abs(float(printed[key]) - value) < 1e-9, (key, printed[key], value)
    assert_effective(res, env)


# The handshake policy and the signals to clients (docs/configuration.md: allowed_origins, require_origin,
# subprotocols, require_subprotocol, refusal_mode, max_close_refusals, ping_interval, pong_timeout,
# send_timeout), as the chart renders them with every value set, and as the plain manifests show them
# (commented out) once uncommented. The lists are one comma-separated value each.
HANDSHAKE_CASES = ["chart-every-value", "native-manifest-uncommented"]


@pytest.mark.parametrize("case", HANDSHAKE_CASES)
def test_binary_accepts_the_handshake_and_client_signal_env(render, case):
    """`wsgate check-config` accepts the variables and prints the values the chart (or the manifest)
    asked for: the lists as lists, in order; with them the rest of the environment is accepted too.
    Fails with `unknown key allowed_origins` (exit 2) while the binary does not have these keys."""
    from conftest import HANDSHAKE_ENV, HANDSHAKE_VALUES

    names = [name for name, _ in HANDSHAKE_ENV.values()]
    env, printed, res = printed_for(render, case, HANDSHAKE_VALUES, names,
                                    "# Handshake policy and signals to clients")
    for name in names:
        key = name.removeprefix("WSGATE_").lower()
        got, want = printed[key], env[name]
        if key in ("allowed_origins", "subprotocols"):
            assert got == want.split(","), (key, got, want)
        elif key in ("require_origin", "require_subprotocol"):
            assert got is (want == "true"), (key, got, want)
        elif key == "max_close_refusals":
            assert int(got) == int(want), (key, got, want)
        elif key == "refusal_mode":
            assert got == want, (key, got, want)
        else:
            assert seconds(str(got)) == seconds(want), (key, got, want)
    assert_effective(res, env)


def test_binary_accepts_the_jwt_subprotocol_config(render, tmp_path):
    """jwt_from = "subprotocol" and a jwt_subprotocol_prefix of its own, as the chart renders them into
    config.toml, are loaded by `wsgate check-config --config` and printed back as given. Fails while
    the binary does not know jwt_subprotocol_prefix or the subprotocol source."""
    import tomllib

    from test_helm_handshake import VARIANTS

    r = render(VARIANTS["jwt-in-subprotocol"])
    config = tmp_path / "config.toml"
    config.write_text(r.config_toml())
    fixture = ROOT / "tests" / "fixtures" / "jwt" / "jwks.json"
    if fixture.is_file():
        jwks = fixture
    else:
        jwks = tmp_path / "jwks.json"
        jwks.write_text(TINY_JWKS)
    env = {k: v for k, v in env_of(wsgate_container(r.one("Deployment"))[0]).items() if k != "WSGATE_CONFIG"}
    env["WSGATE_JWT_JWKS_FILE"] = str(jwks)
    if not WSGATE_BIN.exists():
        pytest.skip(f"wsgate binary not built at {WSGATE_BIN}")
    res = subprocess.run([str(WSGATE_BIN), "check-config", "--config", str(config)],
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"exit {res.returncode}\n--- config.toml\n{config.read_text()}\n--- stderr\n{res.stderr}"
    printed = tomllib.loads(res.stdout)
    assert printed["jwt_from"] == "subprotocol", res.stdout
    assert printed.get("jwt_subprotocol_prefix") == "chat.token.", res.stdout
    assert printed["subprotocols"] == ["chat.v2"], res.stdout
