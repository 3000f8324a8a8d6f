#!/usr/bin/env bash
# Runs agentgate's checks and tests on a fresh machine: installs what they need first
# (Debian packages, Go-built etcd/kube-apiserver/kubectl/helm into a version-keyed cache),
# then rustfmt, clippy (-D warnings), the CRD freshness check and every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "install the test environment's dependencies"
tests/env/install.sh all

step "rustfmt"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "generated CRDs are up to date"
cargo run -q --locked -p agentgate-crds --features crdgen --bin crdgen -- --check

step "tests"
cargo test --workspace --locked
