"""The runtime's thread count and the sidecar's CPU (issue 15) on the deployment side: `workers`
rendered as WSGATE_WORKERS (1 by default, 0 and N passed through, anything else refused by the
schema), the binary accepting what the chart and the plain manifests set, and the default CPU
request and limit that docs/operations.md "Sizing" recommends (a 1-CPU limit: one runtime
thread uses at most one core) in the chart and in both plain manifests.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import KUBE_DIR, assert_schema_refuses, env_of, load_yaml_docs, wsgate_container
from test_binary_accepts_chart_env import check_config, effective


def container_of(r) -> dict[str, Any]:
    return wsgate_container(r.one("Deployment"))[0]


def test_workers_default_to_one_and_reach_their_variable(render, chart):
    assert chart.values["workers"] == 1
    default = container_of(render({}))
    assert env_of(default)["WSGATE_WORKERS"] == "1"
    for n in (0, 2, 256):
        assert env_of(container_of(render({"workers": n})))["WSGATE_WORKERS"] == str(n)


def test_null_workers_leave_the_binary_default(render):
    # `workers: null` in a values file deletes the key (Helm): no variable, the binary's 1.
    assert "WSGATE_WORKERS" not in env_of(container_of(render({"workers": None})))


@pytest.mark.parametrize("bad", [-1, 257, "two", 1.5])
def test_schema_refuses_a_bad_worker_count(helm, chart, render, bad):
    assert_schema_refuses(helm, chart, render, f"workers={bad!r}", {"workers": bad})


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_binary_takes_the_worker_count_the_chart_renders(render, workers):
    env = env_of(container_of(render({"workers": workers})))
    res = check_config(env)
    assert res.returncode == 0, res.stderr
    assert effective(res.stdout, "workers") == str(workers)


def test_default_cpu_is_a_request_and_a_one_cpu_limit(render):
    resources = container_of(render({}))["resources"]
    assert resources["requests"]["cpu"] == "100m"
    assert str(resources["limits"]["cpu"]) == "1"


@pytest.mark.parametrize("file", ["native-sidecar.yaml", "classic-sidecar.yaml"])
def test_plain_manifests_carry_one_worker_and_the_same_cpu(file):
    dep = next(o for o in load_yaml_docs((KUBE_DIR / file).read_text()) if o["kind"] == "Deployment")
    c = wsgate_container(dep)[0]
    assert env_of(c)["WSGATE_WORKERS"] == "1"
    assert c["resources"]["requests"]["cpu"] == "100m"
    assert str(c["resources"]["limits"]["cpu"]) == "1"
    res = check_config(env_of(c))
    assert res.returncode == 0, res.stderr
    assert effective(res.stdout, "workers") == "1"
