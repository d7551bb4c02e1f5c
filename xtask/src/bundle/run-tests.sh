#!/usr/bin/env bash
# Runs the bundled test binaries on a machine without a Rust toolchain (written by `cargo xtask bundle`).
#
#   ./run-tests.sh                      every test binary in this folder
#   TESTS="arfuse-kernels-gpu arfuse-fusion-gpu" ./run-tests.sh --test-threads=1 cuda::    some, with arguments for each
#
# ARFUSE_REQUIRE_BACKENDS=cuda (or hip, nccl) turns a skipped GPU test into a failure.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "date: $(date -u +%FT%TZ)"
fail=0
for t in ${TESTS:-$(cat tests.txt)}; do
  echo "== $t"
  ./"$t" "$@" || { echo "FAILED: $t"; fail=1; }
done
exit $fail
