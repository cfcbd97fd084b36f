"""`helm template` through Helm's own engine (helm-python-sdk), for machines without the helm CLI.

    python deploy/tests/helm_template.py RELEASE CHART [-n NAMESPACE] [-f values.yaml]... \\
        [--api-versions group/version/Kind]...

Prints the manifests as `helm template` does (`---` and `# Source:` before each, NOTES.txt left
out), in the order of the template paths. run.sh's venv has the package:
$CARGO_TARGET_DIR/deploy-venv/bin/python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import deep_merge, render_manifests  # noqa: E402


def main(argv: list[str]) -> int:
    import helm_python

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("release")
    p.add_argument("chart")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("-f", "--values", action="append", default=[])
    p.add_argument("-a", "--api-versions", action="append", default=[])
    args = p.parse_args(argv)
    values: dict = {}
    for f in args.values:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    with helm_python.Chart.load(args.chart) as chart:
        out = render_manifests(chart, values, name=args.release, namespace=args.namespace,
                               api_versions=args.api_versions)
    for path in sorted(out):
        text = out[path].strip("\n")
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in text.split("\n---\n"):
            if doc.strip():
                print(f"---\n# Source: {path}\n{doc.strip(chr(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
