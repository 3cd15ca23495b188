"""NFNet-F3 fine-tuned with DP-SGD on imagenet (De et al. 2022 recipe, see _large_scale.py).

    dpft train --config configs/imagenet_nfnet_f3.py --workdir runs/imagenet_eps8 \
        --config.data.root=/data/tfds --config.model.checkpoint=/ckpt/F3_haiku.npz
    --config.privacy.epsilon=1                 # paper set {0.5, 1, 2, 4, 8}
    --config.train.batch_size=262144           # the papers' largest batch (accumulation)
    --config.privacy.enabled=False             # the non-private baseline

WARNING: DeepMind's published F3_haiku.npz was pre-trained on ImageNet itself, so fine-tuning it
"privately" on ImageNet protects nothing (the paper pre-trains on JFT-300M, which is not public).
Use a checkpoint pre-trained on data disjoint from ImageNet for a meaningful private run.
"""
from configs import _large_scale as _recipe
PAPER_EPSILONS = _recipe.PAPER_EPSILONS


def get_config(arg=None):
    return _recipe.finalize(_recipe.large_scale_config("imagenet", arg))
