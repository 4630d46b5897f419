#!/usr/bin/env bash
# Re-record the traces in traces/ (deterministic captures), one per
# traces/NAME.trace, with their console logs; then run
# `pytest --update-golden` and check what changed, on purpose.
# Usage: scripts/record-traces.sh [NAME...]   (default: every recorded trace)
# A scenario's vCPU count is its own (scenarios/NAME/vcpus, read by the
# capture): smp-fork is recorded with 2, the others with 1.
# The ground-truth files (NAME.truth.json.gz) are kept unless KEEP_TRUTH=0:
# the pause at `stop` that takes them is not deterministic.
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for t in traces/*.trace; do names+=("$(basename "$t" .trace)"); done
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in "${names[@]}"; do
    echo "== $n"
    .venv/bin/shadowtrace capture --scenario "$n" --deterministic --out "$tmp/$n.trace" >/dev/null
    mv "$tmp/$n.trace" "traces/$n.trace"
    mv "$tmp/$n.console.log" "traces/$n.console.log"
    if [ "${KEEP_TRUTH:-1}" = 0 ]; then mv "$tmp/$n.truth.json.gz" "traces/$n.truth.json.gz"; fi
done
