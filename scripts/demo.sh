#!/usr/bin/env bash
# The main job: installs what it needs, starts the real local environment (etcd +
# kube-apiserver, PostgreSQL, sshd on loopback), installs agentgate's CRDs, applies the
# quickstart examples, shows them served and validated, and stops everything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests/env/install.sh all
cargo run -q --locked -p agentgate-testenv --bin agentgate-env -- demo
