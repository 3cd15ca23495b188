"""The demo's run config: a tiny NFNet on 32x32 digits (the same fields as configs/*.py).

`configs/digits_pretrain.py` and `configs/digits_finetune.py` are this recipe as config files.
"""
from __future__ import annotations

import ml_collections

MINORITY = "minority"  # the rare subgroup: digits rotated by 90 degrees
#: NFNets small enough for the demo on a CPU; nfnet_tiny is the demo's, nfnet_nano a faster smoke run.
MODELS = ("nfnet_tiny", "nfnet_micro", "nfnet_nano")
DEFAULT_MODEL = MODELS[0]


def recipe(*, private: bool, epsilon: float | None = 8.0, updates: int, checkpoint: str = "",
           train_split: str = "train", minority_fraction: float = 0.05, seed: int = 0,
           learning_rate: float = 1e-3, eval_minority_fraction: float = 0.1,
           num_devices: int | None = None, model: str = DEFAULT_MODEL, dataset: str = "digits",
           unit: str = "example", batch_size: int = 128, noise_multiplier: float = 0.0,
           delta: float = 0.0) -> ml_collections.ConfigDict:
    """The demo's run config: tiny NFNet on 32x32 digits; the same fields as configs/*.py.

    The privacy-unit study trains on `dataset="digits_patients"` (the digits grouped into patients)
    with `unit` "example" or "patient", a `batch_size` in units and, for the example-level run, the
    `noise_multiplier` that gives its patients the patient-level run's epsilon (`epsilon` None).

    The physical batch (64 examples per host) is split over `num_devices` local devices
    (default: all of them); the microbatch is the largest divisor of the per-device share <= 16.
    """
    from dpft.config.base import base_config

    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()
    physical = max(64, num_devices) // num_devices * num_devices
    per_device = physical // num_devices
    microbatch = max(d for d in range(1, min(16, per_device) + 1) if per_device % d == 0)

    c = base_config(locked=False)
    c.seed = seed
    if model not in MODELS:
        raise ValueError(f"demo recipe: model {model!r} is not one of {MODELS}")
    c.model.name = model
    c.model.checkpoint = checkpoint
    c.data.name = dataset
    c.data.augmult = 2 if private else 1
    c.data.random_flip = False  # digits are not mirror-symmetric
    c.data.options = ml_collections.ConfigDict({
        # public / private train / validation / test shares of the 1,797 digits
        "split_fractions": (0.2, 0.55, 0.1, 0.15),
        "minority_fraction": minority_fraction, "eval_minority_fraction": eval_minority_fraction})
    c.data.train_split = train_split
    c.data.crop = "pad_crop"
    c.privacy.enabled = private
    c.privacy.epsilon = epsilon
    c.privacy.noise_multiplier = noise_multiplier
    c.privacy.delta = delta
    c.privacy.unit = unit
    c.train.batch_size = batch_size
    c.train.physical_batch_size = physical
    c.train.microbatch_size = microbatch  # 8-16: the fastest DP step on CPU (benchmarks/README.md)
    c.train.num_updates = updates
    # DP-SGD as in the papers: plain SGD (no momentum), a large step on the clipped, noisy mean
    # (its norm is bounded by C), and an EMA. Adam would normalise the noise away per
    # coordinate, so runs at different epsilons with one seed would take near-identical steps.
    # The non-private baseline's unclipped gradients need Adam's small steps.
    c.train.optimizer.name = "sgd" if private else "adam"
    c.train.optimizer.learning_rate = 0.5 if private else learning_rate
    c.train.ema_decay = 0.9 if private else 0.0
    c.train.eval_every = 0
    c.train.checkpoint_every = max(updates // 2, 1)
    c.train.log_every = max(updates // 4, 1)
    c.train.keep_checkpoints = 2
    c.eval.params = "ema" if c.train.ema_decay > 0 else "raw"
    c.individual.enabled = private
    c.individual.every = max(updates // 4, 1)
    c.individual.norm_grid = 0.01
    c.lock()
    return c
