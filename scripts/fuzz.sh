#!/usr/bin/env bash
# Fuzzes agentgate's parsers with libFuzzer (cargo fuzz): scripts/fuzz.sh TARGET|all [SECONDS]
#
#   scripts/fuzz.sh token 600     one target for ten minutes
#   scripts/fuzz.sh all 600       every target, ten minutes each, one after the other
#   scripts/fuzz.sh list          the targets
#
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz
# (cargo install cargo-fuzz); both are installed here when missing. New inputs that reach new
# code are added to fuzz/corpus/<target>/ (commit them after `cargo fuzz cmin`); a failing
# input is written to fuzz/artifacts/<target>/: copy it into fuzz/regressions/<target>/ and
# fix the code, so `cargo test -p agentgate-fuzz` keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-}
seconds=${2:-600}
if [[ -z $target ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=$(cargo +nightly fuzz list --fuzz-dir fuzz)
if [[ $target == list ]]; then
  echo "$targets"
  exit 0
fi
if [[ $target == all ]]; then
  run=$targets
elif grep -qx "$target" <<<"$targets"; then
  run=$target
else
  echo "no fuzz target $target; the targets are:" >&2
  echo "$targets" >&2
  exit 2
fi
# One process per target; each stops after $seconds, or at the first failure (exit != 0).
# -rss_limit_mb: the gateway bounds what it buffers, so a run that needs more is a finding.
for t in $run; do
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzzing $t for ${seconds}s"
  cargo +nightly fuzz run --fuzz-dir fuzz --features libfuzzer "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1
done
