"""The strategy of BandMF (`privacy.mechanism="bandmf"`): a banded lower-triangular Toeplitz matrix C.

Matrix-factorisation DP (Choquette-Choo et al. 2023, "Amplified banded matrix factorization") adds
to update t the noise sigma * S * sens(C) * (C^-1 Z)_t, Z's rows the run's secret standard normals of
each update (`dpft.privacy.noise`), instead of DP-SGD's independent sigma * S * Z_t. C is banded
Toeplitz: C[t, t-j] = coefs[j] for 0 <= j < b (the b "bands"), zero elsewhere, so

    y_t = (C^-1 Z)_t = (Z_t - sum_{j=1}^{b-1} coefs[j] * y_{t-j}) / coefs[0]

needs the last b-1 noise vectors y (the noise state of the train state, `dpft.train.step`). Why a
banded C (BandMF) and not a banded inverse: the amplified accounting of BandMF (cyclic Poisson
sampling over b groups, `dpft.privacy.sampling.cyclic_poisson_selection`, and
`jax_privacy.experimental.accounting.amplified_bandmf_event`) needs C itself banded, so that an
example's participations b updates apart touch disjoint rows of C; the price is b-1 parameter-sized
float32 vectors kept (and checkpointed) with the state. Why Toeplitz: b numbers describe it for any
run length (a file of b coefficients), and jax_privacy recommends it over the n x b
`banded.ColumnNormalizedBanded` (within 0.5% of its error for n >= 1000, b <= 32).

Strategy optimisation and sensitivity come from `jax_privacy.matrix_factorization.toeplitz`; the
sensitivity is that of one participation (the largest column norm, ||coefs||), which is what the
amplified event assumes to be 1: the noise is scaled by it, so any positive multiple of a strategy
gives the same noise distribution. b = 1 with coefs [1.0] is DP-SGD's noise, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

MECHANISMS = ("dpsgd", "bandmf")
STRATEGY_OPTIMIZED = "optimized"  # privacy.bandmf.strategy: optimised for the run's number of updates
LBFGS_STEPS = 250  # jax_privacy's default for optimize_banded_toeplitz


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A banded Toeplitz strategy: `coefs` (b floats, coefs[0] > 0) and where they came from
    (`source`: "optimized" for `num_updates`, or the .npy path they were read from)."""

    coefs: tuple[float, ...]
    source: str
    sensitivity: float  # one participation's L2 sensitivity of C: ||coefs|| (jax_privacy's toeplitz)

    @property
    def bands(self) -> int:
        return len(self.coefs)

    def with_coefs(self, coefs: np.ndarray, num_updates: int) -> "Strategy":
        """The same strategy with other `coefs` (b floats: a checkpoint's, or process 0's), its sensitivity
        recomputed. ValueError when they are not b valid coefficients."""
        c = check_coefs(coefs, self.bands, f"strategy {self.source!r}")
        return Strategy(tuple(float(x) for x in c), self.source, sensitivity(c, num_updates))

    def to_dict(self) -> dict:
        return {"bands": self.bands, "coefs": list(self.coefs), "source": self.source,
                "strategy_sensitivity": self.sensitivity}


def check_coefs(coefs: np.ndarray, bands: int, where: str) -> np.ndarray:
    """`coefs` as float64 [bands], checked: finite, coefs[0] > 0 (C invertible). ValueError naming `where`."""
    c = np.asarray(coefs, np.float64)
    if c.shape != (bands,):
        raise ValueError(f"{where}: a strategy of {bands} band(s) needs {bands} coefficients, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or not c[0] > 0:
        raise ValueError(f"{where}: coefficients must be finite with coefs[0] > 0 (C invertible), got {c.tolist()}")
    # The noise recursion y_t = (z_t - sum_j c_j y_{t-j}) / c_0 is stable iff every root of
    # c_0 x^(b-1) + ... + c_(b-1) lies inside the unit circle; otherwise the noise grows without bound
    # over the updates (jax-privacy's optimised strategies: largest root 0.55 at n=6 b=3, 0.96 at n=1000 b=16).
    largest = float(np.max(np.abs(np.roots(c)))) if bands > 1 else 0.0
    if not largest < 1.0:
        raise ValueError(f"{where}: C^-1 is unstable (a root of the coefficients' polynomial has modulus "
                         f"{largest:.4g} >= 1: the correlated noise would grow without bound), got {c.tolist()}")
    return c


def sensitivity(coefs: np.ndarray, num_updates: int) -> float:
    """L2 sensitivity of one participation in C (n = num_updates): sqrt of jax_privacy's
    `toeplitz.minsep_sensitivity_squared(coefs, min_sep=b, max_participations=1, n)` (= ||coefs[:n]||)."""
    from jax_privacy.matrix_factorization import toeplitz

    c = np.asarray(coefs, np.float64)
    sq = toeplitz.minsep_sensitivity_squared(c, min_sep=len(c), max_participations=1, n=int(num_updates),
                                             skip_checks=True)
    return float(math.sqrt(float(sq)))


def optimized_coefs(num_updates: int, bands: int) -> np.ndarray:
    """float64 [bands]: jax_privacy's `toeplitz.optimize_banded_toeplitz(n=num_updates, bands)` (mean
    squared error of the prefix sums, L2 norm 1); [1.0] for bands = 1 (DP-SGD). Kept per (n, b) in the
    process (1 s at n = 6, 11 s at n = 20,000 b = 16, 66 s at n = 100,000 b = 32 on 2 busy cores)."""
    return np.asarray(_optimized(int(num_updates), int(bands)), np.float64)


@functools.lru_cache(maxsize=8)
def _optimized(num_updates: int, bands: int) -> tuple[float, ...]:
    if bands == 1:
        return (1.0,)
    from jax_privacy.matrix_factorization import toeplitz

    c = toeplitz.optimize_banded_toeplitz(num_updates, bands, max_optimizer_steps=LBFGS_STEPS)
    return tuple(float(x) for x in np.asarray(c, np.float64))


def make_strategy(source: str, bands: int, num_updates: int) -> Strategy:
    """The strategy of `privacy.bandmf`: `source` "optimized" (for `num_updates`) or a .npy path of
    `bands` coefficients. ValueError naming the problem (bands out of [1, num_updates], bad file)."""
    if isinstance(bands, bool) or not isinstance(bands, int) or not 1 <= bands <= num_updates:
        raise ValueError(f"bands={bands!r} must be an int in [1, num_updates={num_updates}]")
    if source == STRATEGY_OPTIMIZED:
        coefs = optimized_coefs(num_updates, bands)
    else:
        try:
            coefs = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"strategy file {source!r} unreadable: {e}") from None
    c = check_coefs(coefs, bands, f"strategy {source!r}")
    return Strategy(tuple(float(x) for x in c), source, sensitivity(c, num_updates))


def dense_strategy(coefs: np.ndarray, n: int) -> np.ndarray:
    """float64 [n, n]: the lower-triangular banded Toeplitz C (for tests and references)."""
    c = np.asarray(coefs, np.float64)
    out = np.zeros([n, n])
    for j, cj in enumerate(c[:n]):
        out += cj * np.eye(n, k=-j)
    return out


__all__ = ["MECHANISMS", "STRATEGY_OPTIMIZED", "Strategy", "make_strategy", "optimized_coefs", "sensitivity",
           "check_coefs", "dense_strategy"]
