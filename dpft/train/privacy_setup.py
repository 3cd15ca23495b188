"""The privacy side of a run's set-up: its loss, clipping, secret and privacy plan from the config.

What the config builds apart from privacy (tables, augmentation, model) is `dpft.config.build`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dpft import distributed
from dpft.errors import UsageError
from dpft.privacy import adapters, clipping, engine, group, keys
from dpft.privacy import plan as plan_lib

log = logging.getLogger(__name__)

def per_view_loss(task: str) -> Callable:
    if task == "multiclass":
        return adapters.softmax_cross_entropy_loss
    if task == "multilabel":
        return adapters.sigmoid_binary_cross_entropy_loss
    raise UsageError(f"unknown task {task!r}")


def clipping_config(config: ml_collections.ConfigDict) -> engine.ClippingConfig:
    """The clipping of `config.privacy`: its mode with the hyper-parameters the mode's record reads
    from the run config (clip_norm, gamma, ...); "none" for the non-private baseline."""
    if not config.privacy.enabled:
        return engine.NO_CLIPPING
    mode = config.privacy.clipping
    return engine.ClippingConfig(mode=mode, **clipping.run_config_values(mode, config.privacy))


def run_secret(config: ml_collections.ConfigDict) -> keys.RunSecret:
    """A fresh CSPRNG secret, or the insecure fixed one of `privacy.insecure_fixed_noise_seed` (>= 0).

    Not multi-host aware: `shared_run_secret` draws it on process 0 and broadcasts it.
    """
    fixed = int(config.privacy.insecure_fixed_noise_seed)
    if fixed >= 0:
        return keys.RunSecret.insecure_fixed(fixed)
    return keys.RunSecret.generate()


def shared_run_secret(config: ml_collections.ConfigDict, print_fn: Callable[[str], None]) -> keys.RunSecret:
    """The run's secret on every process: `run_secret` drawn on process 0 and broadcast (a collective:
    every process calls it at the same point); `print_fn` gets the warning of an insecure fixed one."""
    secret = run_secret(config)
    if jax.process_count() > 1 and secret.is_secure:
        words = distributed.together(multihost_utils.broadcast_one_to_all, "secret")(secret.to_words())
        secret = keys.RunSecret.from_words(np.asarray(words), secret.source)
    if not secret.is_secure:
        print_fn("WARNING: config.privacy.insecure_fixed_noise_seed is set: the noise and the batch "
                 "selection are a public function of it; this run has NO privacy guarantee")
    return secret


def privacy_plan(config: ml_collections.ConfigDict, num_examples: int, params: Any,
                 secret: keys.RunSecret, patient_ids: Sequence[str] | None = None) -> plan_lib.PrivacyPlan:
    """The run's privacy plan (`dpft.privacy.plan.make_plan`) from `config.privacy` and `config.train`;
    with the training examples' `patient_ids` (one per example), a private plan also states the
    epsilon of the patient with the most images (`dpft.privacy.group`)."""
    p, t = config.privacy, config.train
    try:
        plan = plan_lib.make_plan(
            enabled=bool(p.enabled), num_examples=int(num_examples), batch_size=float(t.batch_size),
            num_updates=int(t.num_updates), clipping=clipping_config(config), params=params, secret=secret,
            epsilon=float(p.epsilon) if p.epsilon else None,
            noise_multiplier=float(p.noise_multiplier) if p.noise_multiplier else None,
            delta=float(p.delta) if p.delta else None, accountant=str(p.accountant),
            grad_method=str(t.grad_method))
    except plan_lib.PlanError as e:
        raise UsageError(f"invalid privacy plan (config.privacy, config.train): {e}") from None
    if patient_ids is None or not plan.enabled or plan.noise_multiplier == 0:
        return plan
    counts = group.PatientCounts.from_ids(patient_ids)
    report = group.patient_report(counts, plan.sampling_rate, plan.noise_multiplier, plan.num_updates, plan.delta,
                                  run_epsilon=plan.epsilon_after(plan.num_updates))
    return dataclasses.replace(plan, patients=report)
