"""Individual (per-example) privacy accounting for DP-SGD (Yu et al. 2023), one module per job;
this file imports none of them (evaluation reads the files without loading dp-accounting).

  norms     NormRecorder: rounded-up per-example gradient norms over training (plain data)
  epsilons  individual_epsilons: each example's events composed with the run's accountant
  groups    summarise / group_stats: quantiles per subgroup and class (no min/max, no small groups)
  files     the .npz/.json/README files (owner-only), save/load of the recorder
  hook      IndividualHook: the training loop's record / checkpoint / finish calls
"""
