"""Step 1 of the digits recipe: non-private "public" pre-training of a tiny NFNet on upright digits.

    dpft train --config configs/digits_pretrain.py --workdir runs/digits/public
    # its parameters, the checkpoint of step 2: runs/digits/public/checkpoints/150/params

The same run as `dpft demo` step 1 (`dpft.demo.recipe.recipe`): 150 updates of Adam on the public split
(20% of the 1,797 digits, no rotated digits). Config argument: `updates=N`, `seed=S`.
"""
from dpft.config.base import apply_config_arg, finalize

ALIASES = {"updates": "train.num_updates", "seed": "seed"}
PRETRAIN_UPDATES = 150


def get_config(arg=None):
    from dpft.demo.recipe import recipe

    c = recipe(private=False, updates=PRETRAIN_UPDATES, train_split="public", minority_fraction=0.0,
               learning_rate=3e-3)
    with c.unlocked():
        c.train.checkpoint_every = PRETRAIN_UPDATES
    apply_config_arg(c, arg, ALIASES)
    return finalize(c)
