#!/usr/bin/env bash
# Runs the bundled test binaries on a machine without a Rust toolchain (written by `cargo xtask bundle`).
#
#   ./run-tests.sh                      every test binary in this folder
#   TESTS="arfuse-kernels-gpu arfuse-fusion-gpu" ./run-tests.sh --test-threads=1 cuda::    some, with arguments for each
#
# ARFUSE_REQUIRE_BACKENDS=cuda (or hip, nccl) turns a skipped GPU test into a failure.
set -u
cd "$(dirname "$0")"
# NVRTC: the machine's CUDA toolkit, or a pip wheel's copy, wherever it is.
if [ -z "${ARFUSE_NO_NVRTC_SEARCH:-}" ]; then
  nvrtc=$(find / -name 'libnvrtc.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)
  if [ -n "$nvrtc" ]; then export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"; fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "date: $(date -u +%FT%TZ)"
fail=0
for t in ${TESTS:-$(cat tests.txt)}; do
  echo "== $t"
  ./"$t" "$@" || { echo "FAILED: $t"; fail=1; }
done
exit $fail
