"""dpft.inference: a model's forward pass over a run's data splits (`predictor.Predictor`), below both
training (quick evaluation, final predictions) and evaluation (`dpft evaluate` of a checkpoint)."""
