"""A micro ViT on a fake CheXpert copy (dpft.data.fake) for the end-to-end ViT test; seconds on CPU.

    dpft train --config configs/fake_chexpert_vit_micro.py --workdir /tmp/e2e_vit \
        --config.data.root=/tmp/fake_chexpert [--config.model.checkpoint=/tmp/vit_micro.npz]

The tiny NFNet recipe (fake_chexpert_tiny.py) with `vit_micro` (32 px, 8x8 patches).
"""
from configs import fake_chexpert_tiny as _tiny
from dpft.config.base import apply_config_arg, finalize


def get_config(arg=None):
    c = _tiny.get_config(None)
    c.model.name = "vit_micro"
    c.data.image_size = 32  # vit_micro's grid is built for 32 px
    c.data.eval_image_size = 32
    apply_config_arg(c, arg, _tiny.ALIASES)
    return finalize(c)
