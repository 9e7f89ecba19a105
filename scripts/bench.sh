#!/usr/bin/env bash
# `make bench` (suite `default`) and `make bench-quick` (suite `quick`): run a named suite,
# record every run as JSON under results/, then report those records (tables, Markdown,
# figures). As root the suites run on the namespace testbed (default: about 50 minutes on
# 2 cores; quick: about 7); otherwise on the embedded cluster, whose times say nothing about
# networks. `chiba-admin bench SUITE --dry-run` prints a suite's plan.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
suite="${1:-default}"
mkdir -p results
# --json prints the record files written; progress goes to stderr
mapfile -t recs < <(chiba-admin --json bench "$suite" --out results |
    python -c 'import json, sys; print("\n".join(json.load(sys.stdin)["records"]))')
chiba-admin report "${recs[@]}" --plot results/figures
chiba-admin report "${recs[@]}" --markdown > "results/report-$suite.md"
echo "report: results/report-$suite.md, figures: results/figures/ (all of results/: chiba-admin report)"
