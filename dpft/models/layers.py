"""Building blocks shared by the NFNet and WRN models (Flax NNX).

Numerics are the pure functions of `dpft.nn.ops`; the modules here only hold
parameters and apply those ops through `dpft.nn.taps`. Layouts: images NHWC, conv kernels HWIO, linear weights [in, out].
Parameter names follow Haiku (``w``, ``gain``, ``bias`` / ``w``, ``b``) so the
mapping to DeepMind checkpoints is one-to-one.

Initial values come from a ``ParamInit`` (models make one from their ``nnx.Rngs``):
numpy draws for a concrete key (no XLA compilation: on a small CPU, compiling
``jax.random`` per parameter shape dominates model creation), ``jax.random`` under
tracing so that ``nnx.eval_shape`` allocates nothing.

Mixed precision: every module takes ``dtype`` (the compute dtype). Parameters
are stored in float32 and cast at use; weight standardisation is computed in
float32 before the cast.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from dpft.nn import ops, taps

Array = jax.Array
DType = Any


class ParamInit:
    """Source of N(0, std^2) initial values, deterministic in the key.

    Concrete key: a numpy Generator seeded from the key's bits. Traced key (inside
    ``nnx.eval_shape`` / ``jit``): ``jax.random.normal`` of ``fold_in(key, i)``.
    """

    def __init__(self, key: Array):
        self._traced = isinstance(key, jax.core.Tracer)
        self._key, self._count = key, 0
        if not self._traced:
            bits = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()
            self._rng = np.random.default_rng(bits)

    @classmethod
    def from_rngs(cls, rngs: nnx.Rngs) -> "ParamInit":
        return cls(rngs.params())

    def normal(self, shape: tuple[int, ...], std: float) -> Array:
        """float32 array of ``shape`` with N(0, std^2) entries."""
        self._count += 1
        if self._traced:
            key = jax.random.fold_in(self._key, self._count)
            return std * jax.random.normal(key, shape, jnp.float32)
        return jnp.asarray(self._rng.standard_normal(shape, dtype=np.float32) * np.float32(std))


class WSConv2D(nnx.Module):
    """2-D convolution with scaled weight standardisation, gain and bias.

    Params: ``w`` [k, k, in/groups, out] (N(0, 1/fan_in) init; WS makes the
    choice immaterial), ``gain`` [out] (ones),
    ``bias`` [out] (zeros). Call: [B, H, W, in] -> [B, H/stride, W/stride, out], SAME padding.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1,
                 groups: int = 1, dtype: DType = jnp.float32, init: ParamInit):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"WSConv2D: channels {in_ch}->{out_ch} not divisible by groups={groups}")
        shape = (kernel, kernel, in_ch // groups, out_ch)
        std = 1.0 / math.sqrt(math.prod(shape[:-1]))
        self.w = nnx.Param(init.normal(shape, std))
        self.gain = nnx.Param(jnp.ones((out_ch,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
        self.stride = stride
        self.groups = groups
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        fn = functools.partial(ops.ws_conv, stride=self.stride, groups=self.groups, dtype=self.dtype)
        params = {"w": self.w[...], "gain": self.gain[...], "bias": self.bias[...]}
        return taps.tap(self, "conv", "ws_conv", fn, params, x)


class Linear(nnx.Module):
    """Dense layer with Haiku names: ``w`` [in, out], ``b`` [out]. [..., in] -> [..., out].

    ``w_init``: "default" (N(0, 1/in); Haiku truncates it, immaterial here), "zeros", or
    "normal" (N(0, 0.01), the reference NFNet head).
    """

    def __init__(self, in_features: int, out_features: int, *, w_init: str = "default",
                 dtype: DType = jnp.float32, init: ParamInit):
        shape = (in_features, out_features)
        if w_init == "default":
            w = init.normal(shape, 1.0 / math.sqrt(in_features))
        elif w_init == "zeros":
            w = jnp.zeros(shape, jnp.float32)
        elif w_init == "normal":
            w = init.normal(shape, 0.01)
        else:
            raise ValueError(f"Linear: unknown w_init {w_init!r}; use default, zeros or normal")
        self.w = nnx.Param(w)
        self.b = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        fn = functools.partial(ops.linear, dtype=self.dtype)
        return taps.tap(self, "linear", "linear", fn, {"w": self.w[...], "b": self.b[...]}, x)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excite: mean over H, W -> linear -> relu -> linear -> sigmoid.

    Returns the gates [B, 1, 1, out_ch] (in (0, 1)); hidden = max(1, int(in_ch * se_ratio)).
    Sub-modules are named as Haiku names them: ``linear``, ``linear_1``.
    """

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5, *,
                 dtype: DType = jnp.float32, init: ParamInit):
        hidden = max(1, int(in_ch * se_ratio))
        self.linear = Linear(in_ch, hidden, dtype=dtype, init=init)
        self.linear_1 = Linear(hidden, out_ch, dtype=dtype, init=init)

    def __call__(self, x: Array) -> Array:
        h = jnp.mean(x, axis=(1, 2))
        h = self.linear_1(jax.nn.relu(self.linear(h)))
        return jax.nn.sigmoid(h)[:, None, None, :]


class GroupNorm(nnx.Module):
    """Group normalisation over (H, W, C/groups) per example; params ``scale``, ``offset`` [C].

    Statistics in float32 (biased variance, eps 1e-5); no batch statistics. [B,H,W,C] -> same.
    """

    def __init__(self, channels: int, groups: int = 16, *, eps: float = 1e-5,
                 dtype: DType = jnp.float32):
        if channels % groups:
            raise ValueError(f"GroupNorm: channels={channels} not divisible by groups={groups}")
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.offset = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.groups = groups
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        fn = functools.partial(ops.group_norm, groups=self.groups, eps=self.eps, dtype=self.dtype)
        return taps.tap(self, "norm", "generic", fn, {"scale": self.scale[...], "offset": self.offset[...]}, x)
