"""NFNet-F3 fine-tuned with DP-SGD on places365 (De et al. 2022 recipe, see _large_scale.py).

    dpft train --config configs/places365_nfnet_f3.py --workdir runs/places365_eps8 \
        --config.data.root=/data/tfds --config.model.checkpoint=/ckpt/F3_haiku.npz
    --config.privacy.epsilon=1                 # paper set {0.5, 1, 2, 4, 8}
    --config.train.batch_size=262144           # the papers' largest batch (accumulation)
    --config.privacy.enabled=False             # the non-private baseline
"""
from configs import _large_scale as _recipe
PAPER_EPSILONS = _recipe.PAPER_EPSILONS


def get_config(arg=None):
    return _recipe.finalize(_recipe.large_scale_config("places365", arg))
