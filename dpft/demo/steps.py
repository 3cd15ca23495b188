"""The demo's steps: public pre-training, the private fine-tuning sweep and the imbalance study,
each run through the `dpft train` loop and evaluated from what it saved."""
from __future__ import annotations

import os
from typing import Any

from dpft.demo.recipe import DEFAULT_MODEL, MINORITY, recipe


def enable_compilation_cache(workdir: str) -> None:
    """Runs of the same shapes share compiled programs through jax's persistent cache."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pretrain(workdir: str, updates: int, print_fn=print, model: str = DEFAULT_MODEL) -> str:
    """Non-private training on the public split; returns the exported Haiku checkpoint path."""
    from dpft.models import checkpoints
    from dpft.train import loop

    run_dir = os.path.join(workdir, "public_pretraining")
    path = os.path.join(run_dir, f"{model}_public.pkl")
    if os.path.isfile(path):
        print_fn(f"[1/4] public pre-training: reusing {path}")
        return path
    print_fn("[1/4] public pre-training (non-private, upright digits only)")
    trainer = loop.Trainer(recipe(private=False, updates=updates, train_split="public", minority_fraction=0.0,
                                  learning_rate=3e-3, model=model),
                           run_dir, print_fn=lambda s: print_fn("      " + s))
    trainer.run()
    params, _ = trainer.eval_params()
    checkpoints.save_model(trainer.merge(params), path)
    return path


def _eval_run(run_dir: str, n_resamples: int, plots: bool = True) -> dict[str, Any]:
    from dpft.evaluate import reports

    pred_root = os.path.join(run_dir, "predictions")
    step = max(int(s) for s in os.listdir(pred_root))
    test = os.path.join(pred_root, str(step), "test.npz")
    val = os.path.join(pred_root, str(step), "validation.npz")
    return reports.evaluate_predictions(test, val if os.path.isfile(val) else None,
                                        n_resamples=n_resamples, min_group_size=20, plots=plots)


def _summary_row(name: str, epsilon: float | None, result: dict, run_dir: str) -> dict[str, Any]:
    groups = result["groups"].get("group", {})
    gap = result["gaps"].get("group", {}).get("top1", {})
    row = {
        "run": name, "epsilon": epsilon,
        "accuracy": result["overall"]["top1"]["value"],
        "majority_accuracy": groups.get("majority", {}).get("metrics", {}).get("top1", {}).get("value"),
        "minority_accuracy": groups.get(MINORITY, {}).get("metrics", {}).get("top1", {}).get("value"),
        "gap": gap.get("gap", {}).get("value"),
        "gap_ci": gap.get("gap", {}).get("ci"),
        "gap_undefined": gap.get("gap", {}).get("undefined"),
        "dir": run_dir,
    }
    ind = result.get("individual_epsilon")
    if ind:
        row["individual_epsilon_median"] = ind.get("overall", {}).get("q50")
    return row


def fine_tune_sweep(workdir: str, checkpoint: str, epsilons: list[float], *, updates: int,
                    minority_fraction: float, n_resamples: int, print_fn=print, tag: str = "",
                    model: str = DEFAULT_MODEL) -> list[dict]:
    """One DP run per epsilon plus a non-private run, each evaluated from its checkpoint."""
    from dpft.train import loop

    rows = []
    runs = [(e, True) for e in epsilons] + [(None, False)]
    for i, (eps, private) in enumerate(runs):
        name = f"eps_{eps:g}" if private else "non_private"
        run_dir = os.path.join(workdir, f"{tag}{name}")
        print_fn(f"      [{i + 1}/{len(runs)}] {name}{' ' + tag.rstrip('_/') if tag else ''}")
        cfg = recipe(private=private, epsilon=eps or 8.0, updates=updates, checkpoint=checkpoint,
                     minority_fraction=minority_fraction, model=model)
        loop.Trainer(cfg, run_dir, print_fn=lambda s: print_fn("          " + s)).run()
        rows.append(_summary_row(name, eps, _eval_run(run_dir, n_resamples), run_dir))
    return rows


def imbalance_study(workdir: str, checkpoint: str, fractions: list[float], epsilons: list[float], seeds: list[int],
                    *, updates: int, n_resamples: int, print_fn=print, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """Minority fraction x (epsilons + non-private) x seeds, each run evaluated from its checkpoint,
    then compared over minority fraction with one line per epsilon (mean and CI over seeds)."""
    from dpft.evaluate import compare
    from dpft.train import loop

    root = os.path.join(workdir, "imbalance")
    grid = [(f, e, s) for f in fractions for e in [*epsilons, None] for s in seeds]
    dirs = []
    for i, (frac, eps, seed) in enumerate(grid):
        name = f"minority_fraction-{frac:g}_epsilon-{'non-private' if eps is None else f'{eps:g}'}_seed-{seed}"
        run_dir = os.path.join(root, name)
        print_fn(f"      [{i + 1}/{len(grid)}] {name}")
        cfg = recipe(private=eps is not None, epsilon=eps or 8.0, updates=updates, checkpoint=checkpoint,
                     minority_fraction=frac, seed=seed, model=model)
        with cfg.unlocked():
            cfg.individual.enabled = False  # individual epsilons: see the main runs; saves a pass per run
        if not os.path.isfile(os.path.join(run_dir, "eval", str(updates), "metrics.json")):
            loop.Trainer(cfg, run_dir, print_fn=lambda s: None).run()
            _eval_run(run_dir, n_resamples, plots=False)
        dirs.append(run_dir)
    return compare.compare_runs(dirs, os.path.join(root, "compare"), x="data.options.minority_fraction",
                                series="privacy.epsilon")


#: The unit study's delta (both runs): below 1 / N of the private split's images (about 520) and patients.
UNIT_STUDY_DELTA = 1e-4


def unit_study(workdir: str, checkpoint: str, epsilon: float, *, updates: int, minority_fraction: float,
               n_resamples: int, print_fn=print, model: str = DEFAULT_MODEL) -> list[dict]:
    """The same private data (digits grouped into patients, `digits_patients`) fine-tuned with each privacy
    unit at the same epsilon PER PATIENT: "patient" (Poisson over patients, one clipped gradient per
    patient, epsilon per patient = `epsilon`) and "example" (Poisson over images, sigma raised until the
    patient with the most images has `epsilon`, `dpft.privacy.group.noise_for_group_epsilon`). Both take
    the same expected number of images per update (128). Rows: accuracy, gap, epsilon per patient and
    per image of each run; the sweep comparison over privacy.unit in WORKDIR/units/compare."""
    from dpft.config import build
    from dpft.privacy import group
    from dpft.train import loop

    probe = recipe(private=True, epsilon=epsilon, updates=updates, checkpoint=checkpoint, model=model,
                   minority_fraction=minority_fraction, dataset="digits_patients", unit="patient")
    table = build.load_tables(probe)[build.train_split_name(probe)]
    counts = group.PatientCounts.from_ids(table.column("patient_id"))
    images = 128
    patients = max(1, round(images * counts.num_patients / len(table)))  # the same images per update
    sigma = group.noise_for_group_epsilon(epsilon, images / len(table), updates, UNIT_STUDY_DELTA, counts.max_images)
    runs = {"patient": dict(unit="patient", batch_size=patients, epsilon=epsilon),
            "example": dict(unit="example", batch_size=images, epsilon=None, noise_multiplier=sigma)}
    rows = []
    for i, (unit, extra) in enumerate(runs.items()):
        run_dir = os.path.join(workdir, "units", unit)
        print_fn(f"      [{i + 1}/2] privacy unit {unit}")
        cfg = recipe(private=True, updates=updates, checkpoint=checkpoint, model=model, delta=UNIT_STUDY_DELTA,
                     minority_fraction=minority_fraction, dataset="digits_patients", **extra)
        with cfg.unlocked():
            cfg.individual.enabled = False
        trainer = loop.Trainer(cfg, run_dir, print_fn=lambda s: print_fn("          " + s))
        trainer.run()
        run_eps = trainer.epsilon_spent()
        per_patient = run_eps if unit == "patient" else trainer.plan.patients["epsilon_of_the_patient_with_the_most_images"]
        row = _summary_row(unit, per_patient, _eval_run(run_dir, n_resamples), run_dir)
        # An image is part of its patient: a patient-level run protects each image at least as well.
        row.update(unit=unit, epsilon_per_patient=per_patient, epsilon_per_image=run_eps,
                   noise_multiplier=trainer.plan.noise_multiplier, expected_batch=trainer.plan.expected_batch_size,
                   num_units=trainer.plan.num_examples, max_images_per_patient=counts.max_images)
        rows.append(row)
    from dpft.evaluate import compare
    compare.compare_runs([r["dir"] for r in rows], os.path.join(workdir, "units", "compare"), x="privacy.unit")
    return rows
