#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain (the same sanitizer-coverage passes
# cargo-fuzz uses; only AddressSanitizer would need nightly). Usage:
#   fuzz/run.sh [TARGET|all] [SECONDS]
# TARGET is one of the [[bin]] names in fuzz/Cargo.toml; `all` runs each in turn.
# Prints one summary line per target: runs, coverage (edges), features, corpus size.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-all}
secs=${2:-60}
targets=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^passthru-fuzz$')
if [ "$target" != all ]; then
  echo "$targets" | grep -qx "$target" || { echo "unknown target '$target'; one of: all" $targets >&2; exit 2; }
  targets=$target
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# The guest programs are not needed here; their build script still runs for vmm's
# dependencies, which is fine.
cargo build --release --locked --target x86_64-unknown-linux-gnu $(for t in $targets; do echo --bin "$t"; done)
status=0
for t in $targets; do
  mkdir -p "corpus/$t" artifacts
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log=$(mktemp)
  if "./target/x86_64-unknown-linux-gnu/release/$t" "corpus/$t" "${seeds[@]}" -max_total_time="$secs" -max_len=4096 \
       -timeout=30 -artifact_prefix="artifacts/$t-" -print_final_stats=1 >"$log" 2>&1; then
    r="ok"
  else
    r="FAILED"; status=1
    tail -40 "$log"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | tr -dc 0-9)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | tr -dc 0-9)
  corp=$(ls "corpus/$t" | wc -l)
  echo "fuzz $t: $r, ${secs}s, runs=${runs:-0} cov=${cov:-0} ft=${ft:-0} corpus=$corp"
  rm -f "$log"
done
exit $status
