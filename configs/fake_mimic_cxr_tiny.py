"""The tiny NFNet recipe (fake_chexpert_tiny.py) on a fake MIMIC-CXR-JPG copy (dpft.data.fake
write_fake_mimic_cxr) for the end-to-end tests; seconds on CPU.

    dpft train --config configs/fake_mimic_cxr_tiny.py --workdir /tmp/e2e_mimic \
        --config.data.root=/tmp/mimic-cxr-jpg/2.0.0 --config.data.options.mimic_iv_dir=/tmp/mimiciv/2.2
"""
from configs import fake_chexpert_tiny as _tiny
from dpft.config.base import apply_config_arg, finalize


def get_config(arg=None):
    c = _tiny.get_config(None)
    with c.unlocked():
        c.data.name = "mimic_cxr"
        del c.data.options["frontal_only"]  # a CheXpert option; MIMIC selects views instead
        c.data.options.views = ("PA", "AP")
    apply_config_arg(c, arg, _tiny.ALIASES)
    return finalize(c)
