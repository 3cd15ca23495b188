"""A tiny NFNet on a fake CheXpert copy (dpft.data.fake) for the end-to-end test; seconds on CPU.

    dpft train --config configs/fake_chexpert_tiny.py --workdir /tmp/e2e --config.data.root=/tmp/fake_chexpert

Shapes are chosen for 8 fake CPU devices: physical batch 16 = 8 devices x 2, microbatch 2.
"""
from dpft.config.base import apply_config_arg, base_config, finalize

ALIASES = {"eps": "privacy.epsilon", "steps": "train.num_updates", "root": "data.root"}


def get_config(arg=None):
    c = base_config(locked=False)
    c.model.name = "nfnet_tiny"
    c.data.name = "chexpert"
    c.data.augmult = 2
    c.data.options.uncertainty = "ones"  # dpft.data.chexpert.CheXpertOptions keys
    c.data.options.frontal_only = True
    c.data.options.age_edges = (18, 40, 60, 80)

    c.privacy.clip_norm = 1e-3

    c.train.batch_size = 16
    c.train.physical_batch_size = 16
    c.train.microbatch_size = 2
    c.train.num_updates = 4
    c.train.optimizer.learning_rate = 4.0
    c.train.ema_decay = 0.9
    c.train.polyak = True
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.train.keep_checkpoints = 2

    c.eval.batch_size = 16
    c.eval.splits = ("validation", "test")
    c.individual.every = 2
    apply_config_arg(c, arg, ALIASES)
    return finalize(c)
