#!/usr/bin/env bash
# `make bench`: the default suite, recorded as JSON under results/, then the report.
# As root it runs on the namespace testbed (about 25 minutes on 2 cores); otherwise a
# smaller suite on the embedded cluster, whose times say nothing about networks.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
B="chiba-admin bench"
mkdir -p results
if [ "$(id -u)" = 0 ]; then
    # staging, 8 nodes (2 towns x 4) at 20 Mb/s, mayors at 200 Mb/s; median of 3
    $B stage --where testbed --shape 2x4 --data random --sizes 64M --methods transit,chain --repeat 3
    # MPI_Bcast takes minutes a run here (see the report): one run
    $B stage --where testbed --shape 2x4 --data random --sizes 64M --methods bcast --repeat 1
    $B stage --where testbed --shape 2x4 --data tree --sizes 64M --repeat 1
    # 32 nodes (4 towns x 8)
    $B stage --where testbed --shape 4x8 --data random --sizes 64M --methods transit,chain --repeat 1
    # synchronisation: 3,000 files / 150 MB to 4 and 8 mayors, full / 5% changed / unchanged
    $B sync --where testbed --targets 4,8 --repeat 3
    # 64 targets (8 mayors + 56 nodes, 65 ranks on 2 cores): do both complete?
    $B sync --where testbed --targets 64 --repeat 1 --repo-files 300 --repo-size 15M
else
    $B all --where embedded --shape 2x4 --sizes 16M --repeat 3 --targets 2 \
        --repo-files 1000 --repo-size 30M
fi
python benchmarks/bench_inventory.py --out results/inventory.json
# per-rank peak memory staging 1 GiB with 4 MiB chunks (embedded cluster)
python benchmarks/bench_stage.py --where embedded --algorithms chain --repeat 1 --size 1M \
    --memory 1G --out results/stage-memory.json
chiba-admin report results --plot results/figures
chiba-admin report results --markdown > results/report.md
echo "report: results/report.md, figures: results/figures/"
