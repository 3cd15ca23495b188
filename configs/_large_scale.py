"""Shared recipe of the ImageNet / Places-365 configs: NFNet-F3 fine-tuning with DP-SGD.

Sources: De, Berrada, Hayes, Smith, Balle (2022), "Unlocking High-Accuracy Differentially
Private Image Classification through Scale", arXiv:2204.13650 (ImageNet, NFNet-F3
pre-trained on JFT, (epsilon, 8e-7)-DP for epsilon in {0.5, 1, 2, 4, 8}; Places-365 in
Berrada et al. 2023, arXiv:2308.10888, with the same recipe):
  - batch size 16384 by default; the largest batch of the papers, 262,144
    (`--config.train.batch_size=262144`), is reached by gradient accumulation: the loop
    runs as many physical batches per update as the Poisson batch needs;
  - augmentation multiplicity K = 16, clipping norm C = 1, delta = 8e-7;
  - SGD without momentum, no weight decay, EMA of the parameters with decay 0.9999
    (evaluated with the EMA parameters);
  - a constant learning rate (no decay).
DeepMind's public NFNet checkpoints (https://storage.googleapis.com/dm-nfnets/F3_haiku.npz)
were pre-trained on ImageNet: fine-tuning them privately on ImageNet protects nothing (fine on
Places-365); see docs/data.md ("Pre-trained checkpoints").
Resolution: NFNet-F3's own train/eval resolutions (320/416, Brock et al. 2021).
Values marked (ours) could not be checked against the papers' tables while writing this
file and should be tuned: learning rate and number of updates per epsilon.
"""
from dpft.config.base import apply_config_arg, base_config, finalize

PAPER_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
LARGEST_PAPER_BATCH = 262_144
ALIASES = {"eps": "privacy.epsilon", "steps": "train.num_updates", "batch": "train.batch_size"}


def large_scale_config(data_name: str, arg=None):
    """The NFNet-F3 recipe on `data_name` ("imagenet" | "places365").

    Only what differs from `base_config` is set. From the base: DP on at epsilon 8 (paper set:
    PAPER_EPSILONS), C = 1, flat clipping, sigma calibrated from epsilon, PLD accounting, plain SGD
    without momentum or weight decay, constant learning rate, random crops and flips, EMA params.
    """
    c = base_config(locked=False)
    c.model.name = "nfnet_f3"
    c.model.dtype = "bfloat16"
    c.data.name = data_name
    c.data.image_size = 320
    c.data.eval_image_size = 416
    c.data.augmult = 16
    c.data.num_workers = 32

    c.privacy.delta = 8e-7

    c.train.batch_size = 16_384
    c.train.physical_batch_size = 128  # per host per step (8 accelerators x 16)
    c.train.num_updates = 2500  # (ours)
    c.train.optimizer.learning_rate = 4.0  # (ours)
    c.train.ema_decay = 0.9999
    c.train.eval_every = 500

    c.eval.splits = ("validation", "test")  # "test" = the official validation set (dpft.data)
    apply_config_arg(c, arg, ALIASES)
    return c


__all__ = ["PAPER_EPSILONS", "LARGEST_PAPER_BATCH", "large_scale_config", "finalize"]
