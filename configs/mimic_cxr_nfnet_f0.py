"""NFNet-F0 fine-tuned with DP-SGD on MIMIC-CXR-JPG (Berrada et al. 2023 recipe, see _medical.py).

    dpft train --config configs/mimic_cxr_nfnet_f0.py --workdir runs/mimic_eps8 \
        --config.data.root=/data/mimic-cxr-jpg --config.model.checkpoint=/ckpt/F0_haiku.npz
    --config.privacy.epsilon=1            # paper set {0.5, 1, 2, 4, 8}
    --config.privacy.enabled=False        # the non-private baseline
"""
from configs import _medical
PAPER_EPSILONS = _medical.PAPER_EPSILONS


def get_config(arg=None):
    # Frontal views; official splits from mimic-cxr-2.0.0-split.csv.gz (dpft.data.mimic_cxr).
    c = _medical.medical_config("mimic_cxr", arg, options={"views": ("PA", "AP")})
    return _medical.finalize(c)
