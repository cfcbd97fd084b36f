"""Releases: the version in one place (Cargo.toml) and the chart's image reference that follows it,
image.digest, LICENSE, CHANGELOG.md, the chart's home, and .github/workflows/release.yml (actionlint,
its structure, and its version gate run for real)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import CHART, KUBE_DIR, ROOT, assert_schema_refuses, load_yaml_docs, parent_chart, wsgate_container

VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
REPOSITORY = "ghcr.io/wsgate/wsgate"
PROJECT = "https://github.com/wsgate/wsgate"
WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"
VENV_BIN = Path(sys.executable).parent
DIGEST = "sha256:" + "0123456789abcdef" * 4


def chart_yaml() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def image_of(rendered) -> str:
    return wsgate_container(rendered.one("Deployment"))[0]["image"]


# ---------------------------------------------------------------- one version

def test_the_charts_app_version_is_cargos_and_the_image_uses_it(chart, render):
    assert chart_yaml()["appVersion"] == VERSION == chart.metadata["appVersion"]
    assert chart.values["image"]["repository"] == REPOSITORY
    assert chart.values["image"]["tag"] == "" and chart.values["image"]["digest"] == "", "no second copy"
    r = render()
    assert image_of(r) == f"{REPOSITORY}:{VERSION}"
    assert r.one("Deployment")["metadata"]["labels"]["app.kubernetes.io/version"] == VERSION
    # The chart's own version is SemVer, moved on its own (deploy/README.md#releasing).
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart_yaml()["version"])


def test_an_explicit_tag_wins_over_app_version(render):
    r = render({"image": {"tag": "0.9.1-rc.1"}})
    assert image_of(r) == f"{REPOSITORY}:0.9.1-rc.1"
    assert r.one("Deployment")["metadata"]["labels"]["app.kubernetes.io/version"] == "0.9.1-rc.1"


def test_the_plain_manifests_name_cargos_version():
    images = [c["image"] for path in sorted(KUBE_DIR.glob("*.yaml")) for doc in load_yaml_docs(path.read_text())
              if doc.get("kind") == "Deployment"
              for c in doc["spec"]["template"]["spec"].get("containers", []) + doc["spec"]["template"]["spec"]
              .get("initContainers", []) if c["image"].startswith(REPOSITORY)]
    assert len(images) >= 2 and set(images) == {f"{REPOSITORY}:{VERSION}"}, images


# ---------------------------------------------------------------- image.digest

def test_a_digest_replaces_the_tag(render):
    assert image_of(render({"image": {"digest": DIGEST}})) == f"{REPOSITORY}@{DIGEST}"
    assert image_of(render({"image": {"digest": DIGEST, "tag": "1.2.3"}})) == f"{REPOSITORY}@{DIGEST}"
    assert image_of(render({"image": {"repository": "registry.example.com/wsgate", "digest": DIGEST}})) \
        == f"registry.example.com/wsgate@{DIGEST}"


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "A" * 64, "sha512:" + "a" * 64, "a" * 64,
                                    "sha256:" + "a" * 65, f"{DIGEST}\n"])
def test_the_schema_refuses_a_malformed_digest(helm, chart, render, digest):
    assert_schema_refuses(helm, chart, render, f"image.digest={digest!r}", {"image": {"digest": digest}})


def test_included_from_another_chart_the_tag_comes_from_its_chart(helm, tmp_path):
    def image(parent: Path) -> str:
        with helm.Chart.load(str(parent)) as c:
            out = c.render({}, name="myapp", namespace="prod", is_install=True)
        docs = [d for n, t in out.items() if not n.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        return wsgate_container(dep)[0]["image"]

    off = {"deployment": {"enabled": False}, "service": {"enabled": False}}
    # The README's include passes the subchart's Chart: its appVersion is the tag.
    assert image(parent_chart(tmp_path / "a", off)) == f"{REPOSITORY}:{VERSION}"
    # Values alone: a tag or a digest is needed, and the render says so when neither is there.
    values_only = '(dict "Values" .Values.wsgate)'
    assert image(parent_chart(tmp_path / "b", {**off, "image": {"tag": "7.0.0"}}, container_context=values_only)) \
        == f"{REPOSITORY}:7.0.0"
    assert image(parent_chart(tmp_path / "c", {**off, "image": {"digest": DIGEST}}, container_context=values_only)) \
        == f"{REPOSITORY}@{DIGEST}"
    with pytest.raises(helm.HelmRenderError, match=r"image.tag is empty and wsgate.container was included without"):
        image(parent_chart(tmp_path / "d", off, container_context=values_only))


# ---------------------------------------------------------------- LICENSE, CHANGELOG, Chart.yaml

def test_license_is_the_apache_2_text_cargo_names():
    assert tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS",
                    "APPENDIX: How to apply the Apache License to your work."):
        assert section in text, section
    assert len(text) > 11000


def test_changelog_has_an_entry_for_cargos_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "https://keepachangelog.com/en/1.1.0/" in text and "https://semver.org/spec/v2.0.0.html" in text
    headings = re.findall(r"^## \[([^\]]+)\] - (\S+)$", text, re.M)
    assert headings and headings[0][0] == VERSION, headings
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}|Unreleased", headings[0][1]), headings[0]
    entry = text.split(f"## [{VERSION}]", 1)[1].split("\n## ", 1)[0]
    assert "### Added" in entry or "### Changed" in entry or "### Fixed" in entry, entry
    assert f"[{VERSION}]: {PROJECT}/releases/tag/v{VERSION}" in text


def test_the_chart_points_at_the_project():
    meta = chart_yaml()
    assert meta["home"] == PROJECT and PROJECT in meta["sources"]
    assert "example.invalid" not in (CHART / "Chart.yaml").read_text()


# ---------------------------------------------------------------- the release workflow

def workflow() -> dict:
    return yaml.safe_load(RELEASE.read_text())


def actionlint(*paths: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "actionlint"), "-no-color", "-shellcheck", str(VENV_BIN / "shellcheck"),
                           "-pyflakes=", *paths], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_actionlint_is_clean_on_every_workflow(tmp_path):
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert RELEASE in files
    out = actionlint(*map(str, files))
    print(subprocess.run([str(VENV_BIN / "actionlint"), "-version"], capture_output=True, text=True).stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    # The same actionlint (and its shellcheck) does flag a faulty workflow.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.event.head_commit.message }} $undefined_thing\n"
                   "      - uses: actions/checkout@v4\n        with:\n          no-such-input: 1\n")
    out = actionlint(str(bad), cwd=tmp_path)
    assert out.returncode != 0 and "no-such-input" in out.stdout and "shellcheck" in out.stdout, out.stdout


def test_release_runs_on_version_tags_with_minimal_permissions_and_pinned_actions():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    assert wf["permissions"] == {}, "nothing at the top; each job asks for what it uses"
    allowed = {"version": {"contents": "read"}, "image": {"contents": "read", "packages": "write"},
               "chart": {"contents": "read", "packages": "write"}, "release": {"contents": "write"}}
    assert {name: job["permissions"] for name, job in wf["jobs"].items()} == allowed
    text = RELEASE.read_text()
    uses = re.findall(r"uses: (\S+)(.*)", text)
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), f"{action} is not pinned by commit"
        assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), f"{action}: say the version it is"


def test_release_builds_both_architectures_pushes_with_digest_chart_and_release():
    wf = workflow()
    jobs = wf["jobs"]
    runs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in jobs.items()}
    assert wf["env"]["IMAGE"] == REPOSITORY and wf["env"]["CHART_REPOSITORY"] == "oci://ghcr.io/wsgate/charts"
    assert runs["image"].count("--platform linux/amd64,linux/arm64") == 2
    assert "-f deploy/Dockerfile" in runs["image"] and "--push" in runs["image"]
    assert "--target rootfs --output type=local" in runs["image"], "the binaries are the image's own"
    assert jobs["image"]["outputs"]["digest"] == "${{ steps.push.outputs.digest }}"
    assert 'helm push dist/wsgate-*.tgz "$CHART_REPOSITORY"' in runs["chart"]
    assert "helm package deploy/helm/wsgate" in runs["chart"]
    assert "cargo cyclonedx --format json" in runs["release"] and "sha256sum" in runs["release"]
    assert "$IMAGE@$DIGEST" in runs["release"], "the digest is in the release notes"
    assert 'gh release create "$TAG"' in runs["release"]
    assert jobs["release"]["env"]["DIGEST"] == "${{ needs.image.outputs.digest }}"


@pytest.fixture
def version_gate(tmp_path):
    """The `version` job's check, run for real in a copy of the files it reads."""
    (step,) = [s for s in workflow()["jobs"]["version"]["steps"] if s.get("id") == "check"]
    work = tmp_path / "repo"
    (work / "deploy/helm/wsgate").mkdir(parents=True)
    shutil.copy(ROOT / "Cargo.toml", work / "Cargo.toml")
    shutil.copy(CHART / "Chart.yaml", work / "deploy/helm/wsgate/Chart.yaml")
    changelog = (ROOT / "CHANGELOG.md").read_text()

    def run(tag: str, dated: bool = True) -> subprocess.CompletedProcess[str]:
        text = re.sub(rf"^## \[{re.escape(VERSION)}\] - \S+$", f"## [{VERSION}] - 2030-01-31" if dated
                      else f"## [{VERSION}] - Unreleased", changelog, flags=re.M)
        (work / "CHANGELOG.md").write_text(text)
        output = tmp_path / "github_output"
        output.write_text("")
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=work, capture_output=True, text=True,
                             env={**os.environ, "TAG": tag, "GITHUB_OUTPUT": str(output)}, timeout=30)
        out.stdout += output.read_text()
        return out

    return run


def test_the_release_notes_are_the_changelog_entry():
    (line,) = [l.strip() for l in RELEASE.read_text().splitlines() if l.strip().startswith("awk ")]
    out = subprocess.run(["bash", "-eo", "pipefail", "-c", line], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "VERSION": VERSION}, timeout=30, check=True).stdout
    entry = (ROOT / "CHANGELOG.md").read_text().split(f"## [{VERSION}]", 1)[1].split("\n", 1)[1]
    assert "### Added" in out and out.strip() and out.strip() in entry, out
    assert "## [" not in out and "]: https://" not in out, out


def test_the_version_gate_passes_the_right_tag_only(version_gate):
    ok = version_gate(f"v{VERSION}")
    assert ok.returncode == 0 and f"version={VERSION}" in ok.stdout, ok
    wrong = version_gate("v99.0.0")
    assert wrong.returncode != 0 and f"is not v{VERSION}" in wrong.stdout, wrong
    undated = version_gate(f"v{VERSION}", dated=False)
    assert undated.returncode != 0 and "CHANGELOG.md has no dated entry" in undated.stdout, undated
