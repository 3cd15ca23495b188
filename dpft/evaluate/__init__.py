"""dpft.evaluate: metrics, subgroup fairness gaps and reports from predictions files.

Modules (import the one you need; this package imports nothing heavy):
  fairness     thresholds, groups (intersections, exclusions), gaps, parity metrics, undefined reasons
  bootstrap    patient-level (cluster) bootstrap as weight matrices, percentile CIs
  reports      evaluate_predictions(test_path, val_path=None, **cfg) -> metrics.json, report.md, PNGs
  compare      compare_runs(run_dirs, out_dir, x=, series=) -> cells over two config axes, seeds aggregated
  evaluate_cli `dpft evaluate` (checkpoint -> predictions -> report; --compare)

Read from below (shared with training): the metric suite `dpft.metrics`, the predictions format
`dpft.workdir.predictions`, the workdir contract `dpft.workdir.contract` and the model's forward pass
`dpft.inference.predictor`.
"""
