"""The privacy plan of a run: every privacy decision in one frozen object.

`make_plan(...)` is called once per run (training, `dpft audit`, benchmarks) and fixes
N, q = B/N, the expected batch size B (the public divisor), sigma (calibrated to the target
epsilon, or given), delta, the clipping and its measured L2 sensitivity, the accountant, the
engine that computes clipped sums, and the run's secret key streams. The plan then provides:

* `selection(update)`         Poisson selection of the update (secret stream);
* `clipped_sum(...)`          the clipped per-example gradient sum (vmap or book-keeping engine);
* `noisy_mean(...)`           the noise step (`dpft.privacy.noise.privatize`, the one place noise
                              is added) with the secret noise key of the update;
* `epsilon_after(T)`          epsilon after T updates with the run's accountant;
* `num_updates`               the update budget (never beyond the target epsilon);
* `contribution_norm(norms)`  the L2 norm an example of gradient norm n adds to the clipped sum
                              (what individual accounting charges);
* `individual_epsilons(...)`  per-example epsilons with the run's accountant, <= the run's epsilon.

BandMF (`mechanism="bandmf"`, `strategy` a `dpft.privacy.bandmf.Strategy` of b bands): the selection
is cyclic Poisson over b groups (`sampling.cyclic_poisson_selection`), the noise step is
`noisy_mean_correlated` (`noise.privatize_correlated`, with the noise state `init_noise_state`), and
every epsilon is jax_privacy's amplified BandMF event (`accounting.bandmf_event`).

Invariants checked on construction: a private (clipping) plan has a measured sensitivity > 0
and a finite sigma >= 0 (sigma = 0, clipping without noise, is a diagnostic with epsilon = inf
that `make_plan` never builds); a non-private one has neither (nothing defaults to 0 silently).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dpft.privacy import accounting, bandmf, bookkeeping, clipping as clipping_lib, engine, keys, noise, sampling, units
from dpft.privacy.engine import ClippingConfig

#: How the clipped per-example gradient sum is computed (same contract, same result); the keys
#: are `clipping.ENGINES`, the engines a clipping mode's record may list.
GRAD_METHODS: dict[str, Callable] = {"vmap": engine.clipped_grad_sum,
                                     "bookkeeping": bookkeeping.bk_clipped_grad_sum}
GRAD_METHOD_CHOICES = ("auto",) + tuple(GRAD_METHODS)


class PlanError(ValueError):
    """An impossible privacy plan (the message names the parameter)."""


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The privacy parameters of a run, fixed before training. See the module doc.

    All fields but `secret` are public (`to_dict`); `secret` never leaves the checkpoint.
    """

    enabled: bool
    num_examples: int  # N, private training examples
    sampling_rate: float  # q = B / N
    expected_batch_size: float  # B = q N, the public divisor of the noisy sum
    noise_multiplier: float  # sigma (0.0 iff not private)
    clipping: ClippingConfig
    sensitivity: float  # L2 sensitivity of the clipped sum (engine.sensitivity; 0.0 iff not private)
    delta: float  # 0.0 when not private
    target_epsilon: float | None
    num_updates: int  # updates that will run (<= the requested number when the budget binds)
    accountant: str
    grad_method: str  # "vmap" | "bookkeeping"
    secret: keys.RunSecret = dataclasses.field(repr=False, compare=False)
    #: How the examples group into patients: in an example-level run the epsilon of the patient with
    #: the most images (`dpft.privacy.group.patient_report`); in a patient-level run the units and the
    #: cap (`dpft.privacy.units.UnitIndex.summary`). None where not computed (no table, not private).
    patients: dict | None = None
    #: The privacy unit (`dpft.privacy.units.UNITS`): what num_examples counts, sampling draws and one
    #: clipped gradient is: "example" (an image) or "patient" (all of a patient's images in the update).
    unit: str = "example"
    #: The noise mechanism (`bandmf.MECHANISMS`): "dpsgd" (independent noise per update) or "bandmf"
    #: (correlated by `strategy`, cyclic Poisson selection over strategy.bands groups).
    mechanism: str = "dpsgd"
    strategy: bandmf.Strategy | None = None
    #: What is trained (`config.train.trainable`): "all", "head", ...; `dimension` is the number of
    #: scalars of the trained (clipped and noised) tree, `model_size` that of the whole model.
    trainable: str = "all"
    dimension: int = 0
    model_size: int = 0

    def __post_init__(self) -> None:
        if self.mechanism not in bandmf.MECHANISMS:
            raise PlanError(f"mechanism={self.mechanism!r}; use one of {bandmf.MECHANISMS}")
        if (self.mechanism == "bandmf") != isinstance(self.strategy, bandmf.Strategy):
            raise PlanError(f"mechanism={self.mechanism!r} needs a BandMF strategy iff it is 'bandmf'")
        if self.mechanism == "bandmf" and not self.bands * self.sampling_rate <= 1:
            raise PlanError(f"bandmf: bands*q = {self.bands}*{self.sampling_rate:.4g} > 1: each of the {self.bands} "
                            f"groups is sampled at rate bands*q")
        if self.unit not in units.UNITS:
            raise PlanError(f"unit={self.unit!r}; use one of {units.UNITS}")
        if self.grad_method not in GRAD_METHODS:
            raise PlanError(f"grad_method={self.grad_method!r}; use one of {tuple(GRAD_METHODS)}")
        if self.accountant not in accounting.ACCOUNTANTS:
            raise PlanError(f"accountant={self.accountant!r}; use one of {accounting.ACCOUNTANTS}")
        if not 0 < self.sampling_rate <= 1 or not self.expected_batch_size > 0:
            raise PlanError(f"sampling_rate={self.sampling_rate!r} must be in (0, 1]")
        if not isinstance(self.secret, keys.RunSecret):
            raise PlanError("a privacy plan needs the run's secret (dpft.privacy.keys.RunSecret)")
        mode = self.clipping.record
        if self.enabled:
            if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
                raise PlanError(f"noise_multiplier={self.noise_multiplier!r}: a private plan needs a finite sigma >= 0")
            if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
                raise PlanError(f"sensitivity={self.sensitivity!r}: a private plan needs a finite sensitivity > 0")
            if not mode.private:
                raise PlanError(f"clipping mode {self.clipping.mode!r} cannot be private")
            if not 0 < self.delta < 1:
                raise PlanError(f"delta={self.delta!r} must be in (0, 1)")
            if not mode.supports(self.grad_method):
                raise PlanError(f"grad_method={self.grad_method!r} does not support clipping={self.clipping.mode!r}; "
                                f"use one of {mode.engines}")
        elif self.noise_multiplier != 0 or self.sensitivity != 0 or mode.private:
            raise PlanError("a non-private plan has noise_multiplier 0, sensitivity 0 and a non-private clipping "
                            f"({', '.join(clipping_lib.names(private=False))})")

    # ------------------------------------------------------------------ guarantee
    @property
    def guarantee_valid(self) -> bool:
        """True when the run's epsilon is a DP guarantee: private with noise, and a CSPRNG secret."""
        return self.enabled and self.noise_multiplier > 0 and self.secret.is_secure

    @property
    def bands(self) -> int:
        """Groups of the selection and bands of the noise: 1 for DP-SGD."""
        return self.strategy.bands if self.strategy is not None else 1

    @property
    def ledger_bands(self) -> int | None:
        """What the accounting functions and the `Ledger` take as `bands`: None for DP-SGD."""
        return self.strategy.bands if self.mechanism == "bandmf" else None

    @property
    def correlated(self) -> bool:
        """True when the noise step keeps a noise state (BandMF with b > 1, private)."""
        return self.enabled and self.mechanism == "bandmf" and self.bands > 1

    def new_ledger(self) -> accounting.Ledger:
        """An empty ledger of this plan's mechanism."""
        return accounting.Ledger(bands=self.ledger_bands)

    def epsilon_after(self, updates: int) -> float:
        """Epsilon after `updates` updates of this plan (inf when not private)."""
        if not self.enabled or self.noise_multiplier == 0:
            return math.inf
        if updates <= 0:
            return 0.0
        return accounting.compute_epsilon(self.sampling_rate, self.noise_multiplier, int(updates), self.delta,
                                          accountant=self.accountant, bands=self.ledger_bands)

    # ------------------------------------------------------------------ secret streams
    def with_secret(self, secret: keys.RunSecret) -> "PrivacyPlan":
        """The same plan with another secret (a resumed run uses its checkpoint's)."""
        return dataclasses.replace(self, secret=secret)

    def selection_seed(self) -> int:
        """The secret seed of the Poisson selection (pass to the data pipeline only)."""
        return keys.selection_entropy(self.secret)

    def selection(self, update: int) -> np.ndarray:
        """Sorted int64 positions in [0, N) of the examples of update `update` (Poisson, rate q; BandMF:
        cyclic Poisson over `bands` groups)."""
        if self.mechanism == "bandmf":
            return sampling.cyclic_poisson_selection(self.selection_seed(), int(update), self.num_examples,
                                                     self.sampling_rate, self.bands)
        return sampling.poisson_selection(self.selection_seed(), int(update), self.num_examples, self.sampling_rate)

    def noise_base_key(self):
        """The secret noise key; pass it to compiled functions as an argument (never a constant)."""
        return keys.noise_base_key(self.secret)

    # ------------------------------------------------------------------ the DP step
    def clipped_sum(self, loss_fn: Callable, params: Any, batch: Mapping[str, Any], rng: Any, *,
                    microbatch_size: int, position_offset: Any = 0):
        """Sum of clipped per-example gradients of `batch` with the plan's engine and clipping."""
        fn = GRAD_METHODS[self.grad_method]
        return fn(loss_fn, params, batch, rng, clipping=self.clipping, microbatch_size=microbatch_size,
                  position_offset=position_offset)

    def noisy_mean(self, grad_sum: Any, base_key: Any, update: Any, noise_multiplier: Any = None):
        """(grad_sum + N(0, sigma^2 S^2)) / B with the key of `update`; sigma may be traced
        (pass `noise_multiplier` to share one compilation between runs that differ only in it).
        Non-private plans return grad_sum / B without drawing."""
        if not self.enabled or self.noise_multiplier == 0:
            sigma: Any = 0
        else:
            sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return noise.privatize(grad_sum, noise.noise_key(base_key, update), noise_multiplier=sigma,
                               clip_norm=self.sensitivity, expected_batch_size=self.expected_batch_size)

    def init_noise_state(self, params: Any) -> Any:
        """BandMF's noise state before update 0 (`noise.init_noise_state`: leaves [b-1, *shape])."""
        return noise.init_noise_state(params, self.bands)

    def noisy_mean_correlated(self, grad_sum: Any, base_key: Any, update: Any, noise_state: Any,
                              noise_multiplier: Any = None) -> tuple[Any, Any]:
        """BandMF's noise step: (grad_sum + sigma S sens(C) (C^-1 Z)_update) / B and the next noise state
        (`noise.privatize_correlated`); Z_update is the same draw `noisy_mean` adds."""
        if self.mechanism != "bandmf" or not self.enabled or self.noise_multiplier == 0:
            raise PlanError("noisy_mean_correlated: the plan is not a private BandMF plan")
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return noise.privatize_correlated(
            grad_sum, noise.noise_key(base_key, update), noise_state, coefs=self.strategy.coefs,
            noise_multiplier=sigma, clip_norm=self.sensitivity * self.strategy.sensitivity,
            expected_batch_size=self.expected_batch_size)

    # ------------------------------------------------------------------ individual accounting
    def contribution_norm(self, norms: np.ndarray) -> np.ndarray:
        """L2 norm float64 [...] that an example of (augmult-averaged) gradient norm `norms` [...] adds
        to the clipped sum: the `contribution` of the clipping mode's record (`dpft.privacy.clipping`:
        min(n, C) flat, C n / (n + gamma) automatic, min(n, S) per_layer: a bound)."""
        n = np.asarray(norms, np.float64)
        if not self.enabled:
            raise PlanError("contribution_norm: a non-private plan bounds nothing")
        return np.asarray(self.clipping.record.contribution(n, self.clipping, self.sensitivity), np.float64)

    def individual_epsilons(self, recorder: Any, num_updates: int) -> np.ndarray:
        """Per-example epsilons [N] after `num_updates` with the run's accountant (see
        `dpft.privacy.individual.epsilons.individual_epsilons`), never above `epsilon_after(num_updates)`."""
        from dpft.privacy.individual import epsilons

        if self.mechanism != "dpsgd":
            raise PlanError(f"individual accounting covers DP-SGD only, not mechanism={self.mechanism!r}")
        eps = epsilons.individual_epsilons(
            recorder, sampling_rate=self.sampling_rate, noise_multiplier=self.noise_multiplier,
            sensitivity=self.sensitivity, contribution=self.contribution_norm, num_updates=int(num_updates),
            delta=self.delta, accountant=self.accountant)
        return np.minimum(eps, self.epsilon_after(int(num_updates)))

    # ------------------------------------------------------------------ reporting
    def to_dict(self) -> dict:
        """The public description (what privacy_plan.json holds): no secret, its source only."""
        return {
            "enabled": self.enabled, "num_examples": self.num_examples, "sampling_rate": self.sampling_rate,
            "expected_batch_size": self.expected_batch_size, "noise_multiplier": self.noise_multiplier,
            "clipping": {"mode": self.clipping.mode, "clip_norm": self.clipping.clip_norm,
                         "gamma": self.clipping.gamma},
            "clip_norm": self.clipping.clip_norm if self.enabled else 0.0,
            "sensitivity": self.sensitivity, "delta": self.delta, "target_epsilon": self.target_epsilon,
            "num_updates": self.num_updates, "accountant": self.accountant, "grad_method": self.grad_method,
            "sampling": "poisson", "secret_source": self.secret.source,
            "guarantee_valid": self.guarantee_valid,
            # The privacy unit (dpft.privacy.units): "example" (an image; a patient with several images is
            # protected by group privacy only, and "patients" gives their epsilon, dpft.privacy.group) or
            # "patient" (num_examples counts patients; epsilon is per patient).
            "unit": self.unit, "num_units": self.num_examples, "patients": self.patients,
            "mechanism": self.mechanism, "bands": self.bands,
            **({"sampling": "cyclic_poisson", "bandmf": self.strategy.to_dict()} if self.mechanism == "bandmf" else {}),
            # What is trained: the noise has `dimension` coordinates (the trainable parameters).
            "trainable": self.trainable, "dimension": self.dimension, "model_size": self.model_size,
        }

    def trained_text(self) -> str:
        """"head, 1,290 of 3,400,000 parameters noised" ("trained" in a non-private plan)."""
        verb = "noised" if self.enabled else "trained"
        return f"{self.trainable}, {self.dimension:,} of {self.model_size:,} parameters {verb}"

    @property
    def clip_norm(self) -> float:
        """C of the clipping (0.0 when not private)."""
        return float(self.clipping.clip_norm) if self.enabled else 0.0


def num_scalars(params: Any) -> int:
    """Number of scalars of a params pytree (the dimension of its noise)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def _max_updates_within(target: float, q: float, sigma: float, delta: float, limit: int, accountant: str,
                        bands: int | None = None) -> int:
    """Largest T <= limit with epsilon(q, sigma, T, delta) <= target (binary search)."""
    def eps(t: int) -> float:
        return accounting.compute_epsilon(q, sigma, t, delta, accountant=accountant, bands=bands)
    if eps(limit) <= target:
        return limit
    lo, hi = 0, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def fixed_plan(*, clipping: ClippingConfig, noise_multiplier: float, expected_batch_size: float, params: Any,
               secret: keys.RunSecret, num_examples: int | None = None, delta: float = 1e-5,
               accountant: str = "pld", grad_method: str = "vmap", num_updates: int = 1) -> PrivacyPlan:
    """A plan with sigma and B given (no calibration): for benchmarks and tests of the step.
    Private iff the clipping mode's record is (every mode but "none"); N defaults to ceil(B) (q = B / N)."""
    private = clipping.record.private
    n = int(num_examples) if num_examples is not None else max(1, math.ceil(expected_batch_size))
    method = resolve_grad_method(grad_method, private, clipping.mode)
    sens = engine.sensitivity(clipping, params) if private else 0.0
    return PrivacyPlan(private, n, float(expected_batch_size) / n, float(expected_batch_size),
                       float(noise_multiplier) if private else 0.0, clipping, sens,
                       float(delta) if private else 0.0, None, int(num_updates), accountant, method, secret,
                       dimension=num_scalars(params), model_size=num_scalars(params))


def resolve_grad_method(method: str, enabled: bool, clipping_mode: str) -> str:
    """"auto" -> for a private run, the first engine of `clipping.AUTO_ENGINE_ORDER` that the
    clipping mode's record supports ("bookkeeping" for flat/automatic: any NNX model, dpft's layers
    and standard flax layers alike, `dpft.nn.nnx_layers`); else "vmap". An unknown mode raises."""
    mode = clipping_lib.get(clipping_mode)
    if method not in GRAD_METHOD_CHOICES:
        raise PlanError(f"grad_method={method!r}; use one of {GRAD_METHOD_CHOICES}")
    if method != "auto":
        return method
    if not enabled:
        return "vmap"
    return next(e for e in clipping_lib.AUTO_ENGINE_ORDER if mode.supports(e))


def make_plan(*, enabled: bool, num_examples: int, batch_size: float, num_updates: int,
              clipping: ClippingConfig, params: Any, secret: keys.RunSecret, epsilon: float | None = None,
              noise_multiplier: float | None = None, delta: float | None = None, accountant: str = "pld",
              grad_method: str = "auto", mechanism: str = "dpsgd", bands: int = 1,
              strategy: str = bandmf.STRATEGY_OPTIMIZED) -> PrivacyPlan:
    """The plan of a run of `num_updates` updates with expected batch `batch_size` on N examples.

    Private: sigma = `noise_multiplier` if given (> 0), else calibrated so that epsilon after
    `num_updates` <= `epsilon`; with both, the run is cut to the largest number of updates within
    `epsilon`. delta defaults to 1/N. The sensitivity is measured from `clipping` and `params`.
    `mechanism` "bandmf" (private only): `bands` groups and bands, the strategy (`bandmf.make_strategy`:
    "optimized" for the final number of updates, or a .npy path), accounted as BandMF.
    Raises PlanError naming the parameter.
    """
    n = int(num_examples)
    if n < 1:
        raise PlanError(f"num_examples={num_examples!r}: need at least one training example")
    b = float(batch_size)
    if not 0 < b <= n:
        raise PlanError(f"batch_size={batch_size!r} must be in (0, N={n}] (the training set has {n} examples)")
    q = b / n
    updates = int(num_updates)
    if updates < 1:
        raise PlanError(f"num_updates={num_updates!r} must be >= 1")
    method = resolve_grad_method(grad_method, enabled, clipping.mode)
    if not enabled:
        none = engine.NO_CLIPPING
        return PrivacyPlan(False, n, q, b, 0.0, none, 0.0, 0.0, None, updates, accountant, method, secret,
                           dimension=num_scalars(params), model_size=num_scalars(params))
    if mechanism not in bandmf.MECHANISMS:
        raise PlanError(f"mechanism={mechanism!r}; use one of {bandmf.MECHANISMS}")
    mf_bands = int(bands) if mechanism == "bandmf" else None
    if mf_bands is not None and not (1 <= mf_bands <= updates and mf_bands * q <= 1):
        raise PlanError(f"bands={bands!r} must be in [1, num_updates={updates}] with bands*q <= 1 (q={q:.4g})")
    delta = float(delta) if delta else 1.0 / n
    target = float(epsilon) if epsilon is not None and epsilon > 0 else None
    if noise_multiplier is not None and noise_multiplier > 0:
        sigma = float(noise_multiplier)
        if target is not None:
            updates = _max_updates_within(target, q, sigma, delta, updates, accountant, mf_bands)
            if updates < 1:
                raise PlanError(f"noise_multiplier={sigma} cannot run one update within epsilon={target} "
                                f"(q={q:.4g}, delta={delta:.3g})")
    else:
        if target is None:
            raise PlanError("epsilon must be > 0 when privacy is enabled and noise_multiplier is unset")
        try:
            sigma = accounting.calibrate_noise_multiplier(target, q, updates, delta, accountant=accountant,
                                                          bands=mf_bands)
        except ValueError as e:
            raise PlanError(f"epsilon={target}: {e}") from None
    mf = None
    if mf_bands is not None:
        if updates < mf_bands:
            raise PlanError(f"bands={mf_bands} exceeds the {updates} update(s) that fit in epsilon={target}")
        try:
            mf = bandmf.make_strategy(strategy, mf_bands, updates)
        except ValueError as e:
            raise PlanError(f"bandmf strategy: {e}") from None
    return PrivacyPlan(True, n, q, b, sigma, clipping, engine.sensitivity(clipping, params), delta, target,
                       updates, accountant, method, secret, mechanism=mechanism, strategy=mf,
                       dimension=num_scalars(params), model_size=num_scalars(params))


__all__ = ["PrivacyPlan", "PlanError", "make_plan", "fixed_plan", "GRAD_METHODS", "resolve_grad_method"]
