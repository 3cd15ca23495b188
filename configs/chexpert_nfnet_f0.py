"""NFNet-F0 fine-tuned with DP-SGD on CheXpert (Berrada et al. 2023 recipe, see _medical.py).

    dpft train --config configs/chexpert_nfnet_f0.py --workdir runs/chexpert_eps8 \
        --config.data.root=/data/chexpert --config.model.checkpoint=/ckpt/F0_haiku.npz
    --config.privacy.epsilon=1            # paper set {0.5, 1, 2, 4, 8}; or configs/...py:eps=1
    --config.privacy.enabled=False        # the non-private baseline
"""
from configs import _medical
PAPER_EPSILONS = _medical.PAPER_EPSILONS


def get_config(arg=None):
    # dpft.data.chexpert: "test" = the official valid.csv.
    c = _medical.medical_config("chexpert", arg, options={"frontal_only": True})
    return _medical.finalize(c)
