"""Every bad value and environment fault named in issue 15 is refused in one line with its exit
code, before any data is loaded; unexpected exceptions keep their traceback."""
from __future__ import annotations

import errno
import logging
import math
import os
import subprocess
import sys
import threading
import types

import pytest

from dpft import cli, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fake_chexpert_tiny.py")


def _one_line_error(err: str, command: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dpft {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if anything tries to load a data set (or build a model)."""
    from dpft.config import build as setup_lib

    def refuse(*a, **k):
        raise AssertionError("data was loaded before the bad value was refused")

    monkeypatch.setattr(setup_lib, "load_tables", refuse)
    monkeypatch.setattr(setup_lib, "build_model", refuse)


def _train(tmp_path, *overrides, workdir=None) -> list[str]:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    return ["train", "--config", CONFIG, "--workdir", str(workdir or tmp_path / "run"),
            f"--config.data.root={root}", *overrides]


# ------------------------------------------------------------------------------ config values

BAD_CONFIG = [
    ("privacy.noise_multiplier", "nan"), ("privacy.noise_multiplier", "inf"),
    ("privacy.noise_multiplier", "1e308"), ("privacy.noise_multiplier", "1e-308"),
    ("privacy.noise_multiplier", "0.001"), ("privacy.clip_norm", "inf"), ("privacy.clip_norm", "nan"),
    ("privacy.epsilon", "nan"), ("privacy.epsilon", "inf"), ("privacy.delta", "nan"),
    ("train.optimizer.weight_decay", "nan"), ("train.optimizer.weight_decay", "inf"),
    ("train.optimizer.learning_rate", "inf"), ("train.optimizer.learning_rate", "nan"),
    ("train.optimizer.momentum", "nan"), ("train.ema_decay", "nan"), ("individual.norm_grid", "inf"),
    ("seed", str(10**20)), ("train.num_updates", str(10**12)),  # an overflow in jax; a 99.8 TiB accountant
    ("privacy.unit", "hospital"), ("privacy.unit_cap", "-1"),
    ("privacy.unit_cap", "2"),  # a cap of a patient's images in an example-level run
]


@pytest.mark.parametrize("field,value", BAD_CONFIG)
def test_bad_config_value_is_refused_in_one_line_before_data(tmp_path, capsys, no_data, field, value):
    rc = cli.main(_train(tmp_path, f"--config.{field}={value}", "--config.individual.enabled=True"))
    line = _one_line_error(capsys.readouterr().err, "train")
    assert rc == 2, line
    assert f"config.{field}=" in line, line
    assert not (tmp_path / "run").exists()  # nothing written either


def test_patient_unit_on_data_without_patient_ids_is_one_line(tmp_path, capsys):
    rc = cli.main(["train", "--config", os.path.join(REPO, "configs", "digits_demo.py"), "--workdir",
                   str(tmp_path / "run"), "--config.privacy.unit=patient"])
    line = _one_line_error(capsys.readouterr().err, "train")
    assert rc == 2 and "config.privacy.unit='patient'" in line and "'digits'" in line, line


def test_validate_refuses_non_finite_anywhere_and_names_each():
    from dpft.config.base import load_config
    from dpft.config.validation import validate

    config = load_config(CONFIG, ["--config.train.optimizer.weight_decay=nan", "--config.privacy.clip_norm=inf"])
    with pytest.raises(errors.ConfigError) as info:
        validate(config, check_paths=False)
    msg = str(info.value)
    assert "config.train.optimizer.weight_decay=nan must be a finite number" in msg
    assert "config.privacy.clip_norm=inf must be a finite number" in msg


def test_resume_comparison_is_nan_safe():
    """A workdir written with NaN in its config (before NaN was refused) still resumes."""
    from dpft.train import resume
    from dpft.config.base import load_config

    old = load_config(CONFIG, ["--config.train.optimizer.weight_decay=nan"])
    new = load_config(CONFIG, ["--config.train.optimizer.weight_decay=nan"])
    resume.check_resume_config(old, new, "wd")  # no "nan -> nan" mismatch
    changed = load_config(CONFIG, ["--config.train.optimizer.weight_decay=0.1"])
    with pytest.raises(errors.UsageError, match="weight_decay: nan -> 0.1"):
        resume.check_resume_config(old, changed, "wd")


# ------------------------------------------------------------------------------ workdir

def test_an_unknown_eval_split_is_refused_once_the_data_is_loaded(tmp_path, capsys):
    digits = os.path.join(os.path.dirname(CONFIG), "digits_demo.py")
    rc = cli.main(["train", "--config", digits, "--workdir", str(tmp_path / "run"), "--config.eval.splits=tset"])
    err = capsys.readouterr().err  # (the data loads first: a host-memory note may come before)
    errors_ = [l for l in err.splitlines() if l.startswith("dpft train: error: ")]
    assert len(errors_) == 1 and "Traceback" not in err, err
    line = errors_[0]
    assert rc == 2 and "config.eval.splits=['tset']: ['tset'] not among the splits" in line and "'test'" in line, line


@pytest.mark.parametrize("source,line,says", [
    ("def get_config(:\n    pass\n", 1, "SyntaxError: invalid syntax"),
    ("import no_such_module_here\ndef get_config():\n    return None\n", 1,
     "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("def get_config():\n    x = 1\n    raise ValueError('boom')\n", 3, "ValueError: boom"),
])
def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path, capsys, monkeypatch, source, line, says):
    cfg = tmp_path / "broken.py"
    cfg.write_text(source)
    monkeypatch.delenv("DPFT_DEBUG", raising=False)
    rc = cli.main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    got = [l for l in err.splitlines() if l.startswith("dpft train: error: ")]
    assert rc == 2 and len(got) == 1 and "Traceback" not in err, err
    assert f"config file '{cfg}', line {line}: {says}" in got[0] and "DPFT_DEBUG=1" in got[0], got[0]
    monkeypatch.setenv("DPFT_DEBUG", "1")  # the traceback for the author of the config
    with pytest.raises(Exception) as info:
        cli.main(["train", "--config", str(cfg), "--workdir", str(tmp_path / "run")])
    assert not isinstance(info.value, errors.DpftError)


def test_workdir_that_is_a_file_is_refused_before_data(tmp_path, capsys, no_data):
    f = tmp_path / "afile"
    f.write_text("x")
    rc = cli.main(_train(tmp_path, workdir=f))
    line = _one_line_error(capsys.readouterr().err, "train")
    assert rc == errors.FilesystemError.exit_code == 5
    assert "is not a directory" in line and str(f) in line


@pytest.fixture
def tmpfs(tmpfs_mount):
    """A real tmpfs (conftest `tmpfs_mount`); yields (mountpoint, remount(options))."""
    mnt = tmpfs_mount("512k")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)

    return mnt, remount


def test_read_only_workdir_is_refused_before_data(tmp_path, capsys, no_data, tmpfs):
    mnt, remount = tmpfs
    remount("ro")
    rc = cli.main(_train(tmp_path, workdir=mnt / "run"))
    line = _one_line_error(capsys.readouterr().err, "train")
    assert rc == 5 and "Read-only file system" in line, line


# ------------------------------------------------------------------------------ accountant / audit

@pytest.mark.parametrize("args,needle", [
    (["--noise-multiplier", "1e308", "--steps", "100"], "--noise-multiplier"),
    (["--noise-multiplier", "1e-308", "--steps", "100"], "--noise-multiplier"),
    (["--noise-multiplier", "1e-3", "--steps", "10000"], "--noise-multiplier"),
    (["--noise-multiplier", "inf", "--steps", "100"], "--noise-multiplier"),
    (["--noise-multiplier", "nan", "--steps", "100"], "--noise-multiplier"),
    (["--noise-multiplier", "1", "--steps", "1e20"], "--steps"),
    (["--noise-multiplier", "1", "--steps", "100000000000000000000"], "--steps"),
    (["--noise-multiplier", "0.1", "--steps", "10000000"], "RDP upper bound"),  # would need > 20 GiB in PLD
    (["--target-epsilon", "inf", "--steps", "100"], "--target-epsilon"),
    (["--target-epsilon", "1e300", "--steps", "100"], "too large"),
])
def test_accountant_bad_values_one_line(capsys, args, needle):
    rc = cli.main(["accountant", "--sampling-rate", "0.01", "--delta", "1e-5", *args])
    line = _one_line_error(capsys.readouterr().err, "accountant")
    assert rc == 2 and needle in line, line


@pytest.mark.parametrize("args,needle", [
    (["--noise-multiplier", "inf"], "--noise-multiplier"), (["--noise-multiplier", "1e308"], "--noise-multiplier"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**40)], "--seed"), (["--epsilon", "nan"], "--epsilon"),
    (["--delta", "nan"], "--delta"), (["--sampling-rate", "inf"], "--sampling-rate"), (["--steps", "0"], "--steps"),
    (["--canaries", str(10**11)], "--canaries"),  # 745 GiB
])
def test_audit_bad_values_refused_before_training(capsys, monkeypatch, args, needle):
    from dpft.train import canary_audit as audit

    def refuse(*a, **k):
        raise AssertionError("the audit trained before the bad value was refused")

    monkeypatch.setattr(audit, "run_audit", refuse)
    rc = cli.main(["audit", *args])
    line = _one_line_error(capsys.readouterr().err, "audit")
    assert rc == 2 and needle in line, line


# ------------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    from dpft.data import fake

    root = str(tmp_path_factory.mktemp("fake_chexpert"))
    fake.write_fake_chexpert(root, n_patients=24, n_valid_patients=4, image_size=16)
    return root


def _train_csv(root: str) -> str:
    for dirpath, _, files in os.walk(root):
        if "train.csv" in files:
            return os.path.join(dirpath, "train.csv")
    raise AssertionError("no train.csv")


@pytest.mark.parametrize("content", [b"", b"\xc4\x8f\xff\xfe\x00\x01binary\x9c" * 50])
def test_empty_or_binary_train_csv_is_a_one_line_data_error(tmp_path, capsys, fake_root, content):
    import shutil

    from dpft.data import chexpert

    root = str(tmp_path / "data")
    shutil.copytree(fake_root, root)
    with open(_train_csv(root), "wb") as f:
        f.write(content)
    with pytest.raises(errors.DataError, match="train.csv: not a readable CSV file"):
        chexpert.load_splits(root, uncertainty="ones")
    rc = cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"--config.data.root={root}"])
    line = _one_line_error(capsys.readouterr().err, "train")
    assert rc == 2 and "train.csv" in line


def test_unparseable_age_is_counted_and_reported(tmp_path, caplog, fake_root):
    import csv
    import shutil

    from dpft.data import chexpert

    root = str(tmp_path / "data")
    shutil.copytree(fake_root, root)
    path = _train_csv(root)
    rows = list(csv.reader(open(path, newline="")))
    frontal = [i for i, r in enumerate(rows[1:], start=1) if r[3] == "Frontal"]
    for i, value in zip(frontal[:2], ["forty", "-3"]):
        rows[i][2] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with caplog.at_level(logging.WARNING, logger="dpft.data.chexpert"):
        splits = chexpert.load_splits(root, uncertainty="ones")
    msgs = [r.getMessage() for r in caplog.records if "unparseable Age" in r.getMessage()]
    assert len(msgs) == 1 and " 2 unparseable Age value(s)" in msgs[0] and "'forty'" in msgs[0], msgs
    assert sum(r["attrs"]["age"] == "Unknown" for s in splits.values() for r in s.records()) >= 2


# ------------------------------------------------------------------------------ the CLI's mapping

def _fake_command(monkeypatch, exc: BaseException) -> None:
    """Registers `dpft fake`, whose run raises `exc`."""
    mod = types.ModuleType("dpft_fake_cmd")
    mod.add_arguments = lambda parser: None

    def run(args):
        raise exc

    mod.run = run
    monkeypatch.setitem(sys.modules, "dpft_fake_cmd", mod)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("dpft_fake_cmd", "test"))


@pytest.mark.parametrize("exc,code", [
    (errors.UsageError("bad\nvalue"), 2), (errors.ConfigError("c"), 2), (errors.DataError("d"), 2),
    (errors.CheckpointError("k"), 3), (errors.WorkdirBusyError("w"), 4),
    (errors.FilesystemError(errno.ENOSPC, "full", "/x"), 5), (errors.NonFiniteError("n"), 6),
    (OSError(errno.ENOSPC, "No space left on device", "/w/x"), 5),
    (OSError(errno.EROFS, "Read-only file system", "/w"), 5),
    (PermissionError(errno.EACCES, "Permission denied", "/w"), 5),
])
def test_cli_maps_expected_errors_to_one_line_and_exit_code(monkeypatch, capsys, exc, code):
    _fake_command(monkeypatch, exc)
    assert cli.main(["fake"]) == code
    _one_line_error(capsys.readouterr().err, "fake")


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("k"), OSError(errno.ENOENT, "gone"),
                                 ValueError("plain ValueError is a bug, not a usage error")])
def test_cli_keeps_the_traceback_of_unexpected_errors(monkeypatch, exc):
    _fake_command(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["fake"])


def test_usage_error_is_still_importable_from_cli():
    from dpft.errors import UsageError
    from dpft.errors import DataError

    assert UsageError is errors.UsageError and issubclass(UsageError, ValueError)
    assert DataError is errors.DataError and issubclass(DataError, UsageError)


# ------------------------------------------------------------------------------ pure guards

def test_check_finite_update_and_trees():
    import jax.numpy as jnp

    from dpft.config.validation import check_finite_trees, check_finite_update

    check_finite_update({"loss_sum": 1.0, "grad_norm": 2.0}, 3, 2)
    for bad in ({"loss_sum": math.nan, "grad_norm": 1.0}, {"loss_sum": 1.0, "grad_norm": math.inf}):
        with pytest.raises(errors.NonFiniteError, match="update 3: non-finite .*last saved: checkpoint 2.*in a new --workdir"):
            check_finite_update(bad, 3, 2)
    check_finite_trees({"params": {"w": jnp.ones(3)}, "update": jnp.asarray(4)}, 4)
    with pytest.raises(errors.NonFiniteError, match="non-finite values in ema"):
        check_finite_trees({"params": {"w": jnp.ones(3)}, "ema": {"w": jnp.asarray([1.0, jnp.nan])}}, 4)


def test_check_ledger_refuses_every_mismatch():
    from dpft.privacy.accounting import Ledger
    from dpft.workdir.ledger_check import check_ledger

    ledger = Ledger()
    ledger.record(0.25, 1.5, n=12)
    ok = dict(updates=12, sampling_rate=0.25, noise_multiplier=1.5, private=True)
    check_ledger(ledger, **ok, data_state={"update_index": 12, "physical_batch_index": 0})
    tampered = Ledger()
    tampered.record(0.25, 1.5, n=2)
    with pytest.raises(errors.CheckpointError, match="records 2 update.*at update 12"):
        check_ledger(tampered, **ok)
    with pytest.raises(errors.CheckpointError, match="sigma=1.5.*sigma=2.0"):
        check_ledger(ledger, **{**ok, "noise_multiplier": 2.0})
    with pytest.raises(errors.CheckpointError, match="q=0.25.*q=0.5"):
        check_ledger(ledger, **{**ok, "sampling_rate": 0.5})
    with pytest.raises(errors.CheckpointError, match="data iterator is at update 11"):
        check_ledger(ledger, **ok, data_state={"update_index": 11})
    check_ledger(Ledger(), updates=5, sampling_rate=0.25, noise_multiplier=0.0, private=False)
    with pytest.raises(errors.CheckpointError, match="non-private"):
        check_ledger(ledger, updates=12, sampling_rate=0.25, noise_multiplier=0.0, private=False)


# ------------------------------------------------------------------------------ full disk names the file

@pytest.mark.parametrize("writer", ["write_text", "append_text"])
def test_a_write_on_a_full_disk_names_the_file(tmp_path, tmpfs_mount, writer):
    """A failed write()/fsync() on an open file raises an OSError without a filename; dpft's
    writers re-raise it naming the file, so the CLI's one line says where the disk is full."""
    from dpft import atomic_io

    target = tmpfs_mount("64k") / "metrics.jsonl"
    with pytest.raises(OSError) as info:
        getattr(atomic_io, writer)(target, "x" * 200_000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target), info.value
    assert str(target) in errors.describe_oserror(info.value)


def test_naming_keeps_an_oserror_that_already_names_a_file():
    from dpft import atomic_io

    with pytest.raises(OSError) as info, atomic_io.naming("/elsewhere"):
        raise OSError(errno.ENOSPC, "No space left on device", "/the/real/file")
    assert info.value.filename == "/the/real/file"
    with pytest.raises(errors.FilesystemError), atomic_io.naming("/elsewhere"):
        raise errors.FilesystemError(errno.ENOSPC, "cannot save checkpoint 2", "/ckpt")


def test_settle_waits_for_writer_threads_that_reraise_on_join():
    """orbax's writer threads re-raise their own failure from join(); waiting for them after a
    failed save must not replace the save's explained error with that raw one."""
    import threading

    from dpft.workdir import checkpointing

    class Raising(threading.Thread):
        def join(self, timeout=None):
            super().join(timeout)
            raise ValueError("RESOURCE_EXHAUSTED: from the writer thread")

    before = set(threading.enumerate())
    t = Raising(target=lambda: None)
    t.start()
    checkpointing._settle(before)  # would raise ValueError without the guard
    assert not t.is_alive()


def test_cli_error_line_is_one_write(monkeypatch):
    """The error line and its newline reach stderr in one write: a background thread's log line
    cannot land between them (it did, in CI, with print())."""
    writes: list[str] = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    _fake_command(monkeypatch, errors.FilesystemError(errno.ENOSPC, "disk full at /w", "/w"))
    monkeypatch.setattr(sys, "stderr", Recorder())
    threads_alive = threading.active_count() > 1  # earlier tests of this worker may have left some
    assert cli.main(["fake"]) == 5
    # One write; it starts with a newline only while other threads might have written half a line.
    assert writes == [("\n" if threads_alive else "") + "dpft fake: error: disk full at /w\n"]
