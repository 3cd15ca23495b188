"""dpft: differentially private fine-tuning of pre-trained image classifiers (JAX, Flax NNX).

Sub-packages, one job each:
  dpft.privacy   per-example clipping, noise, Poisson sampling, accounting, auditing
  dpft.models    NFNet F0-F7, tiny NFNets, WRN-16-4, ViT-Ti/S/B/16, DeepMind and big_vision
                 checkpoint import/export
  dpft.data      ImageNet, Places-365, CheXpert, MIMIC-CXR, embedded digits; grain pipeline
  dpft.train     the DP-SGD training loop, sharding, EMA, checkpoints, logging
  dpft.evaluate  metrics, subgroup fairness gaps, reports
"""
__version__ = "0.1.0"
