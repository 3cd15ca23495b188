"""The privacy side of a run's set-up: its loss and its secret (drawn once, shared by every process).

The clipping and the privacy plan of a config are `dpft.config.run_plan`; what the config builds
apart from privacy (tables, augmentation, model) is `dpft.config.build`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dpft import distributed
from dpft.errors import UsageError
from dpft.privacy import adapters, keys
from dpft.privacy.plan import PrivacyPlan

log = logging.getLogger(__name__)


def per_view_loss(task: str) -> Callable:
    if task == "multiclass":
        return adapters.softmax_cross_entropy_loss
    if task == "multilabel":
        return adapters.sigmoid_binary_cross_entropy_loss
    raise UsageError(f"unknown task {task!r}")


def run_secret(config: ml_collections.ConfigDict) -> keys.RunSecret:
    """A fresh CSPRNG secret, or the insecure fixed one of `privacy.insecure_fixed_noise_seed` (>= 0).

    Not multi-host aware: `shared_run_secret` draws it on process 0 and broadcasts it.
    """
    fixed = int(config.privacy.insecure_fixed_noise_seed)
    if fixed >= 0:
        return keys.RunSecret.insecure_fixed(fixed)
    return keys.RunSecret.generate()


def shared_strategy(plan: PrivacyPlan) -> PrivacyPlan:
    """`plan` with process 0's BandMF strategy coefficients on every process (a collective when several
    processes run BandMF: every process calls it at the same point). Each process optimises the strategy
    itself, and another CPU or GPU may give other last bits; the coefficients are compiled into the noise
    step, so every replica must use the same ones. Sent bit for bit (float64 as uint32 words)."""
    if jax.process_count() == 1 or plan.mechanism != "bandmf":
        return plan
    words = np.asarray(plan.strategy.coefs, "<f8").view("<u4")
    words = distributed.together(multihost_utils.broadcast_one_to_all, "strategy")(words)
    coefs = np.asarray(words, "<u4").view("<f8")
    if tuple(float(c) for c in coefs) == plan.strategy.coefs:
        return plan
    return dataclasses.replace(plan, strategy=plan.strategy.with_coefs(coefs, plan.num_updates))


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
