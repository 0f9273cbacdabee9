#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain (the same sanitizer-coverage passes
# cargo-fuzz uses; only AddressSanitizer would need nightly). Usage:
#   fuzz/run.sh [TARGET] [SECONDS]     TARGET: vfio_user_decode | pvdma_hypercall
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-vfio_user_decode}
secs=${2:-60}
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --target x86_64-unknown-linux-gnu --bin "$target"
mkdir -p "corpus/$target"
"./target/x86_64-unknown-linux-gnu/release/$target" "corpus/$target" -max_total_time="$secs" -max_len=4096
