#!/usr/bin/env bash
# Every benchmark, one table: installs what they need, runs each bench (each measures its
# baseline in the same run, alternating rounds, and reports medians and spread), then prints
# the figures together. Takes about fifty minutes on 2 cores; the per-bench knobs
# (AGENTGATE_BENCH_*) are in each bench's header and in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

tests/env/install.sh all
report=$(mktemp --suffix=.jsonl)
export AGENTGATE_BENCH_REPORT="$report"
# The streaming figure: 10 million masked rows (memory must stay flat as rows grow).
export AGENTGATE_BENCH_ROWS="${AGENTGATE_BENCH_ROWS:-10000000}"

# The load run: 200 connections for AGENTGATE_LOAD_SECONDS (ten minutes by default).
for bench in statement audit pgbench kube ssh load; do
  step "agentgate-sidecar: $bench"
  cargo bench --locked -p agentgate-sidecar --bench "$bench"
done
step "agentgate-operator: scale"
cargo bench --locked -p agentgate-operator --bench scale

step "all figures (ratios are against the baseline measured in the same run)"
cargo run -q --locked -p agentgate-testenv --bin agentgate-env -- bench-report "$report"
echo
echo "(raw figures: $report)"
