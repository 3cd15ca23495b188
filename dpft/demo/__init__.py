"""`dpft demo`: the whole recipe, offline, on scikit-learn's digits, in minutes on a CPU.

1. "Public pre-training": a tiny NFNet trained non-privately on the public split
   (upright digits only), exported in DeepMind's Haiku checkpoint format.
2. Private fine-tuning from that checkpoint with DP-SGD at several epsilons and
   non-privately, through the same `dpft.train` path as the big configs (Poisson
   sampling, physical batches + accumulation, augmult, EMA, ledger, checkpoints), on
   the private split, where a minority subgroup (digits rotated by 90 degrees) is rare.
3. Evaluation of each saved checkpoint (accuracy, per-group accuracy and gap, parity,
   patient-level bootstrap CIs, individual epsilons per group) and the sweep comparison.
4. A summary table on the terminal and `report.md` + PNGs in the workdir.

`dpft demo --imbalance 0.001,0.01,0.1,0.3` adds the imbalance study of Berrada et al. (2023):
minority fraction x epsilon (default 1.15, 4.98, 16.2) x seeds (default 0, 1, 2), with the
non-private baseline at every fraction, evaluated like any run and compared with
`dpft.evaluate.compare.compare_runs(x="data.options.minority_fraction", series="privacy.epsilon")`
(accuracy, its gap, every parity metric; mean and CI over seeds): `imbalance/compare.{md,json,png}`.
The same study from the command line is `configs/digits_pretrain.py` + `launch/sweep.py` over
`configs/digits_finetune.py` (README, "Fairness studies"); its runs are named the same way.

Modules: `recipe` (the run config of every demo run), `steps` (pre-training, the fine-tuning
sweep, the imbalance study), `report` (the summary table and report.md), `cli` (`dpft demo`).
"""
