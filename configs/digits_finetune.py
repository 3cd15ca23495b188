"""Step 2 of the digits recipe: DP fine-tuning (or the non-private baseline) from the public model,
on the private split where the minority (digits rotated by 90 degrees) is rare.

    dpft train --config configs/digits_finetune.py --workdir runs/digits/eps4 \
        --config.model.checkpoint=runs/digits/public/checkpoints/150/params --config.privacy.epsilon=4.98
    dpft train --config configs/digits_finetune.py:private=False ...      # the non-private baseline

The same runs as `dpft demo` step 2 (`dpft.demo.recipe.recipe`): DP-SGD (plain SGD, lr 0.5, EMA 0.9,
augmult 2, C=1, Poisson sampling, expected batch 128, 40 updates); the non-private baseline
uses Adam (lr 1e-3) without clipping or noise on the same code path. The imbalance study sweeps
`data.options.minority_fraction` x `privacy.epsilon` x `seed` with `launch/sweep.py` (README).
Config argument: `private=True|False`, `eps=E`, `frac=F` (minority fraction), `seed=S`,
`updates=N`, `checkpoint=PATH`, `individual=True|False` (individual accounting, default on for DP).
"""
from dpft.config.base import apply_config_arg, finalize

ALIASES = {"eps": "privacy.epsilon", "frac": "data.options.minority_fraction", "seed": "seed",
           "updates": "train.num_updates", "checkpoint": "model.checkpoint", "individual": "individual.enabled"}
FINETUNE_UPDATES = 40


def get_config(arg=None):
    from dpft.errors import UsageError
    from dpft.demo.recipe import recipe

    items = [s for s in (arg or "").split(",") if s.strip()]
    private = True
    rest = []
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() == "private":
            if value.strip() not in ("True", "False", "true", "false", "1", "0"):
                raise UsageError(f"config argument private={value!r}: expected True or False")
            private = value.strip() in ("True", "true", "1")
        else:
            rest.append(item)
    c = recipe(private=private, epsilon=8.0, updates=FINETUNE_UPDATES, checkpoint="", minority_fraction=0.05)
    apply_config_arg(c, ",".join(rest), ALIASES)
    return finalize(c)
