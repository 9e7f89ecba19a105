#!/usr/bin/env bash
# `make demo`: the main job on the embedded cluster (hosts are directories on this machine):
# stage a sample tree to every node both ways, sync a sample repository to the mayors both
# ways, and show what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
export CHIBA_STATE="${CHIBA_STATE:-$PWD/.demo-state}"
export CHIBA_CLUSTER="${CHIBA_CLUSTER:-$PWD/clusters/demo.toml}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
data="$CHIBA_STATE/home"

say "chiba-admin cluster init   (state: $CHIBA_STATE)"
chiba-admin cluster init

say "chiba-admin topology show"
chiba-admin topology show

say "sample data under $data"
rm -rf "$data"
python - "$data" <<'PY'
import sys
from pathlib import Path
from chiba_admin.bench.data import make_random, make_repository, make_text_tree
home = Path(sys.argv[1])
make_text_tree(home / "job42-input", 8 << 20, files=120)
make_random(home / "job42-input" / "weights", 4 << 20)
(home / "job42-input" / "odd name $(x) 'q'.txt").write_text("names survive\n")
make_repository(home / "repo", files=400, size=12 << 20)
print(f"job42-input: 12 MB in 122 files; repo: 400 files, 12 MB")
PY

say "chiba-admin stage job42-input --nodes @nodes            (MPI: one read, a chain down the towns)"
chiba-admin stage "$data/job42-input" --nodes @nodes

say "chiba-admin stage job42-input --nodes @nodes --method transit   (City Transit, the legacy way)"
chiba-admin stage "$data/job42-input" --nodes @nodes --method transit --dest job42-transit

say "every node has the same files: chiba-admin run -w @nodes -b -- ..."
chiba-admin run -w @nodes -b -- sh -c 'cd "$CHIBA_SCRATCH/job42-input" && find . -type f | sort | xargs -d "\n" cat | sha256sum'

say "chiba-admin sync-mayors repo --dest repo-mpi --delete     (mpisync)"
chiba-admin sync-mayors "$data/repo" --dest repo-mpi --delete

say "chiba-admin sync-mayors repo --method rsync --dest repo-rsync   (one rsync per mayor)"
chiba-admin sync-mayors "$data/repo" --method rsync --dest repo-rsync --delete

say "change 5% of the repository, then mpisync again: only the changes move"
python -c "import sys; from chiba_admin.bench.data import mutate_repository as m; print(m(sys.argv[1], 0.05, 7), 'bytes changed')" "$data/repo"
chiba-admin sync-mayors "$data/repo" --dest repo-mpi --delete

say "chiba-admin shell --pbs examples/pbs-job.sh   (MPISH: one MPI job runs the script; stage in, MPI program, collect)"
mpi_program=""
if [ -x .venv-mpich/bin/python ]; then  # an MPICH program wires up through the shell's PMI
    mpi_program="$PWD/.venv-mpich/bin/python $PWD/examples/allreduce.py"
fi
(cd "$data" && INPUT="$data/job42-input" MPI_PROGRAM="$mpi_program" \
    chiba-admin -q shell --pbs --nodes @nodes "$OLDPWD/examples/pbs-job.sh")

say "chiba-admin bench all --where embedded   (a small benchmark: both ways, timed, recorded)"
results="$CHIBA_STATE/results"
rm -rf "$results"
chiba-admin -q bench all --where embedded --shape 2x4 --sizes 4M --data random --repeat 1 \
    --targets 2 --repo-files 200 --repo-size 4M --out "$results"

say "chiba-admin report $results   (this demo's embedded runs)"
chiba-admin report "$results"

say "chiba-admin report --shipped   (the testbed comparison shipped in docs/results/)"
chiba-admin report --shipped || echo "(no records shipped in docs/results/ in this checkout)"

say "done: state in $CHIBA_STATE (remove it with rm -rf); try chiba-admin --help"
