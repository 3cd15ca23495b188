"""ViT-B/16 (AugReg / big_vision checkpoint) fine-tuned with DP-SGD on CheXpert.

The chest X-ray recipe of _medical.py (Berrada et al. 2023: batch 4096, C = 1e-3, SGD without
momentum, EMA, delta = 1/N) with the model swapped for a ViT-B/16 at 224 px, the resolution of
the AugReg pre-training (Steiner et al. 2022). The classifier head is replaced by a zero head
(the checkpoint's 21k/1k classes differ from the 5 CheXpert tasks), as in DP fine-tuning of
ViTs (e.g. Mehta et al. 2022, arXiv:2205.02973). Values marked (ours) are not from a paper.

    dpft train --config configs/chexpert_vit_b16.py --workdir runs/chexpert_vit_eps8 \
        --config.data.root=/data/chexpert \
        --config.model.checkpoint=/ckpt/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz
    --config.privacy.epsilon=1 (or configs/chexpert_vit_b16.py:eps=1)   --config.privacy.enabled=False
"""
from configs import _medical
from dpft.config.base import apply_config_arg, finalize

PAPER_EPSILONS = _medical.PAPER_EPSILONS


def get_config(arg=None):
    c = _medical.medical_config("chexpert", None, options={"frontal_only": True})
    c.model.name = "vit_b16"  # the position-embedding grid is built for 224 px
    c.data.image_size = 224  # (ours) the pre-training resolution; the ViT refuses other sizes
    c.data.eval_image_size = 224
    c.train.microbatch_size = 16  # (ours) ViT-B/16 activations at 224 px
    apply_config_arg(c, arg, _medical.ALIASES)
    return finalize(c)
