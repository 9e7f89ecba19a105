#!/usr/bin/env bash
# `make demo`: the main job on the embedded cluster (hosts are directories on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export CHIBA_STATE="${CHIBA_STATE:-$PWD/.demo-state}"
export CHIBA_CLUSTER="${CHIBA_CLUSTER:-$PWD/clusters/demo.toml}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "chiba-admin cluster init   (state: $CHIBA_STATE)"
chiba-admin cluster init

say "chiba-admin topology show"
chiba-admin topology show

say "chiba-admin nodes @town2"
chiba-admin nodes -e @town2
