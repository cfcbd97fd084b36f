"""deploy/Dockerfile, .dockerignore and deploy/image/, checked statically, and hadolint on every
Dockerfile and Containerfile of the repository. test_image.py builds the runtime stage with podman
and runs it; the full multi-stage build needs base images this machine cannot pull, and is built by
the release workflow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions (its FROM first), by stage name, in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(--platform=\S+ )?(\S+) AS (\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = out.setdefault(m.group(3), [])
        if current is not None:
            current.append((word, rest))
    return out


def test_build_rootfs_runtime_stages_with_an_empty_runtime_image():
    s = stages()
    assert list(s) == ["build", "rootfs", "runtime"]
    # build: on the build machine's platform, cross-compiling for TARGETARCH with rootfs.sh.
    assert s["build"][0][1].startswith("--platform=$BUILDPLATFORM ")
    assert ("ARG", "TARGETARCH") in s["build"]
    runs = " ".join(rest for w, rest in s["build"] if w == "RUN")
    assert 'deploy/image/rootfs.sh "$TARGETARCH" /rootfs' in runs
    assert 'deploy/image/rootfs.sh --debian-packages "$TARGETARCH"' in runs
    # RUN is plain sh: podman and buildah ignore SHELL when they write OCI images.
    assert not [w for w, _ in instructions() if w == "SHELL"]
    # rootfs: the files alone; runtime: scratch plus exactly those files.
    assert s["rootfs"] == [("FROM", "scratch AS rootfs"), ("COPY", "--from=build /rootfs/ /")]
    assert s["runtime"][0] == ("FROM", "scratch AS runtime")
    copies = [rest for w, rest in s["runtime"] if w == "COPY"]
    assert copies == ["--from=rootfs /wsgate /wsgate", "--from=rootfs /etc/passwd /etc/group /etc/",
                      "--from=rootfs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/"]


def test_runtime_runs_as_numeric_non_root_user_without_a_shell():
    runtime = stages()["runtime"]
    users = [rest for w, rest in runtime if w == "USER"]
    assert users == ["65532:65532"]
    assert not [w for w, _ in runtime if w == "RUN"], "no RUN in the runtime stage: it has no shell"
    (entry,) = [rest for w, rest in runtime if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["/wsgate"], "exec form, no shell"
    passwd = (DEPLOY / "image" / "etc" / "passwd").read_text().splitlines()
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin" in passwd
    assert "nonroot:x:65532:" in (DEPLOY / "image" / "etc" / "group").read_text().splitlines()


def test_exposes_both_ports_and_sets_the_listen_defaults():
    runtime = stages()["runtime"]
    exposed = " ".join(rest for w, rest in runtime if w == "EXPOSE").split()
    assert set(exposed) == {"8080", "9090"}
    env = " ".join(rest for w, rest in runtime if w == "ENV").split()
    assert env == ["WSGATE_LISTEN=0.0.0.0:8080", "WSGATE_ADMIN_LISTEN=0.0.0.0:9090"]


def test_the_comment_says_what_the_image_holds():
    text = DOCKERFILE.read_text()
    assert "no TLS" not in text and "no C dependencies" not in text
    for needed in ("ring", "rediss://", "ca-certificates", "65532", "build-local.sh"):
        assert needed in text, needed


def test_the_local_build_takes_the_runtime_stage_verbatim():
    """build-local.sh builds the text from `FROM scratch AS runtime` to the end, unchanged."""
    script = (DEPLOY / "image" / "build-local.sh").read_text()
    assert "sed -n '/^FROM scratch AS runtime$/,$p' deploy/Dockerfile" in script
    assert '--build-context "rootfs=' in script and "--network=none" in script
    text = DOCKERFILE.read_text()
    assert text.count("\nFROM scratch AS runtime\n") == 1
    assert "\nFROM " not in text.split("\nFROM scratch AS runtime\n", 1)[1], "runtime is the last stage"


def test_rootfs_sh_names_the_compilers_for_each_architecture():
    def packages(arch: str) -> list[str]:
        return subprocess.run(["bash", str(DEPLOY / "image" / "rootfs.sh"), "--debian-packages", arch],
                              capture_output=True, text=True, check=True).stdout.split()

    host = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    cross = {"amd64": ["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
             "arm64": ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"]}
    for arch in cross:
        assert packages(arch) == (["musl-tools"] if arch == host else cross[arch]) + ["ca-certificates"]
    bad = subprocess.run(["bash", str(DEPLOY / "image" / "rootfs.sh"), "--debian-packages", "s390x"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr


def test_dockerignore_keeps_the_context_small_but_buildable():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "target/" in lines and ".git/" in lines
    for needed in ("src", "Cargo.toml", "Cargo.lock"):
        assert needed not in lines and f"{needed}/" not in lines
    # deploy/ is left out except deploy/image/ (rootfs.sh, passwd, group), re-included after it.
    assert lines.index("!deploy/image/") > lines.index("deploy/")


def container_files() -> list[Path]:
    skip = {".git", "target", "node_modules"}
    return sorted(p for p in ROOT.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                  and re.fullmatch(r"(Dockerfile|Containerfile)(\..+)?|.+\.(Dockerfile|Containerfile)", p.name))


def test_hadolint_is_clean_on_every_dockerfile():
    files = container_files()
    assert DOCKERFILE in files, files
    out = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    version = subprocess.run([str(VENV_BIN / "hadolint"), "--version"], capture_output=True, text=True).stdout
    print(version.strip(), [str(f.relative_to(ROOT)) for f in files])
    assert out.returncode == 0, out.stdout + out.stderr
    # The same hadolint does flag a Dockerfile with faults (a shell-form ENTRYPOINT, an untagged base).
    faulty = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", "-"], input="FROM debian\nENTRYPOINT /x\n",
                            capture_output=True, text=True, timeout=60)
    assert faulty.returncode != 0 and "DL3006" in faulty.stdout and "DL3025" in faulty.stdout, faulty.stdout
