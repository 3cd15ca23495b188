"""The privacy plan of a run config: its clipping and its `PrivacyPlan`, computed from the config and
the training data exactly as `dpft train` computes them. Training builds its plan here, and
`dpft evaluate` rebuilds it to check a checkpoint's plan and ledger (`dpft.workdir.contract`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections

from dpft.errors import UsageError
from dpft.privacy import clipping, engine, group, keys, units
from dpft.privacy import plan as plan_lib


def clipping_config(config: ml_collections.ConfigDict) -> engine.ClippingConfig:
    """The clipping of `config.privacy`: its mode with the hyper-parameters the mode's record reads
    from the run config (clip_norm, gamma, ...); "none" for the non-private baseline."""
    if not config.privacy.enabled:
        return engine.NO_CLIPPING
    mode = config.privacy.clipping
    return engine.ClippingConfig(mode=mode, **clipping.run_config_values(mode, config.privacy))


def grad_method(config: ml_collections.ConfigDict) -> str:
    """`config.train.grad_method`, except that "auto" picks "vmap" for `train.trainable="lora:<r>"`
    (its factors are not parameters of a tapped layer: `dpft.config.validation` refuses "bookkeeping")."""
    method = str(config.train.grad_method)
    if method == "auto" and str(config.train.trainable).startswith("lora:"):
        return "vmap"
    return method


def privacy_plan(config: ml_collections.ConfigDict, num_examples: int, params: Any,
                 secret: keys.RunSecret, patient_ids: Sequence[str] | None = None,
                 unit_index: units.UnitIndex | None = None) -> plan_lib.PrivacyPlan:
    """The run's privacy plan (`dpft.privacy.plan.make_plan`) from `config.privacy` and `config.train`
    over `num_examples` privacy units (rows, or patients for `privacy.unit="patient"`:
    `dpft.config.build.num_units`). Example-level with the training examples' `patient_ids` (one per
    example): a private plan also states the epsilon of the patient with the most images
    (`dpft.privacy.group`). Patient-level with the run's `unit_index`: the plan states its units and cap."""
    p, t = config.privacy, config.train
    try:
        plan = plan_lib.make_plan(
            enabled=bool(p.enabled), num_examples=int(num_examples), batch_size=float(t.batch_size),
            num_updates=int(t.num_updates), clipping=clipping_config(config), params=params, secret=secret,
            epsilon=float(p.epsilon) if p.epsilon else None,
            noise_multiplier=float(p.noise_multiplier) if p.noise_multiplier else None,
            delta=float(p.delta) if p.delta else None, accountant=str(p.accountant),
            grad_method=grad_method(config), mechanism=str(p.mechanism), bands=int(p.bandmf.bands),
            strategy=str(p.bandmf.strategy))
    except plan_lib.PlanError as e:
        raise UsageError(f"invalid privacy plan (config.privacy, config.train): {e}") from None
    plan = dataclasses.replace(plan, unit=str(p.unit))
    if plan.unit != "example":
        return plan if unit_index is None else dataclasses.replace(plan, patients=unit_index.summary())
    if patient_ids is None or not plan.enabled or plan.noise_multiplier == 0:
        return plan
    counts = group.PatientCounts.from_ids(patient_ids)
    if plan.mechanism != "dpsgd" and counts.max_images > 1:  # group privacy is computed for DP-SGD only
        report = {"count": counts.num_patients, "max_images": counts.max_images,
                  "images_per_patient": {str(n): m for n, m in counts.histogram.items()},
                  "epsilon_of_the_patient_with_the_most_images": None,
                  "not_computed": f"privacy.mechanism={plan.mechanism!r}: a patient's group epsilon is computed for "
                                  f"dpsgd only; use privacy.unit='patient' for a per-patient guarantee"}
        return dataclasses.replace(plan, patients=report)
    report = group.patient_report(counts, plan.sampling_rate, plan.noise_multiplier, plan.num_updates, plan.delta,
                                  run_epsilon=plan.epsilon_after(plan.num_updates))
    return dataclasses.replace(plan, patients=report)
