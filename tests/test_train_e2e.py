"""End to end: `dpft train` / `dpft evaluate` on a fake CheXpert copy with a tiny NFNet.

The runs are subprocesses of the `dpft` command (8 fake CPU devices, like the test process)
sharing a persistent XLA compilation cache. XLA:CPU executables loaded from that cache give
results that differ in the last bits from freshly compiled ones, so the first run (the
SIGTERM test) compiles and fills the cache, and every run compared bitwise afterwards loads
the same cached executables.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dpft import cli
from dpft.data import chexpert, fake
from dpft.workdir.predictions import load_predictions
from dpft.privacy import accounting, group, keys
from dpft.workdir import checkpointing
from dpft.config import run_plan
from dpft.config.base import load_config
from dpft.testing import cpu as cpu_env
from dpft.testing.events import scalars

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fake_chexpert_tiny.py")
UPDATES = 6
TARGET_EPS = 8.0
RUN_TIMEOUT = 900  # seconds for one subprocess run (2 shared CPU cores)


def _dpft_command() -> list[str]:
    exe = shutil.which("dpft", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "dpft.cli"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Fake data, the shared compile cache and the subprocess environment."""
    if jax.device_count() != 8:
        pytest.skip(f"needs the 8 fake CPU devices of tests/conftest.py, have {jax.device_count()}")
    root = str(tmp_path_factory.mktemp("fake_chexpert"))
    fake.write_fake_chexpert(root, n_patients=40, n_valid_patients=10, image_size=32)
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("DPFT_", "SLURM_", "TPU_")):
            del env[k]
    env.update(XLA_FLAGS=cpu_env.xla_flags(8), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    overrides = [f"--config.data.root={root}", f"--config.train.num_updates={UPDATES}",
                 "--config.model.name=nfnet_nano", "--config.train.eval_every=0",
                 "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2"]
    return {"root": root, "env": env, "overrides": overrides, "tmp": tmp_path_factory}


def train_args(base, workdir, *extra) -> list[str]:
    return ["train", "--config", CONFIG, "--workdir", str(workdir), *base["overrides"], *extra]


def run_dpft(base, args, log_path) -> subprocess.CompletedProcess:
    with open(log_path, "w") as log:
        proc = subprocess.run(_dpft_command() + args, env=base["env"], stdout=log, stderr=subprocess.STDOUT,
                              timeout=RUN_TIMEOUT, cwd=REPO)
    with open(log_path) as f:
        proc.output = f.read()
    return proc


def finished_steps(workdir) -> list[int]:
    d = os.path.join(str(workdir), "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def start_and_signal(base, workdir, sig, log_path) -> tuple[int, str, int]:
    """Starts a run; once its first checkpoint is complete sends `sig`. -> (rc, output, step seen)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_dpft_command() + train_args(base, workdir), env=base["env"], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + RUN_TIMEOUT
        seen = []
        while proc.poll() is None and time.time() < deadline:
            seen = finished_steps(workdir)
            if seen:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    with open(log_path) as f:
        out = f.read()
    assert seen, f"the run ended (rc {proc.returncode}) without a checkpoint:\n{out[-3000:]}"
    return rc, out, seen[-1]


def restore_all(workdir, step):
    with checkpointing.Checkpointer(str(workdir)) as ckpt:
        return ckpt.restore(step)


def assert_trees_identical(a, b, what):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def read_ledger(workdir) -> accounting.Ledger:
    with open(os.path.join(str(workdir), "ledger.json")) as f:
        return accounting.Ledger.from_json(f.read())


@pytest.fixture(scope="module")
def sigterm_run(base):
    """First run (compiles, fills the cache): SIGTERM after the first checkpoint."""
    wd = base["tmp"].mktemp("run_sigterm")
    rc, out, first = start_and_signal(base, wd, signal.SIGTERM, wd / "log.txt")
    return {"workdir": wd, "rc": rc, "output": out, "first": first}


@pytest.fixture(scope="module")
def run_a(base, sigterm_run):
    """The uninterrupted run."""
    wd = base["tmp"].mktemp("run_a")
    proc = run_dpft(base, train_args(base, wd), wd / "log.txt")
    assert proc.returncode == 0, proc.output[-3000:]
    return wd


def train_table_size(root) -> int:
    return len(chexpert.load_splits(root, uncertainty="ones", frontal_only=True, age_edges=(18, 40, 60, 80))["train"])


# ------------------------------------------------------------------------------- tests

def test_sigterm_saves_a_checkpoint_and_exits_75(sigterm_run):
    wd, out = sigterm_run["workdir"], sigterm_run["output"]
    assert sigterm_run["rc"] == 75, out[-3000:]  # dpft.errors.STOPPED_EARLY_EXIT_CODE: rerun to resume
    assert "stopping at update" in out and "signal" in out, out[-3000:]
    steps = finished_steps(wd)
    stop = steps[-1]
    assert sigterm_run["first"] <= stop < UPDATES, (steps, out[-2000:])
    restored = restore_all(wd, stop)
    assert int(np.asarray(jax.tree.leaves(restored.pytrees["update"])[0])) == stop
    assert restored.json_items["data_state"] == {"update_index": stop, "physical_batch_index": 0}
    assert read_ledger(wd).total_steps == stop
    assert not os.path.exists(os.path.join(str(wd), "predictions")), "a preempted run must not write final predictions"


def test_ledger_epsilon_matches_accountant_and_target(base, run_a):
    n = train_table_size(base["root"])
    q = 16 / n
    delta = 1.0 / n
    ledger = read_ledger(run_a)
    assert ledger.total_steps == UPDATES and len(ledger.entries) == 1
    entry = ledger.entries[0]
    assert entry.sampling_rate == pytest.approx(q, rel=1e-12)
    # sigma is the calibrated one for (target, q, updates, delta), found independently here.
    sigma = accounting.calibrate_noise_multiplier(TARGET_EPS, q, UPDATES, delta)
    assert entry.noise_multiplier == pytest.approx(sigma, rel=1e-9)
    eps = accounting.compute_epsilon(q, entry.noise_multiplier, UPDATES, delta)
    assert ledger.epsilon(delta) == pytest.approx(eps, rel=1e-9)
    assert eps <= TARGET_EPS
    # The last logged epsilon is the same number.
    with open(os.path.join(str(run_a), "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if '"epsilon"' in line]
    assert logged[-1]["step"] == UPDATES and logged[-1]["epsilon"] == pytest.approx(eps, rel=1e-9)
    with open(os.path.join(str(run_a), "privacy_plan.json")) as f:
        plan = json.load(f)
    assert plan["num_updates"] == UPDATES and plan["delta"] == pytest.approx(delta)
    # The unit is one image; the patient with the most images (counted here from the image paths) gets
    # the group-privacy epsilon of dpft.privacy.group, printed as a warning at the start.
    table = chexpert.load_splits(base["root"], uncertainty="ones", frontal_only=True, age_edges=(18, 40, 60, 80))["train"]
    per_patient = collections.Counter(re.search(r"patient\d+", str(r["image"])).group() for r in table.records())
    k = max(per_patient.values())
    assert plan["unit"] == "example" and plan["num_units"] == n
    assert (plan["patients"]["count"], plan["patients"]["max_images"]) == (len(per_patient), k) and k > 1
    patient_eps = group.group_epsilon([(q, entry.noise_multiplier, UPDATES)], k, delta)
    assert plan["patients"]["epsilon_of_the_patient_with_the_most_images"] == pytest.approx(patient_eps, rel=1e-9)
    assert plan["patients"]["discretization"] == group.GROUP_DISCRETIZATION
    assert patient_eps > eps
    log = (run_a / "log.txt").read_text()
    assert f"WARNING: privacy unit: one example (an image), not a patient. {len(per_patient)} patients" in log


def checkpoint_secret(workdir, step) -> dict:
    return restore_all(workdir, step).json_items["secret"]


def test_resume_equals_the_uninterrupted_run_bitwise(base, run_a):
    """A run resumed from its checkpoint at UPDATES - 2 (which holds the run's secret) ends
    bitwise equal to the same run uninterrupted: same noise, same selection, same ledger."""
    wd = base["tmp"].mktemp("run_resumed")
    shutil.copytree(str(run_a), str(wd), dirs_exist_ok=True)
    shutil.rmtree(os.path.join(str(wd), "checkpoints", str(UPDATES)))
    shutil.rmtree(os.path.join(str(wd), "predictions"))
    os.remove(os.path.join(str(wd), "ledger.json"))
    assert finished_steps(wd)[-1] == UPDATES - 2
    proc = run_dpft(base, train_args(base, wd), wd / "log_resumed.txt")
    assert proc.returncode == 0, proc.output[-3000:]
    assert f"resumed from {os.path.join(str(wd), 'checkpoints')}/{UPDATES - 2}" in proc.output, proc.output[-3000:]
    a, b = restore_all(run_a, UPDATES), restore_all(wd, UPDATES)
    assert set(a.pytrees) == set(b.pytrees) >= {"params", "opt_state", "ema", "polyak", "update"}
    for name in a.pytrees:
        assert_trees_identical(a.pytrees[name], b.pytrees[name], f"{name} after a resume")
    assert a.json_items["ledger"] == b.json_items["ledger"]
    assert a.json_items["data_state"] == b.json_items["data_state"]
    assert a.json_items["secret"] == b.json_items["secret"]
    assert read_ledger(wd).total_steps == UPDATES
    at_resume = restore_all(run_a, UPDATES - 2)  # the comparison is not trivially true
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in
               zip(jax.tree.leaves(at_resume.pytrees["params"]), jax.tree.leaves(b.pytrees["params"])))


def test_resume_from_a_checkpoint_without_secret_has_no_guarantee(base, run_a):
    """A checkpoint written before secret noise (no secret item): its updates used public noise, so
    the resumed run says NO privacy guarantee in its warning, plan, final line and predictions."""
    wd = base["tmp"].mktemp("run_no_secret")
    shutil.copytree(str(run_a), str(wd), dirs_exist_ok=True)
    shutil.rmtree(os.path.join(str(wd), "checkpoints", str(UPDATES)))
    step_dir = os.path.join(str(wd), "checkpoints", str(UPDATES - 2))
    shutil.rmtree(os.path.join(step_dir, "secret"))  # as written before secret noise: not in the manifest either
    with open(os.path.join(step_dir, "manifest", "metadata")) as f:
        manifest = json.load(f)
    manifest["json"].remove("secret")
    with open(os.path.join(step_dir, "manifest", "metadata"), "w") as f:
        json.dump(manifest, f)
    shutil.rmtree(os.path.join(str(wd), "predictions"))
    proc = run_dpft(base, train_args(base, wd), wd / "log_resumed.txt")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "holds no run secret" in proc.output and "this run has NO privacy guarantee" in proc.output
    final = [line for line in proc.output.splitlines() if line.startswith("final: ")][-1]
    assert "NO privacy guarantee (secret: csprng_after_public_noise" in final, final
    # Issue 31: every epsilon of the resumed run says so: the resume line, the progress lines, the
    # metrics (guarantee_valid false beside epsilon) and TensorBoard (its own tag).
    lines = proc.output.splitlines()
    resumed = [line for line in lines if line.startswith("resumed from ")]
    assert len(resumed) == 1 and re.search(r", epsilon spent [0-9.]+ \(NO GUARANTEE: public noise\) \(", resumed[0])
    progress = [line for line in lines if line.startswith("update ") and " | eps " in line]
    assert len(progress) == 2 and all("(NO GUARANTEE: public noise) | ETA" in line for line in progress), progress
    with open(wd / "metrics.jsonl") as f:  # run_a's records of updates 1-6, then the resumed run's 5 and 6
        records = [json.loads(line) for line in f if '"epsilon"' in line]
    assert [(r["step"], r["guarantee_valid"]) for r in records[-3:]] == [(UPDATES, True), (UPDATES - 1, False),
                                                                       (UPDATES, False)]
    tags = scalars(str(wd))
    assert [step for step, _ in tags["epsilon/NO_GUARANTEE_public_noise"]] == [UPDATES - 1, UPDATES]
    plan = json.loads((wd / "privacy_plan.json").read_text())
    assert plan["guarantee_valid"] is False and plan["secret_source"] == "csprng_after_public_noise"
    test_json = json.loads((wd / "predictions" / str(UPDATES) / "test.json").read_text())
    assert test_json["guarantee_valid"] is False
    assert restore_all(wd, UPDATES).json_items["secret"]["source"] == "csprng_after_public_noise"


def test_sigkill_then_resume_continues_with_the_runs_own_secret(base, run_a):
    wd = base["tmp"].mktemp("run_b")
    rc, out, killed_at = start_and_signal(base, wd, signal.SIGKILL, wd / "log_killed.txt")
    assert rc == -signal.SIGKILL, out[-3000:]
    before = finished_steps(wd)
    assert before and before[-1] < UPDATES, f"the run finished before the kill ({before}); nothing was resumed"
    secret_at_kill = checkpoint_secret(wd, before[-1])
    proc = run_dpft(base, train_args(base, wd), wd / "log_resumed.txt")
    assert proc.returncode == 0, proc.output[-3000:]
    assert f"resumed from {os.path.join(str(wd), 'checkpoints')}/{before[-1]}" in proc.output, proc.output[-3000:]
    assert checkpoint_secret(wd, UPDATES) == secret_at_kill
    assert read_ledger(wd).total_steps == UPDATES
    # Two runs of the same command on fresh workdirs draw different secrets, so different noise
    # and selection: the released models differ although config and seed are equal.
    assert secret_at_kill["source"] == "csprng" and secret_at_kill != checkpoint_secret(run_a, UPDATES)
    a, b = restore_all(run_a, UPDATES), restore_all(wd, UPDATES)
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a.pytrees["params"]), jax.tree.leaves(b.pytrees["params"])))


def test_what_leaves_the_workdir_is_covered_or_private(base, run_a):
    """The secret is only inside checkpoints; per-update private statistics only in the owner-only
    private/ file; per-patient predictions owner-only; the public metrics carry epsilon and the
    noisy gradient's norm, never realised batch sizes or losses on private batches."""
    secret_hex = checkpoint_secret(run_a, UPDATES)["value"]
    ckpt_dir = os.path.join(str(run_a), "checkpoints")
    for dirpath, _, files in os.walk(str(run_a)):
        if dirpath.startswith(ckpt_dir):
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            assert secret_hex.encode() not in data and bytes.fromhex(secret_hex) not in data, (dirpath, name)
    with open(os.path.join(str(run_a), "metrics.jsonl")) as f:
        public = [json.loads(line) for line in f]
    keys_seen = set().union(*public)
    assert {"epsilon", "grad_norm"} <= keys_seen
    # A secure run's epsilon is a guarantee: no "NO GUARANTEE" anywhere (issue 31 marks only public noise).
    assert all(r["guarantee_valid"] is True for r in public if "epsilon" in r)
    tags = scalars(str(run_a))
    assert [step for step, _ in tags["epsilon"]] == list(range(1, UPDATES + 1))
    assert not [t for t in tags if "GUARANTEE" in t], tags
    assert not keys_seen & {"examples", "loss", "train_accuracy", "clipped_fraction"}, keys_seen
    private = os.path.join(str(run_a), "private", "update_stats.jsonl")
    assert (os.stat(private).st_mode & 0o077) == 0 and (os.stat(os.path.dirname(private)).st_mode & 0o077) == 0
    with open(private) as f:
        stats = [json.loads(line) for line in f]
    assert stats and {"examples", "loss", "clipped_fraction"} <= set(stats[-1])
    for split in ("test", "validation"):
        npz = os.path.join(str(run_a), "predictions", str(UPDATES), f"{split}.npz")
        assert (os.stat(npz).st_mode & 0o077) == 0, npz
    with open(os.path.join(str(run_a), "privacy_plan.json")) as f:
        plan = json.load(f)
    assert plan["secret_source"] == "csprng" and plan["guarantee_valid"] is True and "secret" not in plan
    with open(os.path.join(str(run_a), "log.txt")) as f:
        log = f.read()
    assert "ex/s (expected batch)" in log and "loss" not in log.split("DP-SGD")[-1].split("final:")[0]
    progress = [line for line in log.splitlines() if line.startswith("update ") and " | eps " in line]
    assert len(progress) == UPDATES and "; epsilon at the end " in log
    assert "NO GUARANTEE" not in log and "NO privacy guarantee" not in log, log[-3000:]
    assert "host malloc: glibc " in log and "keeps freed memory for reuse" in log  # CPU platform (dpft.host_memory)


def test_resuming_a_finished_run_trains_nothing_more(base, run_a):
    wd = base["tmp"].mktemp("run_a_again")
    shutil.copytree(str(run_a), str(wd), dirs_exist_ok=True)
    before = restore_all(wd, UPDATES)
    kept = finished_steps(wd)
    assert len(kept) == 2  # keep_checkpoints=2
    # keep_checkpoints may change on resume: the start deletes what is beyond it (as after a kill
    # between orbax's save and its clean-up), oldest first, never the restored step
    proc = run_dpft(base, train_args(base, wd, "--config.train.keep_checkpoints=1"), wd / "log_again.txt")
    assert proc.returncode == 0, proc.output[-3000:]
    assert finished_steps(wd) == [UPDATES] == kept[-1:]
    assert f"deleted checkpoint(s) {kept[0]}: more than train.keep_checkpoints=1" in proc.output
    assert read_ledger(wd).total_steps == UPDATES
    after = restore_all(wd, UPDATES)
    assert_trees_identical(before.pytrees["params"], after.pytrees["params"], "params of a finished run")
    assert "update 1/" not in proc.output


def test_budget_binds_when_sigma_is_given(base):
    """sigma fixed and a target epsilon: the plan cuts the run to the largest T within budget."""
    n = train_table_size(base["root"])
    config = load_config(CONFIG, base["overrides"] + ["--config.privacy.noise_multiplier=0.8",
                                                      "--config.privacy.epsilon=3.0",
                                                      "--config.train.num_updates=1000"])
    plan = run_plan.privacy_plan(config, n, {"w": np.zeros(2)}, keys.RunSecret.generate())
    q, delta = 16 / n, 1 / n
    assert 1 <= plan.num_updates < 1000
    assert accounting.compute_epsilon(q, 0.8, plan.num_updates, delta) <= 3.0
    assert accounting.compute_epsilon(q, 0.8, plan.num_updates + 1, delta) > 3.0


def _refused(args, capsys, monkeypatch=None) -> str:
    """Runs `dpft ARGS` in-process and expects exit code 2; returns stderr. With `monkeypatch`,
    fails if the step functions are even built (so nothing can have been compiled)."""
    from dpft.train import step as step_lib

    def no_compile(*a, **k):
        raise AssertionError("the step function was built before the config was refused")

    if monkeypatch is not None:
        monkeypatch.setattr(step_lib, "make_accumulate_fn", no_compile)
        monkeypatch.setattr(step_lib, "make_apply_fn", no_compile)
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


@pytest.mark.parametrize("field,value", [("privacy.epsilon", "4.0"), ("privacy.clip_norm", "0.01"),
                                         ("model.name", "nfnet_tiny")])
def test_resume_with_a_changed_field_is_refused(base, run_a, field, value, capsys):
    wd = base["tmp"].mktemp("run_changed")
    shutil.copytree(str(run_a), str(wd), dirs_exist_ok=True)
    before = sorted(os.listdir(os.path.join(str(wd), "checkpoints")))
    err = _refused(train_args(base, wd, f"--config.{field}={value}"), capsys)
    assert field in err and "different config" in err, err
    assert sorted(os.listdir(os.path.join(str(wd), "checkpoints"))) == before


@pytest.mark.parametrize("override,field", [
    ("--config.train.physical_batch_size=15", "config.train.physical_batch_size=15"),
    ("--config.train.microbatch_size=3", "config.train.microbatch_size=3"),
    ("--config.privacy.clip_norm=-1.0", "config.privacy.clip_norm=-1.0"),
    ("--config.privacy.epsilon=0.0", "config.privacy.epsilon=0.0"),
    ("--config.privacy.epsilon=-2.0", "config.privacy.epsilon=-2.0"),
    ("--config.train.batch_size=100000", "config.train.batch_size=100000"),
    ("--config.train.physical_batch_size=12", "config.train.physical_batch_size=12"),  # not / 8 devices
])
def test_invalid_config_is_refused_before_compilation(base, override, field, capsys, monkeypatch):
    wd = base["tmp"].mktemp("run_invalid")
    err = _refused(train_args(base, wd, override), capsys, monkeypatch)
    assert field in err, err
    assert not finished_steps(wd)


def test_predictions_and_evaluate(base, run_a, capsys):
    wd = base["tmp"].mktemp("run_eval")
    shutil.copytree(str(run_a), str(wd), dirs_exist_ok=True)
    manifest = fake.read_manifest(base["root"])
    n_train_rows = manifest["n_rows"]["train"]
    # Truth from the fake writer: valid.csv frontal rows -> example id, sex, age bin.
    truth = {n_train_rows + m["line"] - 2: m for m in manifest["images"].values()
             if m["split"] == "valid" and m["view"] == "Frontal"}
    preds = load_predictions(os.path.join(str(wd), "predictions", str(UPDATES), "test.npz"))
    assert sorted(preds.example_id.tolist()) == sorted(truth)
    assert preds.logits.shape == (len(truth), len(chexpert.LABELS)) and np.all(np.isfinite(preds.logits))
    sex_of = {"Male": "Male", "Female": "Female"}
    for i, e in enumerate(preds.example_id.tolist()):
        assert preds.attrs["sex"][i] == sex_of.get(truth[e]["sex"], "Unknown")
        assert preds.attrs["age"][i] == truth[e]["age_bin"]
        assert preds.patient_id[i] == truth[e]["patient"]
    assert preds.step == UPDATES and preds.params == "ema" and preds.epsilon <= TARGET_EPS
    assert os.path.isfile(os.path.join(str(wd), "predictions", str(UPDATES), "validation.npz"))

    rc = cli.main(["evaluate", "--workdir", str(wd), "--bootstrap", "20", "--min-group-size", "1"])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(str(wd), "eval", str(UPDATES), "metrics.json")) as f:
        metrics = json.load(f)
    # evaluate re-ran the model from the checkpoint: same logits as the training run wrote.
    again = load_predictions(os.path.join(str(wd), "predictions", str(UPDATES), "test.npz"))
    np.testing.assert_allclose(again.logits, preds.logits, rtol=1e-5, atol=1e-7)
    assert {"sex", "age"} <= set(metrics["groups"])
    # One subgroup AUC recomputed here with sklearn.
    names = list(again.class_names)
    checked = 0
    for attr in ("sex", "age"):
        for group, g in metrics["groups"][attr].items():
            for task in chexpert.EVAL_TASKS:
                stat = g["metrics"].get(f"auc/{task}")
                sel = (again.attrs[attr] == group) & (again.label_mask[:, names.index(task)] > 0)
                y = again.label[sel, names.index(task)]
                if len(np.unique(y)) < 2:
                    assert stat is None or stat["value"] is None
                    continue
                want = roc_auc_score(y, again.logits[sel, names.index(task)])
                assert stat["value"] == pytest.approx(want, abs=1e-9), (attr, group, task)
                checked += 1
    assert checked > 0
    assert metrics["meta"]["step"] == UPDATES
    assert math.isclose(metrics["meta"]["epsilon"], read_ledger(wd).epsilon(metrics["meta"]["delta"]), rel_tol=1e-9)
