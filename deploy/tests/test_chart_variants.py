"""Every chart variant the feature tests render (limits per key, fleet limits, automatic rebalancing,
message guards, session telemetry, an upstream on a Unix socket, the handshake policy and signals to
clients):
`helm lint` reports nothing, and every object rendered passes the Kubernetes schemas.

The variants stay beside the feature they exercise (each module's `VARIANTS`); this one module
runs the two checks that apply to all of them alike.
"""

from __future__ import annotations

import pytest

import test_helm_fleet
import test_helm_handshake
import test_helm_key_limits
import test_helm_message_guards
import test_helm_rebalance
import test_helm_session_telemetry
import test_helm_upstream_socket
from conftest import assert_lint_clean
from test_kubernetes_schemas import validate_all

VARIANTS = {
    f"{module.__name__.removeprefix('test_helm_')}/{name}": values
    for module in (test_helm_key_limits, test_helm_fleet, test_helm_rebalance, test_helm_message_guards, test_helm_session_telemetry,
                   test_helm_upstream_socket, test_helm_handshake)
    for name, values in module.VARIANTS.items()
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lint_reports_no_errors_or_warnings(helm, name):
    assert_lint_clean(helm, VARIANTS[name])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rendered_objects_are_valid_kubernetes(render, name, tmp_path):
    validate_all(render(VARIANTS[name]).objects, tmp_path)
