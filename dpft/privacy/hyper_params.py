"""The clipping hyper-parameters: one record each (default, valid range, doc), read by the clipping
modes (`dpft.privacy.clipping`), `ClippingConfig` and the run config's schema (`dpft.config.schema`,
for those marked `run_config`). Imports no jax, so the schema loads fast."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable


def _positive_finite(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
        return "must be > 0 and finite"
    return None


def _positive_leaves(value: Any) -> str | None:
    if value is None:
        return None
    import jax

    bad = [v for v in jax.tree.leaves(value) if not (float(v) > 0 and math.isfinite(float(v)))]
    return f"every leaf must be > 0 and finite, got {bad[:3]}" if bad else None


@dataclasses.dataclass(frozen=True)
class HyperParam:
    """A clipping hyper-parameter: its default, its valid range, and whether the run config sets it.

    check(value) -> the problem ("must be > 0 and finite") or None when valid.
    run_config: settable as `config.privacy.<name>` (a number; a field of the config schema);
      else only through `ClippingConfig`.
    """

    default: Any
    check: Callable[[Any], str | None]
    run_config: bool
    doc: str


HYPER_PARAMS: dict[str, HyperParam] = {
    "clip_norm": HyperParam(1.0, _positive_finite, True, "C, L2 bound on an example's gradient"),
    "gamma": HyperParam(0.01, _positive_finite, True, "stabiliser of automatic clipping, C / (||g|| + gamma)"),
    "per_layer_norms": HyperParam(None, _positive_leaves, False,
                                  "per_layer bounds C_l, a pytree like params; None = C / sqrt(#leaves) each"),
}
