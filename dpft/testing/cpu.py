"""Environments for the test suite's runs on fake CPU devices: device count, collective timeouts and
compile flags.

XLA:CPU gives a collective (an all-reduce over the fake devices of one process, or over gloo
between processes) 40 seconds for every participant to arrive and then aborts the process
(rc 134). On a loaded 2-core machine one device's share of a step can take longer than that, so
every run on several fake devices gets generous timeouts instead: a slow machine makes a test
slow, never kills it.
"""
from __future__ import annotations

import os
from typing import Mapping

#: Seconds XLA:CPU waits for all participants of a collective (default 40, then abort).
COLLECTIVE_TIMEOUT_S = 1800
COLLECTIVE_TIMEOUT_FLAGS = (f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S} "
                            f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}")
#: LLVM at -O0 for the suite's programs (XLA's own HLO passes, fusion and sharding included, are
#: unchanged; only the machine code is less optimised). The suite's programs are tiny, so compiling,
#: not running, is most of their time: measured on 2 cores, two NFNet engine-equality tests 70.5 ->
#: 45.3 s CPU, a cold 6-update `dpft train` 38.8 -> 27.8 s, a warm one 14.7 -> 12.8 s. Benchmarks never
#: use these flags (they do not import this module). Only for one-device processes: with -O0 an
#: in-process all-reduce of the SLURM test's `dpft train` (2 devices per task) never got its second
#: participant in 2 of 5 runs, and a CI run whose test process (8 devices) compiled at -O0 lost a
#: worker near its end (2026-12-07, benchmarks/README.md); every multi-device process compiles optimised.
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
#: Variables that would make a child process join a cluster or a test's fake store by accident.
CLUSTER_PREFIXES = ("DPFT_", "SLURM_", "TPU_", "JAX_COORDINATOR")


def xla_flags(devices: int, fast_compile: bool | None = None) -> str:
    """XLA_FLAGS for `devices` fake CPU devices with the collective timeouts above, and TEST_COMPILE_FLAGS
    where `fast_compile` (default: one device only)."""
    fast = devices == 1 if fast_compile is None else fast_compile
    return (f"--xla_force_host_platform_device_count={int(devices)} {COLLECTIVE_TIMEOUT_FLAGS}"
            + (f" {TEST_COMPILE_FLAGS}" if fast else ""))


def fast_compile_one_device_programs() -> None:
    """From now on this process compiles every program that runs on one device at LLVM -O0
    (TEST_COMPILE_FLAGS' setting, per program), and every program over several devices optimised.

    For the test process, whose 8 fake devices must compile optimised (see TEST_COMPILE_FLAGS) while
    most of its programs run on one device. XLA takes the level per compilation
    (`DebugOptions.xla_backend_optimization_level`), so this wraps the one function through which jax
    builds a program's compile options, `jax._src.compiler.get_compile_options`; the persistent
    compilation cache keys include these options, so -O0 and optimised executables never mix. Raises
    if jax no longer has that function (a jax upgrade must not silently make the suite slow).
    Imports jax: call it after XLA_FLAGS is set.
    """
    from jax._src import compiler  # the hook point: jax has no public per-program setting for this

    original = getattr(compiler, "get_compile_options", None)
    if original is None or not callable(original):
        raise RuntimeError("jax._src.compiler.get_compile_options is gone: update "
                           "dpft.testing.cpu.fast_compile_one_device_programs for this jax version")
    if getattr(original, "_dpft_fast_one_device", False):
        return

    def get_compile_options(num_replicas, num_partitions, *args, **kwargs):
        options = original(num_replicas, num_partitions, *args, **kwargs)
        if num_replicas * num_partitions == 1:
            options.executable_build_options.debug_options.xla_backend_optimization_level = 0
        return options

    get_compile_options._dpft_fast_one_device = True
    compiler.get_compile_options = get_compile_options


def subprocess_env(devices: int, base: Mapping[str, str] | None = None, *, fast_compile: bool | None = None,
                   **extra: str) -> dict[str, str]:
    """A child's environment: `base` (default os.environ) without cluster variables, on the CPU with
    `devices` fake devices (`xla_flags(devices, fast_compile)`), plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(CLUSTER_PREFIXES)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices, fast_compile), **extra)
    return env
