"""Shared recipe of the chest X-ray configs (CheXpert, MIMIC-CXR): NFNet-F0 fine-tuning.

Source: Berrada, De, Shen et al. (2023), "Unlocking Accuracy and Fairness in Differentially
Private Image Classification", arXiv:2308.10888, which fine-tunes an NFNet-F0 pre-trained on
public data on CheXpert and MIMIC-CXR with DP-SGD at epsilon in {0.5, 1, 2, 4, 8}
(PAPER_EPSILONS), batch size 4096, clipping norm C = 1e-3 and delta = 1/N.

The privacy unit is the PATIENT (ours; the paper's guarantee is per image): Poisson sampling over
patients, one clipped gradient per patient (`dpft.privacy.units`), so epsilon is per patient. Batch
sizes are in patients: 1,024 patients is about the paper's 4,096 images per update at CheXpert's ~3.4
images per patient. To reproduce the paper's per-image setting, override
`--config.privacy.unit=example --config.train.batch_size=4096 --config.train.physical_batch_size=256
--config.train.microbatch_size=32`.

Values marked (ours) are not taken from the paper (or could not be checked against its
tables while writing this file) and should be tuned: the learning rate (with C = 1e-3 the
clipped mean gradient has norm <= 1e-3, so the learning rate is large), the number of
updates, augmult and the resolution.
"""
from dpft.config.base import apply_config_arg, base_config, finalize

PAPER_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
ALIASES = {"eps": "privacy.epsilon", "steps": "train.num_updates", "batch": "train.batch_size"}


def medical_config(data_name: str, arg=None, options=None):
    """The NFNet-F0 recipe on `data_name` ("chexpert" | "mimic_cxr"), plus data `options`.

    Only what differs from `base_config` is set. From the base: model nfnet_f0 (pass
    --config.model.checkpoint=/path/F0_haiku.npz and --config.data.root=/path/to/data), DP on at
    epsilon 8 (paper set: PAPER_EPSILONS), delta 1/N as in the paper, sigma calibrated from epsilon,
    flat clipping, PLD accounting, plain SGD without momentum (De et al. 2022), constant learning rate,
    EMA parameters for evaluation.
    """
    c = base_config(locked=False)
    c.model.dtype = "bfloat16"
    c.data.name = data_name
    c.data.image_size = 256  # (ours) NFNet-F0 eval resolution
    c.data.eval_image_size = 256
    c.data.augmult = 16  # (ours) De et al. (2022)'s augmult
    c.data.num_workers = 8
    # Keys are those of the data set's options class (dpft.data.chexpert.CheXpertOptions,
    # dpft.data.mimic_cxr.MimicOptions); keys left out take that class's default.
    c.data.options.uncertainty = "ones"  # U-Ones; "zeros" | "ignore"
    c.data.options.age_edges = (18, 40, 60, 80)  # age subgroup edges [years]
    for key, value in (options or {}).items():
        c.data.options[key] = value

    c.privacy.clip_norm = 1e-3  # paper
    c.privacy.unit = "patient"  # (ours) epsilon per patient; the paper's is per image (module doc)

    c.train.batch_size = 1024  # patients per update, ~ the paper's 4096 images (module doc)
    # train.physical_batch_size: the base 64 patients per host per step (x unit_cap image slots), accumulated
    c.train.microbatch_size = 8  # patients
    c.train.num_updates = 1000  # (ours)
    c.train.optimizer.learning_rate = 4.0  # (ours) tune; effective step <= lr * C
    c.train.ema_decay = 0.9999  # with warm-up debiasing (dpft/train/ema.py)
    c.train.eval_every = 250

    c.eval.batch_size = 512
    c.eval.splits = ("validation", "test")
    apply_config_arg(c, arg, ALIASES)
    return c


__all__ = ["PAPER_EPSILONS", "medical_config", "finalize"]
