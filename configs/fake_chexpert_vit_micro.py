"""A micro ViT on a fake CheXpert copy (dpft.data.fake) for the end-to-end ViT test; seconds on CPU.

    dpft train --config configs/fake_chexpert_vit_micro.py --workdir /tmp/e2e_vit \
        --config.data.root=/tmp/fake_chexpert [--config.model.checkpoint=/tmp/vit_micro.npz]

The tiny NFNet recipe (fake_chexpert_tiny.py) with `vit_micro` (32 px, 8x8 patches).
"""
import importlib.util
import os

from dpft.train.config_base import apply_config_arg, finalize

_spec = importlib.util.spec_from_file_location("dpft_configs_fake_tiny",
                                               os.path.join(os.path.dirname(__file__), "fake_chexpert_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg=None):
    c = _tiny.get_config(None)
    c.model.name = "vit_micro"
    c.data.image_size = 32  # vit_micro's grid is built for 32 px
    c.data.eval_image_size = 32
    # The book-keeping engine needs dpft's tapped layers; the ViT is built from standard NNX layers.
    # Set "auto" once book-keeping intercepts standard layers (issue 18).
    c.train.grad_method = "vmap"
    apply_config_arg(c, arg, _tiny.ALIASES)
    return finalize(c)
