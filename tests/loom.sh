#!/usr/bin/env bash
# Model-checks src/admission.rs with loom: builds tests/loom_admission.rs with
# `--cfg loom` for that crate only (the library and tokio build as usual), then
# runs it. Takes well under 2 minutes on 2 cores once dependencies are built.
# Usage: bash tests/loom.sh [extra test-harness args, e.g. a test name]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
exe=$(cargo rustc --locked --quiet --test loom_admission --message-format=json -- --cfg loom -C opt-level=2 \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "loom_admission":
        print(m["executable"])')
[ -n "$exe" ] || { echo "loom.sh: no test executable built" >&2; exit 1; }
"$exe" --test-threads=1 --nocapture "$@"
echo "loom.sh: done in $(( $(date +%s) - start ))s"
