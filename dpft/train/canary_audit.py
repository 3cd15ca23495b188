"""`dpft audit`'s training run: Dirac canaries trained by the PRODUCTION Trainer.

The audit is only evidence about what `dpft train` does if it runs what `dpft train` runs, so it
builds a run config and trains it with `dpft.train.loop.Trainer`: the same wiring, privacy plan (a
fresh CSPRNG secret for the noise and the Poisson selection), data iterator (host threads, physical
batches, the patient unit), engine, compute dtype, step functions, optimizer, ledger and
checkpoint. Only the data and the model are the audit's: `dpft.data.canaries` (m Dirac canary
images, each included with probability 1/2, k images per canary) and `dpft.models.canary` (one
tapped linear unit over the pixels), so that canary i's clipped gradient lies on its own
coordinate w_i. Plain SGD at a small learning rate keeps every canary gradient clipped; the score of
canary i is (w_T - w_0)_i B / lr: (times sampled) x (its contribution) + N(0, T sigma^2 C^2).

Two tests read those scores (`dpft.privacy.audit`): the one-run lower bound (Steinke, Nasr &
Jagielski 2023; no assumption, weak power) and the Gaussian test (the scores of the excluded
canaries measure the noise, the included ones the sensitivity; assumes a subsampled Gaussian
mechanism, strong power: `power` in docs/privacy.md). `test="both"` (the default) fails when
either does.

Canary patients (`images_per_canary` k > 1): each canary has k images. With `unit="patient"` the
run is patient-level (one clipped gradient per canary from its k images) and the claim is the
run's epsilon per patient. With `unit="example"` each image is sampled and clipped on its own, and
the claim is still that example-level epsilon: the one-run test then measures what a patient with k
images really gets, and fails for k large enough (a per-image epsilon is not a per-patient one);
the Gaussian test does not apply (its model samples a canary as a whole).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

from dpft.config.fields import FLOAT, INT, STR, Range
from dpft.config.options import dataclass_problems, option
from dpft.config.schema import FIELDS as RUN_FIELDS
from dpft.data import canaries
from dpft.privacy import limits
from dpft.privacy.audit import GaussianAudit, best_guess_bound, gaussian_audit, guess_counts

MAX_SEED = limits.MAX_SEED  # seeds are uint32
_UNIT_OPEN = Range(0.0, 1.0, low_open=True, high_open=True)  # (0, 1)
TESTS = ("both", "one_run", "gaussian")
#: |z| of the canary model's logit stays below this (the learning rate is chosen for it), so every canary
#: gradient is FEATURE_SCALE sigmoid(-z) >= 0.49 FEATURE_SCALE: clipped to exactly C.
MAX_LOGIT = 0.01


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What the audit trains (plain data, a dataclass: `dpft audit`'s options, no saved config to
    upgrade). Each field's record (`dpft.config.fields.option`: kind, range, choices, doc) is checked by
    `problems`/`validate` and gives `dpft audit`'s options; the choices are those of the run config
    (compute dtypes, accountants, engines).

    clipping_mode: a mode of `dpft.privacy.clipping.MODES` whose record says the audit supports it
      ("flat"; "none" = non-private SGD).
    noise_scale_for_testing / sensitivity_scale_for_testing: != 1 break DP on purpose, to test that the
      audit can fail: the run trains with noise sigma * scale C (the first), or clips at scale * C with
      the noise of C (the second: the sensitivity error of an engine bug); the claim stays that of sigma.
    guess_fractions: the one-run test's (k+ = k-) candidates as fractions of m / 2 (Bonferroni over them).
    """

    num_canaries: int = option(4096, INT, "number of canaries m", range=Range(2, canaries.MAX_CANARIES))
    steps: int = option(100, INT, "optimizer updates T", range=Range(1, 10**6))
    sampling_rate: float = option(0.1, FLOAT, "Poisson rate q", range=Range(0.0, 1.0, low_open=True))
    epsilon: float | None = option(1.0, FLOAT, "target epsilon; the noise multiplier is calibrated to it",
                                   nullable=True)
    noise_multiplier: float | None = option(None, FLOAT, "use this sigma instead of calibrating to the epsilon "
                                            "(0 = no noise)", range=Range(0.0), nullable=True)
    delta: float = option(1e-5, FLOAT, "delta", range=_UNIT_OPEN)
    clip_norm: float = option(1.0, FLOAT, "clip norm C", range=Range(0.0, low_open=True))
    clipping_mode: str = "flat"
    test: str = option("both", STR, "the statistical test: one_run (no assumption, weak), gaussian (subsampled "
                       "Gaussian model, strong) or both (fails if either does)", choices=TESTS)
    noise_scale_for_testing: float = option(1.0, FLOAT, "scales the noise: != 1 breaks DP (testing the audit only)",
                                            range=Range(0.0, low_open=True))
    sensitivity_scale_for_testing: float = option(1.0, FLOAT, "clips at scale x C with the noise of C: != 1 breaks "
                                                  "DP (testing the audit only)", range=Range(0.0, low_open=True))
    confidence: float = option(0.95, FLOAT, "confidence of the bound", range=_UNIT_OPEN)
    accountant: str = option("pld", STR, "the accountant of the claimed epsilon",
                             choices=RUN_FIELDS["privacy.accountant"].choices)
    physical_batch_size: int = option(128, INT, "privacy units per physical batch", range=Range(1))
    unit: str = option("example", STR, "the privacy unit of the audited run (example | patient)",
                       choices=RUN_FIELDS["privacy.unit"].choices)
    images_per_canary: int = option(1, INT, "images of each canary (a canary patient when > 1)", range=Range(1, 64))
    seed: int = option(0, INT, "public seed of canary inclusion (the noise secret is fresh per run)",
                       range=Range(0, MAX_SEED))
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
        from dpft.models.canary import MAX_CLIP_NORM

        if self.clip_norm * self.sensitivity_scale_for_testing > MAX_CLIP_NORM:
            out.append(("clip_norm", self.clip_norm, f"clip_norm x sensitivity_scale_for_testing must be <= "
                        f"{MAX_CLIP_NORM:g} (the canary model's gradients must be clipped)"))
        return out

    def validate(self) -> None:
        """ValueError naming the first invalid field (`problems`)."""
        for name, value, problem in self.problems():
            raise ValueError(f"audit config: {name}={value!r}: {problem}")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of `run_audit`. passed: no test of `test` rejects the claim (the one-run bound and the
    Gaussian bound <= epsilon_claimed)."""

    epsilon_lower_bound: float  # the one-run test's
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
    test: str = "both"
    sampling_rate: float = 0.0  # the run's q = B / N
    one_run_passed: bool = True
    #: The Gaussian test (`dpft.privacy.audit.GaussianAudit.to_dict`); None where it does not apply.
    gaussian: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clipping_record(config: AuditConfig):
    """The `dpft.privacy.clipping.ClippingMode` of `config.clipping_mode` (UsageError if unknown)."""
    from dpft.privacy import clipping

    return clipping.get(config.clipping_mode)


def _audited_modes(private: bool | None = None) -> str:
    from dpft.privacy import clipping

    return ", ".join(repr(n) for n in clipping.names(audit=True, private=private))


def units_per_canary(config: AuditConfig) -> int:
    """Privacy units of one canary: its k images at the example level, 1 for a canary patient."""
    return config.images_per_canary if config.unit == "example" else 1


def run_config(config: AuditConfig, noise_multiplier: float, *, num_devices: int):
    """The run config `dpft train` would train for the audit: canary data and model, plain SGD at a
    learning rate that keeps every canary clipped (`learning_rate`), the audit's privacy settings
    (broken on purpose by the *_for_testing scales), no EMA, one checkpoint at the end."""
    from dpft.config.schema import base_config

    mode = _clipping_record(config)
    m, k = config.num_canaries, config.images_per_canary
    n_units = int(canaries.canary_inclusion(m, config.seed).sum()) * units_per_canary(config)
    size = canaries.image_size(m)
    c = base_config(locked=False)
    c.seed = config.seed
    c.model.name = f"canary_linear_{size}"
    c.model.dtype = config.dtype
    c.data.name = "canaries"
    c.data.options = {"num_canaries": m, "images_per_canary": k, "seed": config.seed}
    c.data.image_size = c.data.eval_image_size = size
    c.data.random_crop = c.data.random_flip = False
    c.data.augmult = 1
    c.privacy.enabled = mode.private
    if mode.private:  # a non-private run (clipping "none") is privacy.enabled=False
        c.privacy.clipping = config.clipping_mode
    c.privacy.clip_norm = config.clip_norm * config.sensitivity_scale_for_testing
    c.privacy.epsilon = None
    c.privacy.noise_multiplier = (noise_multiplier * config.noise_scale_for_testing
                                  / config.sensitivity_scale_for_testing) if mode.private else 0.0
    c.privacy.delta = config.delta
    c.privacy.accountant = config.accountant
    c.privacy.unit = config.unit
    c.privacy.unit_cap = k if config.unit == "patient" else 0
    c.privacy.insecure_fixed_noise_seed = config.insecure_fixed_noise_seed
    batch = max(1, int(round(config.sampling_rate * n_units)))
    c.train.batch_size = batch
    physical = max(num_devices, config.physical_batch_size // num_devices * num_devices)
    c.train.physical_batch_size = physical
    c.train.microbatch_size = physical // num_devices
    c.train.grad_method = config.grad_method
    c.train.num_updates = config.steps
    c.train.optimizer.name = "sgd"
    c.train.optimizer.learning_rate = learning_rate(config, noise_multiplier, batch / n_units, batch)
    c.train.optimizer.momentum = 0.0
    c.train.optimizer.weight_decay = 0.0
    c.train.lr_schedule.name = "constant"
    c.train.lr_schedule.warmup_steps = 0
    c.train.ema_decay = 0.0
    c.train.polyak = False
    c.train.eval_every = 0
    c.train.checkpoint_every = config.steps
    c.train.keep_checkpoints = 1
    c.train.log_every = max(1, config.steps // 10)
    c.eval.splits = ("test",)
    c.eval.params = "raw"
    c.individual.enabled = False
    c.lock()
    return c


def learning_rate(config: AuditConfig, noise_multiplier: float, q: float, batch: int) -> float:
    """The SGD step size that keeps the canary model's logit below MAX_LOGIT over the run (a bound on the
    canary's coordinate: every update's contribution plus four noise standard deviations), so that
    every canary gradient stays clipped."""
    from dpft.models.canary import FEATURE_SCALE

    private = _clipping_record(config).private
    per_update = (config.clip_norm * config.sensitivity_scale_for_testing if private else FEATURE_SCALE)
    noise = noise_multiplier * config.noise_scale_for_testing * config.clip_norm if private else 0.0
    t, k = config.steps, config.images_per_canary
    reach = per_update * (k * t * min(1.0, 3 * q) + k) + 4 * noise * math.sqrt(t)
    return MAX_LOGIT * batch / (FEATURE_SCALE * reach)


def train_canaries(config: AuditConfig, noise_multiplier: float, *, workdir: str | None = None,
                   print_fn: Callable[..., None] = lambda *a, **k: None) -> tuple[np.ndarray, Any]:
    """Trains the canary run with the production Trainer; returns (scores float64 [m], plan).

    Score of canary i: (w_T - w_0)_i B / lr, in units of the clip norm's scale (the sum of its clipped
    contributions over the updates it was sampled in, plus the noise's coordinate i). `workdir`: where
    the run is written (kept); None: a temporary directory, removed after.
    """
    import jax

    from dpft.models import canary as canary_model
    from dpft.train import loop

    cfg = run_config(config, noise_multiplier, num_devices=jax.local_device_count())
    where = workdir or tempfile.mkdtemp(prefix="dpft-audit-")
    try:
        trainer = loop.Trainer(cfg, os.path.join(where, "run") if workdir is None else where, print_fn=print_fn)
        w0 = np.asarray(jax.device_get(canary_model.weight_of_pixels(trainer.state["params"])), np.float64)
        trainer.run()
        w_t = np.asarray(jax.device_get(canary_model.weight_of_pixels(trainer.state["params"])), np.float64)
    finally:
        if workdir is None:
            shutil.rmtree(where, ignore_errors=True)
    scale = float(trainer.plan.expected_batch_size) / float(cfg.train.optimizer.learning_rate)
    return (w_t - w0)[:config.num_canaries] * scale, trainer.plan


def claimed_epsilon(config: AuditConfig, noise_multiplier: float, sampling_rate: float) -> float:
    """The accountant's epsilon for the run as intended (inf for a non-private run): the run's q, the
    audit's sigma (not the scaled one a *_for_testing scale trains with)."""
    from dpft.privacy import accounting

    if not _clipping_record(config).private or noise_multiplier == 0:
        return math.inf
    return accounting.compute_epsilon(sampling_rate, noise_multiplier, config.steps, config.delta, config.accountant)


def resolve_noise_multiplier(config: AuditConfig) -> float:
    """Explicit sigma, else calibrated to config.epsilon for (q, steps, delta)."""
    from dpft.privacy import accounting

    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return accounting.calibrate_noise_multiplier(config.epsilon, config.sampling_rate, config.steps,
                                                 config.delta, config.accountant)


def gaussian_power(config: AuditConfig, noise_multiplier: float, power: float = 0.9) -> dict[str, float]:
    """The Gaussian test's power at `config` (simulated, `dpft.privacy.audit.smallest_detected_break`; half
    the canaries included): {"sensitivity": the smallest sensitivity / C, "noise": the largest noise /
    (sigma C) it detects in `power` of runs}."""
    from dpft.privacy.audit import smallest_detected_break

    half = config.num_canaries // 2
    args = dict(num_included=half, num_excluded=config.num_canaries - half, sampling_rate=config.sampling_rate,
                steps=config.steps, noise_multiplier=noise_multiplier, confidence=config.confidence, power=power)
    return {kind: smallest_detected_break(kind=kind, **args) for kind in ("sensitivity", "noise")}


def run_audit(config: AuditConfig | Mapping[str, Any], *, workdir: str | None = None,
              print_fn: Callable[..., None] = lambda *a, **k: None) -> AuditResult:
    """One training run with m canaries -> the tests' epsilon lower bounds vs the claim."""
    if not isinstance(config, AuditConfig):
        config = AuditConfig(**dict(config))
    config.validate()
    sigma = resolve_noise_multiplier(config)
    included = canaries.canary_inclusion(config.num_canaries, config.seed)
    scores, plan = train_canaries(config, sigma, workdir=workdir, print_fn=print_fn)
    claimed = claimed_epsilon(config, sigma, plan.sampling_rate)
    best = best_guess_bound(scores, included, delta=config.delta, confidence=config.confidence,
                            pairs=guess_counts(config.num_canaries, config.guess_fractions))
    one_run_passed = bool(best.epsilon_lower_bound <= claimed)
    gaussian = None
    if config.test != "one_run" and _clipping_record(config).private and units_per_canary(config) == 1:
        gaussian = gaussian_audit(scores[included], scores[~included], sampling_rate=plan.sampling_rate,
                                  steps=config.steps, clip_norm=config.clip_norm, noise_multiplier=sigma,
                                  delta=config.delta, confidence=config.confidence, accountant=config.accountant,
                                  claimed_epsilon=claimed)
    passed = ((config.test == "gaussian" or one_run_passed)
              and (gaussian is None or config.test == "one_run" or gaussian.passed))
    return AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound, epsilon_claimed=claimed,
        num_canaries=config.num_canaries, num_guesses=best.num_guesses, correct=best.correct,
        passed=bool(passed), noise_multiplier=sigma, delta=config.delta,
        confidence=config.confidence, k_pos=best.k_pos, k_neg=best.k_neg, num_included=int(included.sum()),
        engine=plan.grad_method, test=config.test, sampling_rate=plan.sampling_rate, one_run_passed=one_run_passed,
        gaussian=None if gaussian is None else gaussian.to_dict())
