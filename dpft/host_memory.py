"""Host-memory reuse for XLA:CPU programs (glibc malloc settings).

XLA:CPU takes each compiled program's temporary buffer (one block, tens of MiB for a small CNN,
GiBs for an NFNet) from `malloc` at every call and frees it at the end. glibc serves a request
above its mmap threshold with fresh pages from `mmap` and unmaps them at `free`; the threshold
adapts to freed blocks but never above 32 MiB. So a program whose temporary buffer is larger
than 32 MiB page-faults (the kernel zero-fills) every page of it at every step: on the
GroupNorm CNN of benchmarks/ the book-keeping step (32.03 MiB of temporaries) took 22 ms
against 13 ms with its memory reused, while the plain step (22 MiB) was not affected.

`keep_freed_host_memory()` makes glibc serve large requests from its heap and keep freed memory
there for the next step (`mallopt(M_MMAP_THRESHOLD, 1 GiB)`, `mallopt(M_TRIM_THRESHOLD, max)`),
from one arena (`mallopt(M_ARENA_MAX, 1)`: a thread arena's heap is at most 64 MiB and is
unmapped as soon as it is empty, so XLA's worker threads would page-fault their blocks anyway).
The process's resident memory then stays at its peak instead of being returned between steps,
as the caching allocators of other ML runtimes do; small allocations keep glibc's per-thread
caches. Measured on the 2-core CPU (benchmarks/README.md, "Host memory"): ViT-Ti/16 at B=4,
plain step 204 -> 182 ms; GroupNorm CNN at B=64, book-keeping step 22 -> 13-18 ms.

A thread that already holds an arena keeps it, so the call must come before JAX starts its
threads: made after JAX's first program had run, it left 73,000 faults per call in some
processes (the probe of tests/test_host_memory.py). So `dpft.cli` makes it for the commands that
run models, before importing JAX, when JAX will run on the CPU (`cpu_only_jax()`: JAX_PLATFORMS
names cpu first, or no accelerator plugin is installed), and prints the line it returns to
stderr; `cli.main()` called in a process that has already imported JAX leaves malloc alone.
Library users call it first thing themselves. Child processes can get the same settings from the
environment (`MALLOC_ENV`, read by glibc at start): the benchmarks give them to every worker.

DPFT_HOST_MALLOC=system leaves malloc as it is (`reuse`, the default, sets it; any other value is
an error). Other C libraries (musl, macOS) are left alone, and the line returned says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

OPT_OUT_ENV = "DPFT_HOST_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 30  # requests above 1 GiB still get their own mapping
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: never trim the heap's top
#: The same settings for a child process, read by glibc at its start (benchmarks give them to
#: every framework's worker alike, PyTorch's too).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
              "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES)}


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_host_memory() -> str:
    """Make glibc keep freed host memory for reuse (see the module docstring); returns one line
    saying what was set, or why nothing was (opted out, not glibc, or glibc refused a value).
    Raises ValueError naming DPFT_HOST_MALLOC when it is set to neither `reuse` nor `system`."""
    choice = os.environ.get(OPT_OUT_ENV, "").strip().lower() or "reuse"
    if choice not in ("reuse", "system"):
        raise ValueError(f"{OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]!r}: choose 'reuse' (the default: keep freed "
                         f"host memory for reuse on CPU) or 'system' (leave malloc as the system sets it)")
    if choice == "system":
        return f"host malloc: left as the system sets it ({OPT_OUT_ENV}=system)"
    libc = _glibc()
    if libc is None:
        return "host malloc: not glibc; left as it is"
    version = libc.gnu_get_libc_version().decode()
    refused = [name for name, option, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                                                ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                                                ("M_ARENA_MAX", M_ARENA_MAX, 1))
               if libc.mallopt(option, ctypes.c_int(value)) != 1]
    if refused:
        return (f"host malloc: glibc {version} refused {' and '.join(refused)}; XLA:CPU temporaries above 32 MiB "
                f"are page-faulted at every step")
    return (f"host malloc: glibc {version} keeps freed memory for reuse (mmap threshold "
            f"{MMAP_THRESHOLD_BYTES >> 20} MiB, no trimming; {OPT_OUT_ENV}=system to turn off)")


def cpu_only_jax() -> bool:
    """Whether JAX will run on the host CPU, decided without importing JAX: JAX_PLATFORMS names cpu
    first, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))

