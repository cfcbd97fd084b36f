"""An upstream on a Unix socket in the pod (docs/operations.md#unix-socket-upstream) in the Helm chart: `upstream: unix:/path`
passes through as WSGATE_UPSTREAM; `upstreamSocket.emptyDir` adds one emptyDir mounted at
`upstreamSocket.mountPath` in the app and the wsgate container (native and classic layouts, and
for a chart that includes wsgate.container); the render refuses an emptyDir that `upstream` does
not point into, and the schema a mount path that is not absolute.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from conftest import assert_schema_refuses, chart_readme_section, env_of, fenced, parent_chart, wsgate_container

SOCKET = {"upstream": "unix:/run/app/ws.sock", "upstreamSocket": {"emptyDir": True}}
VOLUME = "wsgate-upstream-socket"

# Variants rendered, linted and validated against the Kubernetes schemas (test_chart_variants.py).
VARIANTS: dict[str, dict[str, Any]] = {
    "emptydir-native": SOCKET,
    "emptydir-classic": {**SOCKET, "nativeSidecar": False},
    "emptydir-elsewhere": {"upstream": "unix:/var/run/chat/app.sock",
                           "upstreamSocket": {"emptyDir": True, "mountPath": "/var/run/chat"}},
    "unix-without-emptydir": {"upstream": "unix:/run/app/ws.sock"},
}


def pod_of(r) -> dict[str, Any]:
    return r.one("Deployment")["spec"]["template"]["spec"]


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", []) or []}


def app_of(pod: dict[str, Any]) -> dict[str, Any]:
    (app,) = [c for c in pod["containers"] if c["name"] == "app"]
    return app


@pytest.mark.parametrize("native", [True, False])
def test_the_emptydir_is_mounted_in_the_app_and_in_wsgate(render, native):
    r = render({**SOCKET, "nativeSidecar": native})
    pod = pod_of(r)
    assert [v for v in pod["volumes"] if v["name"] == VOLUME] == [{"name": VOLUME, "emptyDir": {}}]
    wsgate, is_native = wsgate_container(r.one("Deployment"))
    assert is_native == native
    assert mounts(wsgate)[VOLUME] == "/run/app"
    assert mounts(app_of(pod)) == {VOLUME: "/run/app"}
    # Read-write on both sides: the app creates the socket, wsgate's connect needs write permission.
    for c in (wsgate, app_of(pod)):
        assert not any(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == VOLUME)
    assert env_of(wsgate)["WSGATE_UPSTREAM"] == "unix:/run/app/ws.sock"


def test_another_mount_path(render):
    r = render(VARIANTS["emptydir-elsewhere"])
    pod = pod_of(r)
    assert mounts(wsgate_container(r.one("Deployment"))[0])[VOLUME] == "/var/run/chat"
    assert mounts(app_of(pod)) == {VOLUME: "/var/run/chat"}


def test_a_unix_upstream_alone_adds_no_volume(render):
    """Without emptyDir the socket's directory is the operator's business (a volume of their own)."""
    r = render(VARIANTS["unix-without-emptydir"])
    pod = pod_of(r)
    assert VOLUME not in {v["name"] for v in pod.get("volumes", []) or []}
    assert "volumeMounts" not in app_of(pod)
    assert env_of(wsgate_container(r.one("Deployment"))[0])["WSGATE_UPSTREAM"] == "unix:/run/app/ws.sock"


def test_defaults_render_no_socket_volume(render):
    r = render({})
    pod = pod_of(r)
    assert VOLUME not in {v["name"] for v in pod.get("volumes", []) or []}
    assert "volumeMounts" not in app_of(pod)
    assert VOLUME not in mounts(wsgate_container(r.one("Deployment"))[0])


@pytest.mark.parametrize("upstream", ["", "127.0.0.1:3000", "unix:/other/ws.sock", "unix:/run/app/",
                                      "unix:/run/app/sub/ws.sock", "unix:/run/application.sock"])
def test_an_emptydir_that_upstream_does_not_point_into_is_refused(helm, render, upstream):
    with pytest.raises(helm.HelmRenderError, match=r"upstreamSocket.emptyDir shares /run/app .*unix:/run/app/<file>"):
        render({"upstream": upstream, "upstreamSocket": {"emptyDir": True}})


@pytest.mark.parametrize("case,values", [
    ("relative mount path", {"upstreamSocket": {"emptyDir": True, "mountPath": "run/app"}}),
    ("mount path with a trailing slash", {"upstreamSocket": {"emptyDir": True, "mountPath": "/run/app/"}}),
    ("root as the mount path", {"upstreamSocket": {"emptyDir": True, "mountPath": "/"}}),
    ("emptyDir not a boolean", {"upstreamSocket": {"emptyDir": "yes"}}),
    ("unknown key", {"upstreamSocket": {"medium": "Memory"}}),
])
def test_schema_refuses_bad_values(helm, chart, render, case, values):
    assert_schema_refuses(helm, chart, render, case, {**values, "upstream": "unix:/run/app/ws.sock"})


def test_included_by_another_chart(helm, tmp_path):
    """A parent chart declares wsgate.volumes (the chart README says so) and gets the mount on the
    wsgate container; it mounts the volume into its own app container itself."""
    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    parent = parent_chart(tmp_path, {**off, **SOCKET}, with_volumes=True)
    with helm.Chart.load(str(parent)) as c:
        out = c.render({}, name="myapp", namespace="prod")
    docs = [d for name, text in out.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    wsgate, _ = wsgate_container(dep)
    assert mounts(wsgate)[VOLUME] == "/run/app"
    assert {"name": VOLUME, "emptyDir": {}} in dep["spec"]["template"]["spec"]["volumes"]
    report = helm.lint(str(parent), strict=True)
    assert report["errors"] == [], report


def test_readme_example_renders_as_it_says(render):
    section = chart_readme_section("Upstream over a Unix socket")
    values = yaml.safe_load(fenced(section, "yaml"))
    r = render(values)
    pod = pod_of(r)
    wsgate = wsgate_container(r.one("Deployment"))[0]
    assert env_of(wsgate)["WSGATE_UPSTREAM"] == "unix:/run/app/ws.sock"
    assert mounts(wsgate)[VOLUME] == mounts(app_of(pod))[VOLUME] == "/run/app"
    assert app_of(pod)["securityContext"] == {"runAsUser": 65532, "runAsGroup": 65532}
    for needle in ("write permission", "fsGroup", "502", 'wsgate_upstream_errors_total{kind="connect"}',
                   "client leg only", "wsgate.volumes"):
        assert needle in section, needle
