"""Counting primitives in a function's jaxpr (tests use it to show which route a computation took)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _walk(jaxpr: Any, pred: Callable[[Any], bool]) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += int(pred(eqn))
        for v in eqn.params.values():  # inner jaxprs: jit, scan, custom_vjp bodies
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                inner = j if hasattr(j, "eqns") else getattr(j, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    n += _walk(inner, pred)
    return n


def low_precision_dots(fn: Callable, *args: Any) -> int:
    """How many dot_generals in fn's jaxpr (inner jaxprs included) take two bfloat16 operands and
    return float32 (tensor-core contractions with float32 accumulation)."""
    def pred(eqn: Any) -> bool:
        return (eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
                and eqn.outvars[0].aval.dtype == jnp.float32)
    return _walk(jax.make_jaxpr(fn)(*args).jaxpr, pred)


def float32_contractions(fn: Callable, *args: Any) -> tuple[int, int]:
    """(all, not at HIGHEST precision): the dot_generals and convolutions of fn's jaxpr (inner
    jaxprs included) with a float32 operand; a GPU may run those not at HIGHEST as TF32."""
    def f32(eqn: Any) -> bool:
        return (eqn.primitive.name in ("dot_general", "conv_general_dilated")
                and any(v.aval.dtype == jnp.float32 for v in eqn.invars))

    def not_highest(eqn: Any) -> bool:
        p = eqn.params.get("precision")
        return f32(eqn) and not (isinstance(p, tuple) and all(q == jax.lax.Precision.HIGHEST for q in p))
    closed = jax.make_jaxpr(fn)(*args).jaxpr
    return _walk(closed, f32), _walk(closed, not_highest)


def float32_convolutions(fn: Callable, *args: Any) -> int:
    """How many conv_general_dilated in fn's jaxpr (inner jaxprs included) take a float32 operand
    (on a GPU, at HIGHEST precision, such a convolution runs without tensor cores)."""
    def pred(eqn: Any) -> bool:
        return eqn.primitive.name == "conv_general_dilated" and any(v.aval.dtype == jnp.float32 for v in eqn.invars)
    return _walk(jax.make_jaxpr(fn)(*args).jaxpr, pred)


__all__ = ["low_precision_dots", "float32_contractions", "float32_convolutions"]
