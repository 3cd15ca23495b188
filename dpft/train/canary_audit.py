"""`dpft audit`'s training run: Dirac canaries trained through the PRODUCTION step.

The audit is only evidence about what `dpft train` does if it runs what `dpft train` runs: the
same privacy plan (`dpft.privacy.plan.make_plan`: sigma, q, B, sensitivity, engine, a fresh
CSPRNG secret for the noise and the Poisson selection), the same step functions
(`dpft.train.step.make_accumulate_fn` / `make_apply_fn`, `shard_map` over the device mesh),
the same engine (book-keeping by default) and compute dtype. Only the model and data are the
audit's: a dpft tapped linear layer w in R^{m x 1} whose loss on canary i is -<w, s e_i> - b
(s = `canary_scale` * C), so each included canary's clipped gradient points along its own
coordinate. The statistics (p-values, lower bounds) are `dpft.privacy.audit`.

Canary patients (`images_per_canary` k > 1): each canary has k images (the same Dirac row). With
`unit="patient"` the run is patient-level (Poisson over canaries, one clipped gradient per canary
from its k images, `dpft.privacy.units`) and the claim is the run's epsilon per patient. With
`unit="example"` each image is sampled and clipped on its own (Poisson over the m k images), and the
claim is still that example-level epsilon: the audit then measures what a patient with k images
really gets, and fails for k large enough (a per-image epsilon is not a per-patient one).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from dpft.config.fields import FLOAT, INT, STR, Range
from dpft.config.options import dataclass_problems, option
from dpft.config.schema import FIELDS as RUN_FIELDS
from dpft.privacy import limits
from dpft.privacy.audit import best_guess_bound, guess_counts

MAX_SEED = limits.MAX_SEED  # seeds are uint32
_UNIT_OPEN = Range(0.0, 1.0, low_open=True, high_open=True)  # (0, 1)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What the audit trains (plain data, a dataclass: `dpft audit`'s options, no saved config to
    upgrade). Each field's record (`dpft.config.fields.option`: kind, range, choices, doc) is checked by
    `problems`/`validate` and gives `dpft audit`'s options; the choices are those of the run config
    (compute dtypes, accountants, engines).

    clipping_mode: a mode of `dpft.privacy.clipping.MODES` whose record says the audit supports it
      ("flat"; "none" = non-private SGD).
    noise_scale_for_testing: != 1 breaks DP on purpose, to test that the audit can fail: the run
      trains with sigma * scale while the claim is that of sigma (the step itself is untouched).
    guess_fractions: the (k+ = k-) candidates as fractions of m / 2 (Bonferroni over them).
    """

    num_canaries: int = option(1000, INT, "number of canaries m", range=Range(2, limits.MAX_CANARIES))
    steps: int = option(100, INT, "optimizer updates T", range=Range(1, 10**6))
    sampling_rate: float = option(0.1, FLOAT, "Poisson rate q", range=Range(0.0, 1.0, low_open=True))
    epsilon: float | None = option(1.0, FLOAT, "target epsilon; the noise multiplier is calibrated to it",
                                   nullable=True)
    noise_multiplier: float | None = option(None, FLOAT, "use this sigma instead of calibrating to the epsilon "
                                            "(0 = no noise)", range=Range(0.0), nullable=True)
    delta: float = option(1e-5, FLOAT, "delta", range=_UNIT_OPEN)
    clip_norm: float = 1.0
    clipping_mode: str = "flat"
    canary_scale: float = option(10.0, FLOAT, "canary gradient scale [C] (canary gradients must be clipped)",
                                 range=Range(1.0))
    learning_rate: float = 1.0
    noise_scale_for_testing: float = option(1.0, FLOAT, "scales the noise: != 1 breaks DP (testing the audit only)",
                                            range=Range(0.0, low_open=True))
    confidence: float = option(0.95, FLOAT, "confidence of the bound", range=_UNIT_OPEN)
    accountant: str = option("pld", STR, "the accountant of the claimed epsilon",
                             choices=RUN_FIELDS["privacy.accountant"].choices)
    physical_batch_size: int = option(128, INT, "privacy units per physical batch", range=Range(1))
    unit: str = option("example", STR, "the privacy unit of the audited run (example | patient)",
                       choices=RUN_FIELDS["privacy.unit"].choices)
    images_per_canary: int = option(1, INT, "images of each canary (a canary patient when > 1)", range=Range(1, 64))
    seed: int = option(0, INT, "public seed of canary inclusion and the layer's init (the noise secret is fresh "
                       "per run)", range=Range(0, MAX_SEED))
    insecure_fixed_noise_seed: int = option(-1, INT, "fix the noise secret to this public number (reproducible "
                                            "tests only; -1 = fresh)", range=Range(-1, MAX_SEED), note="-1 = off")
    dtype: str = option("float32", STR, "compute dtype of the audited step, as config.model.dtype",
                        choices=RUN_FIELDS["model.dtype"].choices)
    grad_method: str = option("auto", STR, "engine of the audited step, as config.train.grad_method",
                              choices=RUN_FIELDS["train.grad_method"].choices)
    guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0)

    def problems(self) -> list[tuple[str, Any, str]]:
        """(field, value, problem) of each invalid field; once every field is valid, of the rules
        between fields."""
        out = dataclass_problems(self)
        if out:
            return out
        if self.noise_multiplier is None and not (self.epsilon is not None and self.epsilon > 0):
            out.append(("epsilon", self.epsilon, "need epsilon > 0 (or an explicit noise_multiplier)"))
        try:
            mode = _clipping_record(self)
        except ValueError:  # unknown: refused below, naming the audit's choices
            mode = None
        if mode is None or not mode.audit:
            what = "unknown clipping mode" if mode is None else "a clipping mode the audit does not support"
            out.append(("clipping_mode", self.clipping_mode, f"{what}; choose from {_audited_modes()}"))
        elif self.noise_multiplier == 0 and mode.private:
            out.append(("noise_multiplier", self.noise_multiplier,
                        f"0 (no noise) only with a non-private clipping_mode ({_audited_modes(private=False)})"))
        return out

    def validate(self) -> None:
        """ValueError naming the first invalid field (`problems`)."""
        for name, value, problem in self.problems():
            raise ValueError(f"audit config: {name}={value!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of `run_audit`; passed = epsilon_lower_bound <= epsilon_claimed."""

    epsilon_lower_bound: float
    epsilon_claimed: float
    num_canaries: int
    num_guesses: int
    correct: int
    passed: bool
    noise_multiplier: float = 0.0
    delta: float = 0.0
    confidence: float = 0.95
    k_pos: int = 0
    k_neg: int = 0
    num_included: int = 0
    engine: str = ""  # the plan's resolved engine ("bookkeeping" | "vmap")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clipping_record(config: AuditConfig):
    """The `dpft.privacy.clipping.ClippingMode` of `config.clipping_mode` (UsageError if unknown)."""
    from dpft.privacy import clipping

    return clipping.get(config.clipping_mode)


def _audited_modes(private: bool | None = None) -> str:
    from dpft.privacy import clipping

    return ", ".join(repr(n) for n in clipping.names(audit=True, private=private))


def canary_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """bool [m]: canary i is in the training set (independent fair coins from `seed`)."""
    return np.random.default_rng([seed, 0xA0D1]).random(num_canaries) < 0.5


def canary_plan(config: AuditConfig, noise_multiplier: float, params: Any):
    """The audit run's privacy plan: N = m canary slots (public), B = q m, a fresh secret.

    With `insecure_fixed_noise_seed` >= 0 the secret is that public number instead (reproducible tests).
    """
    from dpft.privacy import engine, keys, plan as plan_lib

    private = _clipping_record(config).private
    secret = (keys.RunSecret.insecure_fixed(config.insecure_fixed_noise_seed)
              if config.insecure_fixed_noise_seed >= 0 else keys.RunSecret.generate())
    clipping = (engine.ClippingConfig(mode=config.clipping_mode, clip_norm=config.clip_norm) if private
                else engine.NO_CLIPPING)
    n = config.num_canaries * units_per_canary(config)
    plan = plan_lib.make_plan(
        enabled=private, num_examples=n, batch_size=config.sampling_rate * n, num_updates=config.steps,
        clipping=clipping, params=params, secret=secret, noise_multiplier=noise_multiplier if private else None,
        delta=config.delta, accountant=config.accountant, grad_method=config.grad_method)
    return dataclasses.replace(plan, unit=config.unit)


def units_per_canary(config: AuditConfig) -> int:
    """Privacy units of one canary: its k images at the example level (unit j is of canary j // k), 1 for
    a canary patient."""
    return config.images_per_canary if config.unit == "example" else 1


def canary_batch(idx: np.ndarray, mask: np.ndarray, config: AuditConfig) -> dict:
    """One physical batch of the audit run. Units (`idx`, -1 = padding) are canaries (patient level:
    k images each, weight 1) or images (example level: image j is of canary j // k)."""
    m, k, scale = config.num_canaries, config.images_per_canary, config.canary_scale * config.clip_norm
    real = mask > 0
    if config.unit == "patient":
        rows = np.where(real[:, None, None], np.eye(m, dtype=np.float32)[np.maximum(idx, 0)][:, None, :] * scale, 0.0)
        return {"image": np.repeat(rows, k, axis=1), "label": np.zeros([len(idx), k], np.int32),
                "view_weight": np.repeat(real[:, None], k, axis=1).astype(np.float32), "mask": mask,
                "example_id": idx.astype(np.int32)}
    rows = np.where(real[:, None], np.eye(m, dtype=np.float32)[np.maximum(idx, 0) // k] * scale, 0.0)
    return {"image": rows[:, None, :], "label": np.zeros([len(idx), 1], np.int32), "mask": mask,
            "example_id": idx.astype(np.int32)}


def train_canaries(config: AuditConfig, noise_multiplier: float, included: np.ndarray) -> tuple[np.ndarray, Any]:
    """Trains the linear canary model through the production step; returns (scores float [m], plan).

    Selection: the plan's Poisson selection over the m canary slots (public N = m), of which the
    excluded canaries' slots are dropped -- the same as Poisson sampling of the included canaries.
    Score of canary i: its loss reduction s * (w_T - w_0)_i.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dpft.models import layers
    from dpft.privacy import adapters
    from dpft import distributed
    from dpft.train import step as step_lib
    from dpft.privacy.keys import dropout_key

    m = config.num_canaries
    from dpft.config.build import COMPUTE_DTYPES

    dtype = COMPUTE_DTYPES[config.dtype]
    scale = config.canary_scale * config.clip_norm

    class CanaryModel(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = layers.Linear(m, 1, dtype=dtype, init=layers.ParamInit.from_rngs(rngs))

        def __call__(self, x):
            return self.linear(x)

    def per_view_loss(logits, views):
        return -logits[..., 0].astype(jnp.float32), {}

    loss_fn, params, _ = adapters.nnx_loss_fn(CanaryModel(nnx.Rngs(config.seed)), per_view_loss)
    plan = canary_plan(config, noise_multiplier * config.noise_scale_for_testing, params)
    cfg = step_lib.StepConfig(plan=plan, microbatch_size=config.physical_batch_size)
    mesh = distributed.make_data_mesh()
    if config.physical_batch_size % jax.local_device_count():
        raise ValueError(f"audit config: physical_batch_size={config.physical_batch_size} is not divisible by the "
                         f"{jax.local_device_count()} local devices")
    cfg = dataclasses.replace(cfg, microbatch_size=config.physical_batch_size // jax.local_device_count())
    optimizer = optax.sgd(config.learning_rate)
    state = distributed.replicate(step_lib.init_state(params, optimizer, cfg), mesh)
    accumulate = step_lib.make_accumulate_fn(loss_fn, cfg, mesh)
    apply = step_lib.make_apply_fn(optimizer, cfg, mesh)
    noise_key = plan.noise_base_key()
    w0 = np.asarray(params["linear"]["w"][...], np.float64)[:, 0]
    bsz = config.physical_batch_size
    from dpft.privacy import sampling
    per_canary = units_per_canary(config)
    for t in range(config.steps):
        selected = plan.selection(t)
        selected = selected[included[selected // per_canary]]  # only included canaries are in the data set
        acc = step_lib.zeros_accumulator(state["params"], mesh)
        for idx, mask in sampling.physical_batches(selected, bsz):
            acc, _ = accumulate(state["params"], acc, distributed.shard_batch(canary_batch(idx, mask, config), mesh),
                                dropout_key(config.seed, t))
        state, _ = apply(state, acc, noise_key)
    w_t = np.asarray(jax.device_get(state["params"]["linear"]["w"][...]), np.float64)[:, 0]
    return scale * (w_t - w0), plan


def claimed_epsilon(config: AuditConfig, noise_multiplier: float) -> float:
    """The accountant's epsilon for the run (inf for a non-private run); equals the plan's."""
    from dpft.privacy import accounting

    if not _clipping_record(config).private or noise_multiplier == 0:
        return math.inf
    return accounting.compute_epsilon(config.sampling_rate, noise_multiplier, config.steps, config.delta,
                                      config.accountant)


def resolve_noise_multiplier(config: AuditConfig) -> float:
    """Explicit sigma, else calibrated to config.epsilon for (q, steps, delta)."""
    from dpft.privacy import accounting

    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return accounting.calibrate_noise_multiplier(config.epsilon, config.sampling_rate, config.steps,
                                                 config.delta, config.accountant)


def run_audit(config: AuditConfig | Mapping[str, Any]) -> AuditResult:
    """One training run with m canaries -> empirical epsilon lower bound vs the claim."""
    if not isinstance(config, AuditConfig):
        config = AuditConfig(**dict(config))
    config.validate()
    sigma = resolve_noise_multiplier(config)
    included = canary_inclusion(config.num_canaries, config.seed)
    scores, plan = train_canaries(config, sigma, included)
    # The claim of the calibrated sigma, by the plan's accountant (equal to plan.epsilon_after
    # unless noise_scale_for_testing broke the run on purpose).
    claimed = claimed_epsilon(config, sigma)
    best = best_guess_bound(scores, included, delta=config.delta, confidence=config.confidence,
                            pairs=guess_counts(config.num_canaries, config.guess_fractions))
    return AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound, epsilon_claimed=claimed,
        num_canaries=config.num_canaries, num_guesses=best.num_guesses, correct=best.correct,
        passed=bool(best.epsilon_lower_bound <= claimed), noise_multiplier=sigma, delta=config.delta,
        confidence=config.confidence, k_pos=best.k_pos, k_neg=best.k_neg, num_included=int(included.sum()),
        engine=plan.grad_method)
