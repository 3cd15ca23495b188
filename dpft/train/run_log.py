"""What a training run reports: its announcement, each update's statistics, each logging window, the end.

Per-update statistics of private batches (realised batch size, training loss/accuracy, clipped
fraction) are not covered by the DP guarantee: in a private run they go only to the owner-only
WORKDIR/private/update_stats.jsonl; the public outputs (metrics files, TensorBoard, progress line)
carry what the guarantee covers (the noisy gradient's norm, epsilon) and rates at the expected
batch size. Where the plan has no guarantee (public noise: `PrivacyPlan.guarantee_valid`), every epsilon
they show says so (`contract.mark_epsilon`): the start-up and progress lines, metrics.jsonl/csv
(`guarantee_valid` beside `epsilon`), TensorBoard (tag `contract.EPSILON_TAG_NO_GUARANTEE`) and the
final line.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpft.privacy.plan import PrivacyPlan
from dpft.train import logging_utils
from dpft.workdir import contract

#: The sums of update statistics a logging window adds up.
WINDOW_KEYS = ("examples", "loss_sum", "accuracy_sum", "clipped")


def update_summary(stats: Sequence[Mapping[str, Any]], info: Mapping[str, Any], plan: PrivacyPlan) -> dict[str, float]:
    """Host statistics of one update from its physical batches' `stats` (norms, loss, mask, aux [B]) and
    `apply`'s `info`: examples, loss_sum, accuracy_sum, clipped (norm above C), grad_norm (noisy update)."""
    clip = plan.clip_norm if plan.enabled else np.inf
    # Four sums per physical batch, dispatched asynchronously; one transfer to the host.
    totals = sum((jnp.stack([jnp.sum(s["mask"]), jnp.sum(s["loss"]), jnp.sum(s.get("accuracy", 0.0)),
                             jnp.sum((s["norms"] > clip) * s["mask"])]) for s in stats),
                 jnp.zeros(4))
    n, loss, acc_sum, clipped = (float(x) for x in jax.device_get(totals))
    return {"examples": n, "loss_sum": loss, "accuracy_sum": acc_sum, "clipped": clipped,
            "grad_norm": float(info["grad_norm"])}


def empty_window() -> dict[str, float]:
    """A logging window with nothing in it yet."""
    return dict.fromkeys(WINDOW_KEYS, 0.0)


def add_to_window(window: dict[str, float], summary: Mapping[str, float]) -> None:
    """Adds one update's `update_summary` to `window`."""
    for k in window:
        window[k] += summary[k]


def log_window(u: int, window: Mapping[str, float], summary: Mapping[str, float], *, plan: PrivacyPlan,
               epsilon_spent: Callable[[], float], progress: logging_utils.Progress,
               writer: logging_utils.MetricWriter, private_writer: logging_utils.PrivateStatsWriter) -> None:
    """Logs the updates of `window` (up to update `u`, whose `summary` gives the noisy gradient's norm):
    private statistics apart in a private run (module docstring), public ones to the metric files."""
    n = max(window["examples"], 1.0)
    stats = {"loss": window["loss_sum"] / n, "train_accuracy": window["accuracy_sum"] / n,
             "clipped_fraction": window["clipped"] / n, "examples": window["examples"]}
    public: dict[str, Any] = {"grad_norm": summary["grad_norm"]}
    tags = {}
    if plan.enabled:
        eps, valid = epsilon_spent(), plan.guarantee_valid
        public.update(epsilon=eps, guarantee_valid=valid)
        if not valid:
            tags["epsilon"] = contract.EPSILON_TAG_NO_GUARANTEE
        private_writer.write(u, stats)
        updates = u - progress.last_step
        progress.log(u, examples=updates * plan.expected_batch_size, epsilon=eps, expected=True,
                     guarantee_valid=valid)
    else:
        public.update(stats)
        progress.log(u, examples=window["examples"], loss=stats["loss"])
    writer.write(u, public, tensorboard_tags=tags)


def announcement(plan: PrivacyPlan, config: ml_collections.ConfigDict) -> list[str]:
    """The lines a run prints when it starts afresh: its privacy plan and its device layout."""
    p = plan
    end_eps = p.epsilon_after(p.num_updates)  # one accountant call for both lines
    if p.enabled:
        mechanism = "DP-SGD" if p.mechanism == "dpsgd" else (
            f"BandMF (b={p.bands} bands and cyclic Poisson groups, strategy {p.strategy.source}: "
            f"{', '.join(f'{c:.4g}' for c in p.strategy.coefs)}, its sensitivity {p.strategy.sensitivity:.4g})")
        first = (f"{mechanism} per {p.unit}: N={p.num_examples} {p.unit}s, expected batch {p.expected_batch_size:g} (q={p.sampling_rate:.4g}), "
                 f"{p.num_updates} updates, sigma={p.noise_multiplier:.4f}, C={p.clip_norm:g} "
                 f"({p.clipping.mode}, sensitivity {p.sensitivity:g}), engine {p.grad_method}, "
                 f"delta={p.delta:.3g}, target epsilon={p.target_epsilon} ({p.accountant}); "
                 + contract.mark_epsilon(f"epsilon at the end {end_eps:.4g}", p.guarantee_valid))
    else:
        first = (f"non-private: N={p.num_examples}, expected batch {p.expected_batch_size:g}, "
                 f"{p.num_updates} updates (same code path, no clipping, no noise)")
    trained = f"trainable: {p.trained_text()}"  # "trainable: head, 1,290 of 51,470 parameters noised"
    return [first, trained, *patient_lines(p, end_eps), f"devices: {jax.device_count()} ({jax.process_count()} process(es)), "
                   f"physical batch {config.train.physical_batch_size} per host, "
                   f"microbatch {config.train.microbatch_size}, augmult {config.data.augmult}"]


def patient_lines(plan: PrivacyPlan, run_epsilon: float) -> list[str]:
    """The privacy unit, and the warning for data with several images per patient (`plan.patients`;
    `run_epsilon`: the plan's epsilon per image at the end)."""
    pt = plan.patients
    if not plan.enabled or not pt:
        return []
    mark = lambda line: contract.mark_epsilon(line, plan.guarantee_valid)  # noqa: E731
    if plan.unit == "patient":
        return [mark(f"privacy unit: the patient. {pt['num_units']} patients, {pt['num_rows']} images (up to "
                     f"{pt['max_rows_per_unit']} per patient); each update uses at most {pt['cap']} images of a "
                     f"sampled patient (privacy.unit_cap): {pt['units_over_cap']} patients have more, "
                     f"{100 * pt['fraction_of_rows_within_cap']:.1f}% of the images are within the cap; epsilon "
                     f"{run_epsilon:.4g} at delta {plan.delta:.3g} is per patient")]
    if pt["max_images"] == 1:
        return [f"privacy unit: one example; {pt['count']} patients with one image each: epsilon per patient = "
                f"epsilon per image"]
    eps = pt["epsilon_of_the_patient_with_the_most_images"]
    if eps is None:  # not computed (privacy.mechanism=bandmf): said, never printed as a number
        return [f"WARNING: privacy unit: one example (an image), not a patient. {pt['count']} patients with up to "
                f"{pt['max_images']} images; {pt['not_computed']}"]
    return [mark(f"WARNING: privacy unit: one example (an image), not a patient. {pt['count']} patients with up "
                 f"to {pt['max_images']} images: the patient with the most has epsilon {eps:.4g} at delta "
                 f"{plan.delta:.3g} (group privacy, PLD), not {run_epsilon:.4g} (privacy_plan.json: patients)")]


def final_line(final: Mapping[str, float], plan: PrivacyPlan, epsilon: float) -> str:
    """The last line of a completed run: its final metrics and epsilon."""
    if not plan.enabled:
        privacy = ", non-private"
    elif not plan.guarantee_valid:
        privacy = (f", NO privacy guarantee (secret: {plan.secret.source}; nominal epsilon {epsilon:.4g}, "
                   f"delta {plan.delta:.3g})")
    else:
        privacy = f", epsilon {epsilon:.4g} (delta {plan.delta:.3g})"
    return "final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()) + privacy
