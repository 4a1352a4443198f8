# Sourced by scripts/demo.sh, demo_guidance.sh and test.sh: the fastest CPU settings found
# (docs/benchmarks.md, "CPU: this project against the reference"). Defines two functions;
# the scripts call the ones they want.

# One simulated JAX device per core, the batch split over them: XLA:CPU runs each device's
# convolutions on one core, so one device leaves the other cores idle. Kept if XLA_FLAGS
# already sets a device count.
one_device_per_core() {
  if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$(nproc)"
  fi
}

# TCMalloc (Debian's libtcmalloc-minimal4) instead of glibc's malloc, when installed: with
# glibc, XLA's per-step buffers are page-faulted in again every step (2.2M against 0.5M minor
# faults in one 50 s benchmark), and the 2-device train step of the benchmark network ran
# 20-30% faster with TCMalloc. SCORE_SDE_MALLOC=system keeps glibc's; an LD_PRELOAD already
# set is kept.
use_tcmalloc() {
  if [ "${SCORE_SDE_MALLOC:-tcmalloc}" = tcmalloc ] && [ -z "${LD_PRELOAD:-}" ]; then
    local lib
    for lib in /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
      if [ -e "$lib" ]; then
        export LD_PRELOAD="$lib"
        return
      fi
    done
  fi
}
