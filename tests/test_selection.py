"""Private hyper-parameter selection (Papernot & Steinke 2022): the number of trials, its accounting
against the paper's theorems computed here, `launch/sweep.py --private-selection` and the selection
that `dpft evaluate --compare` reports (accounted for a private selection, said unaccounted otherwise)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from dpft.errors import UsageError
from dpft.evaluate import compare as C
from dpft.evaluate import reports as R
from dpft.privacy import accounting, selection
from dpft.testing.predictions import write_synthetic_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "launch", "sweep.py")
FINETUNE = os.path.join(ROOT, "configs", "digits_finetune.py")


# ----------------------------------------------------------------------------- the number of trials

def _tnb_pmf(k: np.ndarray, eta: float, gamma: float) -> np.ndarray:
    """Definition 1 of the paper: P[K=k] proportional to (1-gamma)^k prod_{l<k} (l+eta)/(l+1), k >= 1
    (eta = 0: (1-gamma)^k / k)."""
    if eta == 0:
        w = (1 - gamma) ** k / k
    else:
        w = np.exp(k * math.log(1 - gamma) + np.array([math.lgamma(i + eta) - math.lgamma(eta) - math.lgamma(i + 1)
                                                        for i in k]))
    return w / w.sum()


@pytest.mark.parametrize("distribution,mean", [("geometric", 3.0), ("logarithmic", 5.0),
                                               ("negative_binomial:0.5", 4.0), ("negative_binomial:2", 3.0),
                                               ("poisson", 2.5)])
def test_the_number_of_trials_follows_its_distribution(distribution, mean):
    scheme = selection.Scheme(distribution, mean)
    rng = np.random.default_rng(7)
    draws = np.array([selection.draw_num_trials(scheme, rng) for _ in range(40_000)])
    k = np.arange(0 if scheme.shape == math.inf else 1, 200)
    if scheme.shape == math.inf:
        pmf = stats.poisson.pmf(k, mean)
    else:
        gamma = selection.tnb_gamma(scheme.shape, mean)
        pmf = _tnb_pmf(k, scheme.shape, gamma)
        assert (k * pmf).sum() == pytest.approx(mean, rel=1e-6)  # the gamma found has the asked mean
        assert (k * pmf).sum() <= mean * (1 + 1e-12)  # and never more (the accounting at `mean` covers it)
        assert draws.min() >= 1
    freq = np.bincount(draws, minlength=k[-1] + 1)[k] / draws.size
    assert np.abs(freq - pmf).max() < 0.01  # 40k draws: standard error < 0.0025 per value
    assert draws.mean() == pytest.approx(mean, rel=0.05)


def test_gamma_against_dp_accounting_and_closed_forms():
    assert selection.tnb_gamma(1.0, 4.0) == pytest.approx(0.25, rel=1e-12)  # geometric: 1 / mean
    assert selection.tnb_gamma(0.0, 1.0) == 1.0
    for shape, mean in [(0.0, 5.0), (0.5, 10.0), (2.0, 3.0)]:
        ours = selection.tnb_gamma(shape, mean)
        theirs = rdp_lib._gamma_truncated_negative_binomial(shape, mean)  # conservative (smaller) gamma
        assert ours >= theirs and ours == pytest.approx(theirs, rel=1e-8)


@pytest.mark.parametrize("distribution,mean,problem", [("uniform", 3, "unknown distribution"),
                                                       ("negative_binomial:x", 3, "shape ETA"),
                                                       ("negative_binomial:0", 3, "shape ETA"),
                                                       ("geometric", 0.5, ">= 1"), ("poisson", math.inf, ">= 1")])
def test_a_bad_scheme_names_the_problem(distribution, mean, problem):
    with pytest.raises(ValueError, match=problem):
        selection.Scheme(distribution, mean)


# ----------------------------------------------------------------------------- the accounting

def _trial_rdp(event) -> np.ndarray:
    acc = accounting.make_accountant("rdp")
    acc.compose(event)
    return np.asarray(acc._rdp, dtype=float)


def _paper_rdp(rdp: np.ndarray, orders: np.ndarray, scheme: selection.Scheme) -> np.ndarray:
    """Theorem 2 (truncated negative binomial) and Theorem 6 (Poisson) of arXiv:2110.03620, at each order."""
    out = np.full_like(rdp, np.inf)
    if scheme.shape == math.inf:
        for i, lam in enumerate(orders):
            eps_hat = math.log1p(1 / (lam - 1))
            delta_hat = rdp_lib.compute_delta(orders, rdp, eps_hat)[0]  # (eps_hat, delta_hat)-DP of one trial
            out[i] = rdp[i] + scheme.mean * delta_hat + math.log(scheme.mean) / (lam - 1)
        return out
    eta, gamma = scheme.shape, rdp_lib._gamma_truncated_negative_binomial(scheme.shape, scheme.mean)
    # the free order lambda-hat: the best one of the same grid
    const = min((1 + eta) * (1 - 1 / lh) * eh + (1 + eta) * math.log(1 / gamma) / lh for lh, eh in zip(orders, rdp))
    out = rdp + math.log(scheme.mean) / (orders - 1) + const
    return np.array([out[orders >= lam].min() for lam in orders])  # RDP is monotone in the order


@pytest.mark.parametrize("distribution", ["poisson", "geometric", "logarithmic", "negative_binomial:0.5"])
def test_selection_epsilon_is_the_papers_theorem(distribution):
    trial = accounting.dpsgd_event(0.01, 1.1, 800)
    scheme = selection.Scheme(distribution, 10.0)
    orders = np.array(accounting.RDP_ORDERS)
    ours = _paper_rdp(_trial_rdp(trial), orders, scheme)
    want = rdp_lib.compute_epsilon(orders, ours, 1e-5)[0]
    assert selection.selection_epsilon(trial, scheme, 1e-5) == pytest.approx(want, rel=1e-9)


def test_selection_costs_more_than_one_trial_less_than_composing_them_and_grows_with_the_mean():
    trial = accounting.dpsgd_event(0.01, 1.1, 800)
    one = accounting.epsilon_of_event(trial, 1e-5, "rdp")
    costs = [selection.selection_epsilon(trial, selection.Scheme("geometric", m), 1e-5) for m in (2, 8, 32)]
    assert one < costs[0] < costs[1] < costs[2]
    composed = accounting.epsilon_of_event(accounting.dpsgd_event(0.01, 1.1, 800 * 8), 1e-5, "rdp")
    assert costs[1] < composed  # the best of ~8 trials is far cheaper than running all 8 and releasing them


# ----------------------------------------------------------------------------- launch/sweep.py

_spec = importlib.util.spec_from_file_location("dpft_launch_sweep_selection", SWEEP)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _sweep(tmp_path, capsys, *extra, workdir="tune"):
    """launch/sweep.py's main in this process (its end-to-end run is the slow test below) ->
    (returncode, stdout, stderr)."""
    rc = sweep.main(["--config", FINETUNE, "--workdir", str(tmp_path / workdir), "--sweep",
                     "train.optimizer.learning_rate=0.5,1,2", "--sweep", "privacy.clip_norm=0.5,1", *extra])
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], rc, out.out, out.err)


def test_sweep_draws_trials_once_and_keeps_them(tmp_path, capsys):
    r = _sweep(tmp_path, capsys, "--private-selection", "negative_binomial:0.5", "--trials-mean", "6")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "tune" / selection.SELECTION_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    k = doc["num_trials"]
    assert k >= 1 and [t["name"] for t in doc["trials"]] == [f"trial-{i:03d}" for i in range(k)]
    for t in doc["trials"]:
        a = t["assignment"]
        assert a["train.optimizer.learning_rate"] in ("0.5", "1", "2") and a["privacy.clip_norm"] in ("0.5", "1")
        assert int(a["seed"]) >= 0
    commands = [line for line in r.stdout.splitlines() if line.startswith("dpft train")]
    assert len(commands) == k
    for t, line in zip(doc["trials"], commands):
        assert f"--workdir {tmp_path / 'tune' / t['name']} " in line
        assert f"--config.train.optimizer.learning_rate={t['assignment']['train.optimizer.learning_rate']}" in line
        assert f"--config.seed={t['assignment']['seed']} " in line
        assert f"--split validation --out {tmp_path / 'tune' / t['name'] / 'selection'}" in line
    # A rerun reuses the draw (K is never drawn again) ...
    before = path.read_text()
    r = _sweep(tmp_path, capsys, "--private-selection", "negative_binomial:0.5", "--trials-mean", "6")
    assert r.returncode == 0 and path.read_text() == before
    assert [line for line in r.stdout.splitlines() if line.startswith("dpft train")] == commands
    # ... and refuses other settings, leaving the record as it was.
    r = _sweep(tmp_path, capsys, "--private-selection", "geometric", "--trials-mean", "6")
    assert r.returncode == 2 and "drawing K again would void the guarantee" in r.stderr
    assert path.read_text() == before


@pytest.mark.parametrize("extra,problem", [
    (["--sweep", "privacy.epsilon=1,8"], "privacy accounting"),
    (["--sweep", "train.batch_size=64,128"], "privacy accounting"),
    (["--sweep", "data.options.minority_fraction=0.1,0.3"], "privacy accounting"),
    (["--seeds", "0,1"], "drop --seeds and --baseline"),
    ([], "needs --trials-mean"),
])
def test_sweep_refuses_what_the_selection_does_not_cover(tmp_path, capsys, extra, problem):
    args = ["--private-selection", "geometric"] + ([] if problem == "needs --trials-mean" else ["--trials-mean", "4"])
    r = _sweep(tmp_path, capsys, *args, *extra)
    assert r.returncode == 2 and problem in r.stderr, r.stderr
    assert not (tmp_path / "tune").exists()


def test_selection_flags_without_private_selection_are_refused(tmp_path, capsys):
    r = _sweep(tmp_path, capsys, "--trials-mean", "4")
    assert r.returncode == 2 and "belong to --private-selection" in r.stderr


def test_slurm_array_script_scores_each_trial_on_the_validation_split(tmp_path, capsys):
    script = tmp_path / "tune.sbatch"
    r = _sweep(tmp_path, capsys, "--private-selection", "geometric", "--trials-mean", "3", "--slurm", str(script))
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert 'evaluate --workdir "${args[1]}" --reuse-predictions --split validation --out "${args[1]}"/selection' in text
    assert text.index("--split validation") < text.index('exec dpft evaluate --workdir "${args[1]}" --reuse-predictions')


# ----------------------------------------------------------------------------- dpft evaluate --compare

LEDGER = accounting.Ledger([accounting.LedgerEntry(0.02, 1.2, 150)])


def _trial(root, name, bias, *, ledger=LEDGER, lr=1.0):
    """A trial workdir: predictions (epsilon from `ledger`, delta 1e-5), ledger.json, its test metrics and
    its validation metrics in TRIAL/selection."""
    wd = root / name
    eps = ledger.epsilon(1e-5)
    paths = write_synthetic_workdir(wd, n_test=150, n_val=120, step=3, bias=bias, seed=3, epsilon=eps)
    config = {"privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5}, "train": {"optimizer": {"learning_rate": lr}},
              "seed": len(name) + int(10 * bias)}
    (wd / "config.json").write_text(json.dumps(config))
    (wd / "ledger.json").write_text(ledger.to_json())
    R.evaluate_predictions(paths["test"], paths["validation"], n_resamples=5, plots=False)
    R.evaluate_predictions(paths["validation"], paths["validation"], n_resamples=5, plots=False,
                           out_dir=str(wd / selection.SELECTION_EVAL_DIR))
    return wd


def _record(root, names, scheme=selection.Scheme("geometric", 3.0)):
    axes = [("train.optimizer.learning_rate", ["0.5", "1"])]
    doc = selection.selection_doc(scheme, axes, [{"train.optimizer.learning_rate": "1", "seed": "1"}] * len(names),
                                  None)
    (root / selection.SELECTION_FILE).write_text(json.dumps(doc))
    return doc


def test_compare_selects_the_best_trial_by_validation_and_accounts_the_selection(tmp_path):
    trials = [_trial(tmp_path, "trial-000", 0.3, lr=0.5), _trial(tmp_path, "trial-001", 2.0),
              _trial(tmp_path, "trial-002", 1.0, lr=0.5)]
    _record(tmp_path, [t.name for t in trials])
    out = C.compare_runs([str(t) for t in trials], tmp_path / "cmp")
    sel = out["selection"]
    scores = {t.name: json.loads((t / "selection" / "metrics.json").read_text())["overall"]["auc_mean"]["value"]
              for t in trials}
    assert sel["accounted"] is True and sel["metric"] == "auc_mean" and sel["split"] == "validation"
    assert sel["selected"] == max(scores, key=scores.get) and sel["scores"] == pytest.approx(scores)
    want = selection.selection_epsilon(LEDGER.dp_event(), selection.Scheme("geometric", 3.0), 1e-5)
    assert sel["epsilon"] == pytest.approx(want, rel=1e-12) and sel["delta"] == 1e-5
    assert sel["trial_epsilon"] == pytest.approx(LEDGER.epsilon(1e-5, "rdp"), rel=1e-12)
    assert sel["trial_epsilon_run_accountant"] == pytest.approx(LEDGER.epsilon(1e-5)) and sel["trial_epsilon"] < sel["epsilon"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Selection" in md and f"Selected **{sel['selected']}** of 3 by auc_mean on split validation" in md
    assert f"epsilon {sel['epsilon']:.3f} at delta 1e-05" in md
    # --select-by another metric of the validation metrics
    out = C.compare_runs([str(t) for t in trials], tmp_path / "cmp2", select_by="auc_mean")
    assert out["selection"]["metric"] == "auc_mean"


def test_a_private_selection_compares_all_its_trials_and_one_mechanism(tmp_path):
    trials = [_trial(tmp_path, "trial-000", 0.3), _trial(tmp_path, "trial-001", 2.0)]
    _record(tmp_path, ["trial-000", "trial-001", "trial-002"])
    with pytest.raises(UsageError, match="not the 3 trials it drew"):
        C.compare_runs([str(t) for t in trials], tmp_path / "cmp")
    _record(tmp_path, ["trial-000", "trial-001"])
    other = accounting.Ledger([accounting.LedgerEntry(0.02, 1.2, 151)])
    (trials[1] / "ledger.json").write_text(other.to_json())  # another mechanism, epsilon not the verified one
    with pytest.raises(UsageError, match="not the .* that evaluation verified"):
        C.compare_runs([str(t) for t in trials], tmp_path / "cmp")
    (trials[1] / "ledger.json").unlink()
    with pytest.raises(UsageError, match="ledger.json: file not found"):
        C.compare_runs([str(t) for t in trials], tmp_path / "cmp")
    _trial(tmp_path, "trial-001", 2.0, ledger=other)  # a trial that really ran longer
    with pytest.raises(UsageError, match="differ in their privacy accounting"):
        C.compare_runs([str(t) for t in trials], tmp_path / "cmp")


def test_select_by_on_a_plain_sweep_says_it_is_not_accounted(tmp_path):
    runs = [_trial(tmp_path, "a", 0.3), _trial(tmp_path, "b", 2.0)]
    out = C.compare_runs([str(r) for r in runs], tmp_path / "cmp", x="train.optimizer.learning_rate",
                         select_by="auc_mean")
    sel = out["selection"]
    test_auc = {r.name: json.loads((r / "eval" / "3" / "metrics.json").read_text())["overall"]["auc_mean"]["value"]
                for r in runs}
    assert test_auc["a"] != test_auc["b"] and sel["selected"] == max(test_auc, key=test_auc.get)
    assert sel["accounted"] is False and "NOT accounted" in sel["note"]
    assert sel["split"] == "test" and sel["epsilon"] == pytest.approx(LEDGER.epsilon(1e-5))
    assert "the selection is NOT accounted" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(UsageError, match="no finite overall metric 'nope'"):
        C.compare_runs([str(r) for r in runs], tmp_path / "cmp", x="train.optimizer.learning_rate", select_by="nope")


@pytest.mark.slow
def test_private_selection_through_sweep_and_compare(tmp_path):
    """The README's commands, tiny: `launch/sweep.py --private-selection geometric --trials-mean 1` (exactly one
    trial: gamma = 1) on the demo data from scratch, then `dpft evaluate --compare` of the trials."""
    from dpft.testing import cpu as cpu_env

    env = cpu_env.subprocess_env(1)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    dpft = tmp_path / "dpft"
    dpft.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m dpft.cli "$@"\n')
    dpft.chmod(0o755)
    work = tmp_path / "tune"
    r = subprocess.run([sys.executable, SWEEP, "--config", FINETUNE, "--workdir", str(work), "--set",
                        "model.name=nfnet_nano", "--set", "train.num_updates=2", "--set", "train.checkpoint_every=2",
                        "--set", "individual.enabled=False", "--sweep", "train.optimizer.learning_rate=0.5,2",
                        "--private-selection", "geometric", "--trials-mean", "1", "--run", "--dpft", str(dpft)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    hint = next(line for line in r.stdout.splitlines() if line.startswith("compare with:"))
    assert hint.endswith(f"--compare {work}/trial-* --out {work}-compare")
    r = subprocess.run([str(dpft), "evaluate", "--compare", str(work / "trial-000"), "--out", str(tmp_path / "cmp")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sel = json.loads((tmp_path / "cmp" / "compare.json").read_text())["selection"]
    plan = json.loads((work / "trial-000" / "privacy_plan.json").read_text())
    trial = accounting.dpsgd_event(plan["sampling_rate"], plan["noise_multiplier"], plan["num_updates"])
    assert sel["selected"] == "trial-000" and sel["num_trials"] == 1 and sel["accounted"] is True
    assert sel["epsilon"] == pytest.approx(
        selection.selection_epsilon(trial, selection.Scheme("geometric", 1.0), plan["delta"]), rel=1e-9)
    assert "## Selection" in r.stdout


def test_a_selection_of_bandmf_trials_is_accounted_with_their_mechanism(tmp_path):
    """The trials' ledgers are used whole: a BandMF ledger (bands recorded) gives the selection over BandMF's
    event, not over DP-SGD's event of the same (q, sigma, T)."""
    mf = accounting.Ledger([accounting.LedgerEntry(0.02, 1.2, 150)], bands=2)
    trials = [_trial(tmp_path, "trial-000", 0.3, ledger=mf), _trial(tmp_path, "trial-001", 2.0, ledger=mf)]
    _record(tmp_path, [t.name for t in trials])
    sel = C.compare_runs([str(t) for t in trials], tmp_path / "cmp")["selection"]
    scheme = selection.Scheme("geometric", 3.0)
    assert sel["epsilon"] == pytest.approx(selection.selection_epsilon(mf.dp_event(), scheme, 1e-5), rel=1e-12)
    assert sel["epsilon"] != pytest.approx(selection.selection_epsilon(LEDGER.dp_event(), scheme, 1e-5), rel=1e-3)
