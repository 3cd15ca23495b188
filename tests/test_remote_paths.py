"""Workdirs on object stores (`gs://` through etils.epath) and the one atomic-write module.

Every promise is checked on a local path and on a fake `gs://` store (tests/fake_gcs.py:
fsspec's local filesystem behind the `gs` protocol, with object-store semantics: an upload
appears only when complete, create-if-absent is atomic). dpft reaches the fake through the
real `etils.epath` -> fsspec code path; no network is touched.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fake_gcs
from dpft import atomic_io, paths
from dpft.errors import UsageError, WorkdirBusyError
from dpft.testing import cpu as cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
CONFIG = os.path.join(REPO, "configs", "fake_chexpert_tiny.py")


def read(path: str) -> bytes:
    return paths.as_path(path).read_bytes()


def leftovers(directory: str) -> list[str]:
    """Temporary files/objects left in `directory` (names with '.tmp.' or '.upload-')."""
    if paths.is_remote(directory):
        directory = fake_gcs.local(directory)
    return [n for n in os.listdir(directory) if ".tmp." in n or ".upload-" in n] if os.path.isdir(directory) else []


# ---------------------------------------------------------------------------- atomic writes

def test_write_is_all_or_nothing(base):
    """While a write is under way and after it fails, readers see the previous file, whole."""
    target = paths.join(base, "sub", "doc.json")
    atomic_io.make_dir(paths.join(base, "sub"))
    atomic_io.write_json(target, {"version": 1}, indent=2)
    assert json.loads(read(target)) == {"version": 1}

    seen = []

    def half_then_fail(f):
        f.write(b'{"version": 2, "trunc')
        seen.append(read(target))  # what a reader sees mid-write
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_io.write_bytes(target, half_then_fail)
    assert seen == [read(target)] and json.loads(read(target)) == {"version": 1}
    assert leftovers(paths.join(base, "sub")) == []
    atomic_io.write_text(target, json.dumps({"version": 2}))
    assert json.loads(read(target)) == {"version": 2}


def test_serialisation_error_touches_nothing(base):
    target = paths.join(base, "doc.json")
    atomic_io.make_dir(base)
    atomic_io.write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_io.write_json(target, {"x": object()})
    assert read(target) == b"old"


def test_append_text(base):
    atomic_io.make_dir(base)
    log = paths.join(base, "log.jsonl")
    for i in range(3):
        atomic_io.append_text(log, json.dumps({"i": i}) + "\n")
    assert [json.loads(l)["i"] for l in read(log).decode().splitlines()] == [0, 1, 2]


WRITER = r"""
import sys, time, os
sys.path[:0] = [{tests!r}]
import fake_gcs; fake_gcs.install()
from dpft import atomic_io
def slow(f):
    f.write(b'{{"version": 2, "half')
    f.flush()
    print("half", flush=True)
    time.sleep(120)
    f.write(b'"}}')
atomic_io.write_bytes({target!r}, slow)
"""


def test_kill_mid_write_keeps_the_last_good_file(base, gcs):
    """A process SIGKILLed in the middle of a write leaves the previous file intact."""
    atomic_io.make_dir(base)
    target = paths.join(base, "ledger.json")
    atomic_io.write_json(target, {"version": 1})
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=TESTS, target=target)], env=gcs,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "half", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(read(target)) == {"version": 1}


def test_local_private_modes_and_fsync(tmp_path, monkeypatch):
    """Owner-only files from the moment they exist, 0700 directories, file and directory fsynced."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    d = atomic_io.make_dir(tmp_path / "private", private=True)
    p = atomic_io.write_bytes(os.path.join(d, "x.npz"), lambda f: np.savez(f, a=np.arange(3)), private=True)
    assert os.stat(d).st_mode & 0o777 == 0o700 and os.stat(p).st_mode & 0o777 == 0o600
    assert atomic_io.is_owner_only(p)
    assert np.load(p)["a"].tolist() == [0, 1, 2]
    assert any(".x.npz.tmp." in s for s in synced) and str(tmp_path / "private") in synced
    atomic_io.append_text(os.path.join(d, "s.jsonl"), "{}\n", private=True)
    assert atomic_io.is_owner_only(os.path.join(d, "s.jsonl"))


def test_remote_private_warns_naming_the_path(gcs, capsys):
    url = "gs://bucket/run/private/update_stats.jsonl"
    atomic_io.append_text(url, "{}\n", private=True)
    err = capsys.readouterr().err
    assert url in err and "IAM" in err and "owner-only permissions cannot be set" in err


def test_remote_write_is_verified(gcs, monkeypatch):
    """A temporary object that reads back different from what was written is never copied over
    the target (write-then-verify), and the error names the object."""
    target = "gs://bucket/run/config.json"
    atomic_io.write_text(target, "good")
    real_cat = fake_gcs.FakeGCS.cat_file

    def corrupt(self, path, *a, **k):
        data = real_cat(self, path, *a, **k)
        return data[:-1] + b"X" if ".tmp." in path else data

    monkeypatch.setattr(fake_gcs.FakeGCS, "cat_file", corrupt)
    real_open = fake_gcs.FakeGCS._open

    def open_corrupting(self, path, mode="rb", **k):
        f = real_open(self, path, mode, **k)
        if "r" in mode and ".tmp." in path:
            return io.BytesIO(f.read()[:-1] + b"X")
        return f

    monkeypatch.setattr(fake_gcs.FakeGCS, "_open", open_corrupting)
    with pytest.raises(OSError, match="differs from what was written"):
        atomic_io.write_text(target, "new!")
    assert read(target) == b"good"
    assert leftovers("gs://bucket/run") == []


def test_remote_copy_failure_keeps_the_last_good_object(gcs, monkeypatch):
    target = "gs://bucket/run/ledger.json"
    atomic_io.write_text(target, "good")
    real_open = fake_gcs.FakeGCS._open

    def fail_on_target(self, path, mode="rb", **k):
        if "w" in mode and path.endswith("/ledger.json"):
            raise OSError(5, "injected upload failure", path)
        return real_open(self, path, mode, **k)

    monkeypatch.setattr(fake_gcs.FakeGCS, "_open", fail_on_target)
    with pytest.raises(OSError, match="injected"):
        atomic_io.write_text(target, "new")
    assert read(target) == b"good" and leftovers("gs://bucket/run") == []


# ---------------------------------------------------------------------------- logs, predictions

def test_metric_files_match_between_local_and_remote(tmp_path, gcs):
    from dpft.train import logging_utils

    records = [{"loss": 0.5}, {"loss": 0.25, "eps": 1.5}, {"loss": 0.125, "note": "x"}]
    out = {}
    for where in (str(tmp_path / "run"), "gs://bucket/run"):
        with logging_utils.MetricWriter(where, tensorboard=False, process_index=0) as w:
            for i, r in enumerate(records):
                w.write(i + 1, r)
        with logging_utils.MetricWriter(where, tensorboard=False, process_index=0) as w:  # resume
            w.write(4, {"loss": 0.0625})
        out[where] = (read(paths.join(where, "metrics.csv")), read(paths.join(where, "metrics.jsonl")))
    (csv_l, jsonl_l), (csv_r, jsonl_r) = out.values()
    assert csv_l == csv_r and jsonl_l == jsonl_r
    rows = list(csv.DictReader(io.StringIO(csv_r.decode())))
    assert list(rows[0]) == ["step", "loss", "eps", "note"]
    assert [(r["step"], r["loss"], r["eps"], r["note"]) for r in rows] == [
        ("1", "0.5", "", ""), ("2", "0.25", "1.5", ""), ("3", "0.125", "", "x"), ("4", "0.0625", "", "")]


def test_private_stats_and_predictions_on_remote(gcs, capsys):
    from dpft.workdir import predictions as P
    from dpft.privacy.individual import files as individual_files
    from dpft.testing.predictions import synthetic_predictions
    from dpft.train import logging_utils

    logging_utils.PrivateStatsWriter("gs://bucket/run", process_index=0).write(3, {"batch": 7})
    assert json.loads(read("gs://bucket/run/private/update_stats.jsonl")) == {"step": 3, "batch": 7}
    syn = synthetic_predictions(20, task="multilabel", seed=0)
    npz, js = P.write_predictions("gs://bucket/run/predictions/3/test", step=3, **syn)
    assert npz == "gs://bucket/run/predictions/3/test.npz"
    back = P.load_predictions(npz)
    np.testing.assert_array_equal(back.logits, np.asarray(syn["logits"], np.float32))
    np.testing.assert_array_equal(back.example_id, np.asarray(syn["example_id"]))
    path = individual_files.write_individual_epsilons("gs://bucket/run", np.arange(4), np.array([.1, .2, .3, .4]),
                                                      {"sex": ["F", "M", "F", "M"]}, summary={"n": 4})
    got = individual_files.read_individual_epsilons(path)
    assert got["epsilon"].tolist() == [.1, .2, .3, .4] and got["attr_sex"].tolist() == ["F", "M", "F", "M"]
    err = capsys.readouterr().err
    for name in ("private/update_stats.jsonl", "predictions/3/test.npz", "individual_epsilon.npz"):
        assert f"gs://bucket/run/{name}" in err  # each private file named in a warning


def test_checkpoint_paths_stay_urls(gcs):
    from dpft.workdir import checkpointing

    assert checkpointing.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert checkpointing.latest_step("gs://bucket/run") is None
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
    assert paths.join("gs://bucket/run/", "a", "b.json") == "gs://bucket/run/a/b.json"


# ---------------------------------------------------------------------------- the workdir lock

def test_remote_lock_busy_stale_and_release(gcs, capsys):
    from dpft.train import remote_lock, workdir_lock

    url = "gs://bucket/run"
    with workdir_lock.WorkdirLock(url):
        holder = workdir_lock.read_holder(url)
        assert holder["pid"] == os.getpid() and workdir_lock.held_by_this_process(url)
        other = remote_lock.RemoteLease(workdir_lock.lock_path(url), url)
        with pytest.raises(WorkdirBusyError, match=f"is in use by pid {os.getpid()}"):
            other.acquire(workdir_lock._describe)
    assert not os.path.exists(fake_gcs.local(url + "/.dpft.lock"))  # released: object deleted
    # A crashed holder's lock (not renewed for longer than stale_after_s) is taken over, loudly.
    stale = {"token": "dead", "pid": 1, "host": "gone", "since": 0.0, "renewed": time.time() - 10_000}
    atomic_io.write_json(url + "/.dpft.lock", stale)
    with workdir_lock.WorkdirLock(url):
        assert workdir_lock.read_holder(url)["pid"] == os.getpid()
    assert "taking over a stale lock of pid 1 on host gone" in capsys.readouterr().err


def _wait_until(condition, timeout: float = 60.0) -> None:
    """Poll `condition` (a loaded machine may delay a background thread by far more than its period)."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"not true within {timeout} s"
        time.sleep(0.05)


def test_remote_lease_heartbeat_and_takeover_detection(gcs, capsys):
    from dpft.train import remote_lock

    lease = remote_lock.RemoteLease("gs://bucket/run/.dpft.lock", "gs://bucket/run", lease_s=0.3)
    lease.acquire(str)
    first = lease.read_holder()["renewed"]
    _wait_until(lambda: lease.read_holder()["renewed"] > first)  # renewed by the heartbeat (every 0.1 s)
    assert not lease.lost
    atomic_io.write_json("gs://bucket/run/.dpft.lock", {**lease.read_holder(), "token": "someone else"})
    _wait_until(lambda: lease.lost)
    assert "taken over by another process" in capsys.readouterr().err
    lease.release()
    assert lease.read_holder()["token"] == "someone else"  # not ours: left alone


HOLDER = r"""
import sys
sys.path[:0] = [{tests!r}]
import fake_gcs; fake_gcs.install()
from dpft.train import workdir_lock
with workdir_lock.WorkdirLock({url!r}):
    print("held", flush=True)
    sys.stdin.read()
"""
CLI = "import sys; sys.path[:0] = [{tests!r}]; import fake_gcs; fake_gcs.install(); from dpft import cli; " \
      "sys.exit(cli.main(sys.argv[1:]))"


def test_second_process_on_a_remote_workdir_exits_4(gcs, tmp_path):
    """Two processes contend for gs://bucket/run: the second `dpft train` exits 4 with the
    usual one-line message, before loading any data."""
    url = "gs://bucket/run"
    a = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=TESTS, url=url)], env=gcs, cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "held", a.stderr.read()
        root = tmp_path / "data"
        root.mkdir()
        b = subprocess.run([sys.executable, "-c", CLI.format(tests=TESTS), "train", "--config", CONFIG,
                            "--workdir", url, f"--config.data.root={root}"],
                           env=gcs, cwd=REPO, capture_output=True, text=True, timeout=600)
        lines = [l for l in b.stderr.splitlines() if l.strip()]
        assert b.returncode == 4, b.stderr[-3000:]
        assert f"is in use by pid {a.pid} on host" in lines[-1] and "one run per workdir" in lines[-1]
        assert "Traceback" not in b.stderr and "DP-SGD" not in b.stdout
    finally:
        a.communicate("", timeout=60)
    assert a.returncode == 0
    assert not os.path.exists(fake_gcs.local(url + "/.dpft.lock"))


# ---------------------------------------------------------------------------- refused paths

@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", CONFIG, "--workdir", "http://host/run"], "--workdir 'http://host/run': http:// paths "
                                                                    "are not supported"),
    (["train", "--config", CONFIG, "--workdir", "file:///tmp/run"], "file:// paths are not supported"),
    (["train", "--config", CONFIG, "--workdir", "gs://bucket/run", "--config.data.root=http://host/data"],
     "config.data.root 'http://host/data': http:// paths are not supported"),
    (["train", "--config", CONFIG, "--workdir", "gs://bucket/run", "--config.data.root=gs://bucket/nothing"],
     "config.data.root='gs://bucket/nothing' is not a directory"),
    (["train", "--config", CONFIG, "--workdir", "gs://bucket/run", "--config.model.checkpoint=gs://bucket/F0.npz"],
     "config.model.checkpoint='gs://bucket/F0.npz' does not exist"),
    (["evaluate", "--workdir", "gs://bucket/nothing"], "--workdir gs://bucket/nothing does not exist"),
    (["evaluate", "--workdir", "ftp://host/run"], "--workdir 'ftp://host/run': ftp:// paths are not supported"),
    (["prepare", "chexpert", "--source", "gs://bucket/chexpert"], "--source 'gs://bucket/chexpert' is not a directory"),
    (["prepare", "chexpert", "--source", "hdfs://x/chexpert"], "--source 'hdfs://x/chexpert': hdfs:// paths are not"),
])
def test_unsupported_paths_are_one_line_errors(gcs, capsys, argv, needle):
    from dpft import cli

    assert cli.main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_missing_fsspec_backend_is_named(monkeypatch):
    import fsspec

    def missing(name):
        raise ImportError(f"Install s3fs to access {name}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(UsageError, match=r"s3:// paths need the s3fs package"):
        paths.check_supported("s3://bucket/run", "--workdir")
    paths.check_supported("/local/run", "--workdir")  # local paths never need a backend


# ---------------------------------------------------------------------------- a short run on gs://

TRAIN = r"""
import sys
sys.path[:0] = [{tests!r}]
import fake_gcs; fake_gcs.install()
from dpft import paths
from dpft.workdir import checkpointing
# orbax writes arrays through tensorstore's own GCS driver (HTTP, not fsspec): only the
# checkpoint directory is routed to the fake store's directory; everything else goes to gs://.
real = checkpointing.checkpoint_dir
checkpointing.checkpoint_dir = lambda w: fake_gcs.local(real(w)) if paths.is_remote(w) else real(w)
from dpft import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_short_training_run_with_its_workdir_on_gs(gcs, tmp_path):
    """2 updates with --workdir gs://bucket/run: lock, logs, ledger, config, plan and private
    statistics land on the (fake) bucket; rerunning the command resumes instead of restarting."""
    from dpft.data import fake

    root = str(tmp_path / "data")
    fake.write_fake_chexpert(root, n_patients=20, n_valid_patients=6, image_size=32)
    url = "gs://bucket/run"
    env = dict(gcs, XLA_FLAGS=cpu_env.xla_flags(1))
    args = [sys.executable, "-c", TRAIN.format(tests=TESTS), "train", "--config", CONFIG, "--workdir", url,
            f"--config.data.root={root}", "--config.model.name=nfnet_nano", "--config.train.eval_every=0",
            "--config.train.num_updates=2", "--config.train.checkpoint_every=2"]
    run = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    store = fake_gcs.local(url)
    for name in ("config.json", "ledger.json", "privacy_plan.json", "attribute_coverage.json", "metrics.jsonl",
                 "metrics.csv"):
        assert os.path.isfile(os.path.join(store, name)), (name, os.listdir(store))
    assert not os.path.exists(os.path.join(store, ".dpft.lock"))  # released at the end
    assert sorted(int(n) for n in os.listdir(os.path.join(store, "checkpoints")) if n.isdigit()) == [2]
    ledger = json.loads(read(url + "/ledger.json"))
    assert sum(e["steps"] for e in ledger["entries"]) == 2
    steps = [json.loads(l)["step"] for l in read(url + "/metrics.jsonl").decode().splitlines()]
    assert steps and max(steps) == 2
    if paths.exists(url + "/private/update_stats.jsonl"):
        assert f"{url}/private" in run.stderr  # the private file on a bucket is named in a warning
    assert leftovers(url) == []
    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert json.loads(read(url + "/ledger.json")) == ledger  # resumed at update 2: nothing ran twice


# ---------------------------------------------------------------------------- data, checkpoint and evaluation on gs://

MIMIC_CONFIG = os.path.join(REPO, "configs", "fake_mimic_cxr_tiny.py")
ATTRIBUTES = {"chexpert": ("sex", "age", "race"), "mimic_cxr": ("sex", "age", "race", "insurance")}


@pytest.mark.slow
@pytest.mark.parametrize("base", ["gs"], indirect=True)
@pytest.mark.parametrize("dataset", ["chexpert", "mimic_cxr"])
def test_prepare_train_evaluate_with_everything_on_the_store(base, gcs, tmp_path, dataset):
    """Data root (and MIMIC-IV apart), the prepared index, the pre-trained checkpoint and the
    workdir all under gs:// on the fake store: `dpft prepare`, a 2-update `dpft train` from the
    pre-trained checkpoint, `dpft evaluate --workdir` -> a report with every subgroup attribute of
    the data set. (The same commands on local folders: tests/test_data_registry.py's toy data set,
    tests/test_readme_commands.py's CheXpert and MIMIC-CXR commands, tests/test_real_layout_e2e.py.)"""
    import shutil

    from dpft import models
    from dpft.data import fake
    from dpft.workdir.predictions import load_predictions
    from dpft.models import checkpoints

    local = str(tmp_path / "src")
    store = (lambda url: fake_gcs.local(url)) if paths.is_remote(base) else (lambda p: p)
    root = paths.join(base, "data")
    prepare = ["prepare", dataset, "--source", root, "--out", paths.join(base, "prepared"), "--no-progress"]
    config, extra = CONFIG, []
    if dataset == "chexpert":
        fake.write_fake_chexpert(local, n_patients=24, n_valid_patients=6, demo="xlsx")
        prepare += ["--set", "frontal_only=true"]
    else:
        iv = paths.join(base, "mimiciv")
        fake.write_fake_mimic_cxr(local, n_subjects=24, iv_root=os.path.join(local, "iv"), iv_layout="hosp")
        shutil.move(os.path.join(local, "iv"), str(tmp_path / "iv"))
        shutil.copytree(str(tmp_path / "iv"), store(iv))
        prepare += ["--set", f"mimic_iv_dir={iv}"]
        config = MIMIC_CONFIG
        extra = [f"--config.data.options.mimic_iv_dir={iv}"]
    shutil.copytree(local, store(root))
    atomic_io.make_dir(base)
    checkpoints.save_model(models.create("nfnet_nano", 14, seed=3), paths.join(base, "pretrained.pkl"))

    def dpft(*argv: str) -> subprocess.CompletedProcess:
        run = subprocess.run([sys.executable, "-c", TRAIN.format(tests=TESTS), *argv], cwd=REPO, capture_output=True,
                             text=True, timeout=1500, env=dict(gcs, XLA_FLAGS=cpu_env.xla_flags(1)))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    dpft(*prepare)
    assert paths.isfile(paths.join(base, "prepared", "index", "meta.json"))
    workdir = paths.join(base, "run")
    dpft("train", "--config", config, "--workdir", workdir, f"--config.data.root={root}",
         f"--config.data.options.index_dir={paths.join(base, 'prepared', 'index')}",
         f"--config.model.checkpoint={paths.join(base, 'pretrained.pkl')}", "--config.model.name=nfnet_nano",
         "--config.train.eval_every=0", "--config.train.num_updates=2", "--config.train.checkpoint_every=2",
         "--config.train.batch_size=8", "--config.train.physical_batch_size=8", *extra)
    ev = dpft("evaluate", "--workdir", workdir, "--bootstrap", "10")
    if paths.is_remote(base):
        assert "from a verified local copy" in ev.stdout
    report = paths.as_path(paths.join(workdir, "eval", "2", "report.md")).read_text()
    metrics = json.loads(paths.as_path(paths.join(workdir, "eval", "2", "metrics.json")).read_text())
    preds = load_predictions(paths.join(workdir, "predictions", "2", "test.npz"))
    for a in ATTRIBUTES[dataset]:
        assert a in preds.attrs and any(v != "Unknown" for v in preds.attrs[a]), a
        assert a in metrics["groups"] and a in report, a
    assert paths.isfile(paths.join(workdir, "eval", "2", f"groups_{ATTRIBUTES[dataset][0]}.png"))
    assert leftovers(workdir) == [] and leftovers(paths.join(workdir, "eval", "2")) == []
    assert not paths.exists(paths.join(workdir, ".pins"))  # nothing but outputs written to the workdir


def test_gs_workdir_without_credentials_fails_in_one_line_before_any_request(tmp_path):
    """Through the real gcsfs (no fake): no credentials -> exit 2 with one line naming the fix, before
    gcsfs falls back to anonymous access and retries (about a minute and a traceback, measured)."""
    pytest.importorskip("gcsfs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_", "DPFT_", "GCE_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=REPO, JAX_PLATFORMS="cpu", NO_GCE_CHECK="True")
    for command in (["train", "--config", CONFIG, "--workdir", "gs://bucket/run"],
                    ["evaluate", "--workdir", str(tmp_path), "--out", "gs://bucket/report"]):
        r = subprocess.run([sys.executable, "-m", "dpft.cli", *command], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("dpft ")]
        assert len(errors) == 1 and "no Google Cloud credentials found" in errors[0], r.stderr
        assert "application-default login" in errors[0] and "GOOGLE_APPLICATION_CREDENTIALS" in errors[0]
        assert "Traceback" not in r.stderr and "retries" not in r.stderr
        assert not os.path.exists(tmp_path / "gs:")
