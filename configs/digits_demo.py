"""Demo: a tiny NFNet trained from scratch with DP-SGD on the embedded digits data (CPU, minutes).

    dpft train --config configs/digits_demo.py --workdir /tmp/dpft-digits
    dpft train --config configs/digits_demo.py:eps=2 --workdir ...      # config argument
    dpft train --config configs/digits_demo.py --workdir ... --config.privacy.enabled=False

Digits (scikit-learn's 8x8 images, 1,797 examples) are upsampled to `image_size`. The
hyper-parameters are small-and-fast choices for a CPU demo, not tuned results.
"""
from dpft.config.base import apply_config_arg, base_config, finalize

ALIASES = {"eps": "privacy.epsilon", "steps": "train.num_updates", "batch": "train.batch_size"}


def get_config(arg=None):
    c = base_config(locked=False)
    c.model.name = "nfnet_tiny"
    c.data.augmult = 2
    c.data.random_flip = False  # digits are not mirror-symmetric
    c.data.options.minority_fraction = 0.1  # dpft.data.digits.DigitsOptions: minority share in train


    c.train.microbatch_size = 8
    c.train.num_updates = 60
    c.train.optimizer.name = "momentum"
    c.train.optimizer.learning_rate = 0.5
    c.train.optimizer.momentum = 0.9
    c.train.lr_schedule.name = "warmup_cosine"
    c.train.lr_schedule.warmup_steps = 5
    c.train.ema_decay = 0.99
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.log_every = 5
    c.train.keep_checkpoints = 2

    c.eval.splits = ("validation", "test")
    apply_config_arg(c, arg, ALIASES)
    return finalize(c)
