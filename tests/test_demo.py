"""`dpft demo`: its recipe is a valid run config, and a quick run writes the whole report."""
import json
import os
import subprocess
import sys

import dp_accounting
from dp_accounting import dp_event
import numpy as np
import pytest
from scipy import stats

from dpft.demo import mechanisms
from dpft.demo import report as demo_report
from dpft.demo.recipe import recipe
from dpft.privacy import accounting
from dpft.config.validation import validate
from dpft.testing import cpu as cpu_env


@pytest.mark.parametrize("variant", list(mechanisms.VARIANTS))
def test_every_mechanisms_variant_is_a_valid_run_config_with_its_fields(variant):
    cfg = mechanisms.variant_config(variant, epsilon=4.0, seed=1, updates=40, checkpoint="", model="nfnet_nano",
                                    minority_fraction=0.05)
    validate(cfg, num_examples=521, num_devices=1)  # the digits' private split
    for field, value in mechanisms.VARIANTS[variant].items():
        node = cfg
        for part in field.split("."):
            node = node[part]
        assert node == value
    assert cfg.privacy.mechanism == mechanisms.VARIANTS[variant].get("privacy.mechanism", "dpsgd")
    assert cfg.train.trainable == mechanisms.VARIANTS[variant].get("train.trainable", "all")
    assert cfg.seed == 1 and cfg.privacy.epsilon == 4.0 and cfg.train.log_every == 1


def test_a_variant_naming_a_missing_field_is_refused(monkeypatch):
    monkeypatch.setitem(mechanisms.VARIANTS, "typo", {"train.trainabel": "head"})
    with pytest.raises(KeyError, match="train.trainabel"):
        mechanisms.variant_config("typo", epsilon=4.0, seed=0, updates=40, checkpoint="", model="nfnet_nano",
                                  minority_fraction=0.05)


def test_update_seconds_is_the_median_interval_after_the_first_two_updates():
    stamps = [(0.0, 1), (30.0, 2), (31.0, 3), (31.5, 4), (32.5, 5), (33.0, 6), (35.0, 8)]
    # intervals from update 3 on: 0.5, 1.0, 0.5, 1.0 per update (the last spans two updates)
    assert mechanisms.update_seconds(stamps) == pytest.approx(0.75)
    assert mechanisms.update_seconds([(0.0, 1), (1.0, 2), (2.0, 3), (3.0, 4)]) is None  # one interval


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("devices", [1, 3, 8, 128])
def test_recipe_is_a_valid_run_config(private, devices):
    cfg = recipe(private=private, epsilon=4.0, updates=20, checkpoint="", num_devices=devices)
    validate(cfg, num_examples=500, num_devices=devices)
    per_device = cfg.train.physical_batch_size // devices
    assert cfg.train.physical_batch_size % devices == 0 and per_device % cfg.train.microbatch_size == 0
    assert cfg.privacy.enabled is private
    assert cfg.data.name == "digits" and cfg.model.name == "nfnet_tiny"
    # Secret noise (no fixed seed), accumulation over physical batches and the EMA are the big configs' path.
    assert cfg.privacy.insecure_fixed_noise_seed == -1
    if devices == 1:
        assert cfg.train.physical_batch_size < cfg.train.batch_size  # accumulation over physical batches
    assert (cfg.train.ema_decay > 0) is private


def test_summary_table_states_undefined_and_formats_epsilon():
    rows = [{"run": "eps_8", "epsilon": 8.0, "accuracy": 0.9, "majority_accuracy": 0.95,
             "minority_accuracy": 0.5, "gap": 0.45, "gap_ci": [0.3, 0.6], "dir": "x"},
            {"run": "eps_4.98", "epsilon": 4.98, "accuracy": 0.9, "majority_accuracy": 0.95,
             "minority_accuracy": None, "gap": None, "gap_ci": [None, None], "dir": "x",
             "gap_undefined": "top1 defined in 1 of 2 compared groups of group (needs 2)"},
            {"run": "non_private", "epsilon": None, "accuracy": 0.93, "majority_accuracy": 0.96,
             "minority_accuracy": 0.7, "gap": 0.26, "gap_ci": None, "dir": "y"}]
    table = demo_report.summary_table(rows)
    assert "accuracy gap, max - min (95% CI)" in table
    assert "| eps_8 | 8.00 | 0.900 | 0.950 | 0.500 | 0.450 [0.300, 0.600] | n/a |" in table
    assert "| eps_4.98 | 4.98 | 0.900 | 0.950 | n/a | n/a (top1 defined in 1 of 2 compared groups" in table
    assert "| non_private | non-private | 0.930 |" in table
    assert "0.000" not in table


def test_bad_arguments_exit_2(tmp_path):
    from dpft.cli import main

    assert main(["demo", "--workdir", str(tmp_path), "--epsilons", "x"]) == 2
    assert main(["demo", "--workdir", str(tmp_path), "--imbalance", "0,2"]) == 2
    assert main(["demo", "--workdir", str(tmp_path), "--imbalance-epsilons", "0"]) == 2
    assert main(["demo", "--workdir", str(tmp_path), "--seeds", "a"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse's choices: not a CPU-sized NFNet
        main(["demo", "--workdir", str(tmp_path), "--model", "nfnet_f0"])
    assert e.value.code == 2


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The real command: pre-training, one DP run and the non-private run, evaluation, report, a
    small imbalance study (one fraction x (one epsilon + non-private), one seed: seeds aggregated over are
    tests/test_launch.py's), and the privacy-unit
    study (example vs patient at epsilon 8 per patient, checked with dp-accounting). With nfnet_nano (the
    demo's nfnet_tiny compiles in 1.6x its time; the recipe test above checks the default model)."""
    wd = tmp_path / "demo"
    env = dict(os.environ, XLA_FLAGS=cpu_env.xla_flags(1))  # one CPU device, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "dpft.cli", "demo", "--workdir", str(wd), "--quick",
                           "--model", "nfnet_nano", "--updates", "16", "--pretrain-updates", "16", "--epsilons", "8", "--imbalance", "0.3", "--imbalance-epsilons",
                           "4.98", "--seeds", "0", "--units", "8"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[4/4] summary" in proc.stdout
    assert (wd / "public_pretraining" / "nfnet_nano_public.pkl").is_file()  # --model: pre-training included
    report = (wd / "report.md").read_text()
    assert "| eps_8 | 8.00 |" in report and "| non_private | non-private |" in report
    summary = json.loads((wd / "summary.json").read_text())
    for row in summary["runs"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert os.path.isfile(os.path.join(row["dir"], "eval", os.listdir(os.path.join(row["dir"], "eval"))[0],
                                           "metrics.json"))
    # The DP run's ledger spends exactly what the accountant says, within the target.
    run = wd / "finetune" / "eps_8"
    ledger = accounting.Ledger.from_json((run / "ledger.json").read_text())
    plan = json.loads((run / "privacy_plan.json").read_text())
    eps = accounting.compute_epsilon(plan["sampling_rate"], plan["noise_multiplier"], ledger.total_steps,
                                     plan["delta"])
    assert ledger.epsilon(plan["delta"]) == pytest.approx(eps, rel=1e-9)
    assert eps <= 8.0 + 1e-6
    # Individual epsilons exist, are finite, and never exceed the worst case by the same accountant.
    z = np.load(run / "individual_epsilon.npz")
    side = json.loads((run / "individual_epsilon.json").read_text())
    assert np.all(np.isfinite(z["epsilon"]))
    assert z["epsilon"].max() <= side["worst_case_epsilon"] + 1e-9
    assert (wd / "compare" / "compare.png").is_file()
    # The imbalance study: cells (epsilon, fraction), the non-private baseline included.
    study = json.loads((wd / "imbalance" / "compare" / "compare.json").read_text())
    assert study["x"] == "data.options.minority_fraction" and study["series"] == "privacy.epsilon"
    assert [(c["series"], c["x"], c["n_runs"]) for c in study["cells"]] == [(4.98, 0.3, 1), (None, 0.3, 1)]
    for c in study["cells"]:
        assert c["utility"]["n"] == 1 and set(c["parity"]["group"]) >= {"equalized_odds_difference"}
    assert "| 4.98 | 0.3 | 1 |" in report and "| non-private | 0.3 | 1 |" in report
    assert (wd / "imbalance" / "compare" / "compare.png").is_file()
    # The privacy units side by side at the same epsilon per patient.
    assert "## Privacy units" in report and "| patient |" in report and "| example |" in report
    units = {r["unit"]: r for r in summary["units"]}
    patient_plan = json.loads((wd / "units" / "patient" / "privacy_plan.json").read_text())
    example_plan = json.loads((wd / "units" / "example" / "privacy_plan.json").read_text())
    assert patient_plan["unit"] == "patient" and example_plan["unit"] == "example"
    assert patient_plan["num_units"] == example_plan["patients"]["count"] < example_plan["num_units"]
    # patient level: dp-accounting's Poisson Gaussian over patients; example level: the Binomial mixture of its
    # patient with the most images (group privacy), recomputed here with dp-accounting, both at the target 8.
    assert units["patient"]["epsilon_per_patient"] == pytest.approx(accounting.compute_epsilon(
        patient_plan["sampling_rate"], patient_plan["noise_multiplier"], patient_plan["num_updates"],
        patient_plan["delta"]), rel=1e-9)
    k, q = example_plan["patients"]["max_images"], example_plan["sampling_rate"]
    mixture = dp_event.MixtureOfGaussiansDpEvent(example_plan["noise_multiplier"], list(range(k + 1)),
                                                 list(stats.binom.pmf(np.arange(k + 1), k, q)))
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-2)
    pld.compose(mixture, example_plan["num_updates"])
    assert units["example"]["epsilon_per_patient"] == pytest.approx(pld.get_epsilon(example_plan["delta"]), rel=1e-6)
    for row in units.values():
        assert 7.9 <= row["epsilon_per_patient"] <= 8.0 + 1e-6 and 0.0 <= row["accuracy"] <= 1.0
    compared = (wd / "units" / "compare" / "compare.md").read_text()  # the sweep table states each run's unit
    assert " per patient |" in compared and " per example |" in compared
    assert units["example"]["epsilon_per_image"] < 8.0 and units["example"]["noise_multiplier"] > \
        units["patient"]["noise_multiplier"]
    # The mechanisms study in the same workdir (its public pre-training is reused): every variant runs, is
    # evaluated, compared and timed, and each run's plan says what it ran.
    proc = subprocess.run([sys.executable, "-m", "dpft.cli", "demo", "--workdir", str(wd), "--study", "mechanisms",
                           "--quick", "--model", "nfnet_nano", "--updates", "24", "--pretrain-updates", "16",
                           "--epsilons", "8", "--seeds", "0"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "public pre-training: reusing" in proc.stdout and "[3/3] summary" in proc.stdout
    study = json.loads((wd / "mechanisms" / "summary.json").read_text())
    assert [r["variant"] for r in study["rows"]] == list(mechanisms.VARIANTS)
    for r in study["rows"]:
        assert r["n_runs"] == 1 and 0.0 <= r["accuracy"]["value"] <= 1.0 and r["seconds_per_update"] > 0, r
    md = (wd / "mechanisms" / "report.md").read_text()
    assert all(f"| {v} | 8 | 1 |" in md for v in mechanisms.VARIANTS)
    for name in ("mechanism", "trainable"):
        assert (wd / "mechanisms" / f"compare_{name}" / "compare.json").is_file()
    plans = {v: json.loads((wd / "mechanisms" / f"{v}_epsilon-8_seed-0" / "privacy_plan.json").read_text())
             for v in mechanisms.VARIANTS}
    assert plans["bandmf-all"]["mechanism"] == "bandmf" and plans["bandmf-all"]["bands"] == mechanisms.BANDS
    assert plans["dpsgd-all"]["mechanism"] == "dpsgd" and plans["dpsgd-all"]["dimension"] == plans["dpsgd-all"]["model_size"]
    for v, form in (("dpsgd-head", "head"), ("dpsgd-norms_and_head", "norms_and_head"), ("dpsgd-lora4", "lora:4")):
        assert plans[v]["trainable"] == form and plans[v]["dimension"] < plans["dpsgd-all"]["dimension"]
