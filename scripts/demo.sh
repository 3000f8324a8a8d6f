#!/usr/bin/env bash
# The main job: installs what it needs, builds agentgate, starts the real local environment
# (etcd + kube-apiserver, PostgreSQL, sshd on loopback), installs agentgate with its Helm
# chart, runs a scripted agent through the sidecar against all three, shows what an auditor
# sees, and stops everything.
#
# scripts/demo.sh --kubeconfig ~/.kube/config --webhook-host 172.18.0.1
#   runs the same against your cluster instead of a local API server (cluster-admin; the
#   operator and the sidecar still run here, so the API server must reach this machine at
#   --webhook-host). What it creates there is removed at the end, except the CRDs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "install the environment's dependencies (cached in ~/.cache/agentgate)"
tests/env/install.sh all

step "build agentgate (operator, sidecar, CLI) and the environment"
cargo build --locked -p agentgate-operator -p agentgate-sidecar -p agentgate-cli -p agentgate-testenv

target_dir=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export AGENTGATE_BIN_DIR="$target_dir/debug"
exec "$AGENTGATE_BIN_DIR/agentgate-env" demo "$@"
