"""dpft.privacy: the model-agnostic DP-SGD machinery. Knows nothing of images or NFNets.

Modules (one job each; this file imports none of them, so `dpft accountant` starts fast):
  engine          per-example gradients, clipping (flat / per-layer / automatic / none), sums
  noise           THE one place where Gaussian noise is added (`privatize`), `noise_key`
  sampling        Poisson selection per update, fixed-shape physical batches, shuffling
  accounting      epsilon (dp-accounting PLD/RDP), noise calibration, the `Ledger`
  adapters        loss functions for Flax NNX modules and Haiku transforms
  accountant_cli  the `dpft accountant` command
  testing_models  tiny models for tests and benchmarks
"""
