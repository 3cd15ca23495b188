"""dpft.privacy: the model-agnostic DP-SGD machinery. Knows nothing of images or NFNets.

Modules (one job each; this file imports none of them, so `dpft accountant` starts fast):
  clipping        the clipping modes (flat / per_layer / automatic / none): one record each
  engine          per-example gradients, clipping, sums
  noise           THE one place where Gaussian noise is added (`privatize`), `noise_key`
  sampling        Poisson selection per update, fixed-shape physical batches
  accounting      epsilon (dp-accounting PLD/RDP), noise calibration, the `Ledger`
  adapters        loss functions for Flax NNX modules and Haiku transforms
  bookkeeping     the book-keeping engine (per-example norms from layer taps, `dpft.nn.taps`)
  plan            the one frozen privacy plan of a run (N, q, B, sigma, delta, clipping, secret, engine)
  keys            the run's CSPRNG secret and its separate key streams
  sensitivity     measured sensitivity of the clipped sum (removing one example)
  individual      per-example (individual) privacy accounting: norms, epsilons, groups, files, hook
  audit           statistics of the empirical privacy audit (Dirac canaries)
  accountant_cli  the `dpft accountant` command
  limits          numeric limits every command shares (updates, seeds, canaries)
"""
