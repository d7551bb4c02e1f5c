# Sourced by the bundle's scripts (written by `cargo xtask bundle`): puts NVRTC on LD_LIBRARY_PATH
# from the machine's CUDA toolkit, or a pip wheel's copy, wherever it is. ARFUSE_NO_NVRTC_SEARCH
# set skips the search (LD_LIBRARY_PATH is then the caller's).
if [ -z "${ARFUSE_NO_NVRTC_SEARCH:-}" ]; then
  nvrtc=$(find / -name 'libnvrtc.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)
  if [ -n "$nvrtc" ]; then export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"; fi
fi
