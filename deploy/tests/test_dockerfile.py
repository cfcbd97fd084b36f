"""deploy/Dockerfile and .dockerignore, checked statically (CI cannot pull base images to build it)."""

from __future__ import annotations

import json
import re

from conftest import DEPLOY, ROOT


def instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_with_an_empty_runtime_image():
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert froms[-1].split()[0] in ("scratch",) or "distroless" in froms[-1]
    copies = [rest for word, rest in instructions() if word == "COPY"]
    assert any(c.startswith("--from=build") for c in copies)


def test_runtime_runs_as_numeric_non_root_user_without_a_shell():
    ins = instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    runtime = ins[last_from:]
    users = [rest for w, rest in runtime if w == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), users
    assert not [w for w, _ in runtime if w == "RUN"], "no RUN in the runtime stage: it has no shell"
    (entry,) = [rest for w, rest in runtime if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["/wsgate"], "exec form, no shell"


def test_exposes_both_ports():
    exposed = " ".join(rest for w, rest in instructions() if w == "EXPOSE").split()
    assert {"8080", "9090"} <= set(exposed)


def test_dockerignore_keeps_the_context_small_but_buildable():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "target/" in lines and ".git/" in lines
    for needed in ("src", "Cargo.toml", "Cargo.lock"):
        assert needed not in lines and f"{needed}/" not in lines
