"""XLA:CPU's library kernels for dots (one XLA flag, set before JAX starts).

XLA:CPU (jaxlib 0.10-0.11) hands dots and other ops to the YNNPACK library by default. For the
book-keeping engine that is slow: each dense layer's per-example weight gradient is B small
contractions ([in, T] x [T, out] per example) instead of the one large product of a plain
backward pass, and with the default those ran at a fraction of the large product's speed.
`--xla_cpu_experimental_ynn_fusion_type=dot` restricts YNNPACK to dot fusions (ViT-Ti/16's
book-keeping step: 626 ops or fusions given to YNNPACK by default, 268 with the flag). Measured on
the 2-core CPU (benchmarks/README.md, "XLA:CPU dot kernels"), same process, ViT-Ti/16 at B=8:
book-keeping clipped sum 338-343 ms against 278-280 ms for plain `jax.grad` by default; 278-279 ms
against 280-287 ms with the flag. The GroupNorm CNN and nfnet_tiny steps did not change. The same
arithmetic runs either way (float32 results agree to rounding; tests/test_xla_cpu.py).

`dpft.cli` applies it for the commands that run models, before JAX is imported, when JAX will run
on the CPU, and prints the line `cpu_dot_flags` returns. It appends to XLA_FLAGS and never
overrides a YNNPACK setting already there. The flag is experimental: it is added only for the
jaxlib versions it was measured on (`MEASURED_JAXLIB`; XLA refuses to start with a flag it does
not know), and the line says when it was not. DPFT_XLA_CPU=default leaves XLA_FLAGS alone
(`tuned`, the default, adds the flag; any other value is an error).
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Mapping

OPT_OUT_ENV = "DPFT_XLA_CPU"
FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"
FLAG = f"{FLAG_NAME}=dot"
#: jaxlib (major, minor) versions whose XLA:CPU knows the flag and where it was measured.
MEASURED_JAXLIB = ((0, 10), (0, 11))


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def cpu_dot_flags(environ: Mapping[str, str], jaxlib_version: str | None) -> tuple[str | None, str]:
    """(the new XLA_FLAGS value, or None to leave it as it is; one line saying what and why).
    `environ`: the process environment (XLA_FLAGS, DPFT_XLA_CPU); `jaxlib_version`: the installed
    jaxlib's version string (None if not installed). Raises ValueError naming DPFT_XLA_CPU when it
    is set to neither `tuned` nor `default`."""
    choice = environ.get(OPT_OUT_ENV, "").strip().lower() or "tuned"
    if choice not in ("tuned", "default"):
        raise ValueError(f"{OPT_OUT_ENV}={environ[OPT_OUT_ENV]!r}: choose 'tuned' (the default: YNNPACK for dot "
                         f"fusions only, faster book-keeping on CPU) or 'default' (XLA's own choice)")
    if choice == "default":
        return None, f"XLA:CPU dots: XLA's default kernels ({OPT_OUT_ENV}=default)"
    current = environ.get("XLA_FLAGS", "")
    if FLAG_NAME in current:
        return None, f"XLA:CPU dots: XLA_FLAGS already sets {FLAG_NAME}; left as it is"
    version = _major_minor(jaxlib_version or "")
    if version not in MEASURED_JAXLIB:
        return None, (f"XLA:CPU dots: XLA's default kernels (jaxlib {jaxlib_version}: {FLAG} is only set for "
                      f"jaxlib {', '.join(f'{a}.{b}' for a, b in MEASURED_JAXLIB)})")
    return (f"{current} {FLAG}".strip(),
            f"XLA:CPU dots: YNNPACK for dot fusions only ({FLAG}: faster book-keeping; {OPT_OUT_ENV}=default to "
            f"turn off)")


def tune_cpu_dots(environ: dict | None = None) -> str:
    """Apply `cpu_dot_flags` to `environ` (default: os.environ) before JAX is imported; returns its line."""
    env = os.environ if environ is None else environ
    try:
        jaxlib = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        jaxlib = None
    flags, line = cpu_dot_flags(env, jaxlib)
    if flags is not None:
        env["XLA_FLAGS"] = flags
    return line
