"""dpft.train.logging_utils: metric files and the progress line."""
import csv
import os
import glob
import json

import jax.numpy as jnp
import numpy as np

from dpft.testing.events import scalars
from dpft.train.logging_utils import MetricWriter, Progress, format_duration


def test_metric_writer_files(tmp_path):
    with MetricWriter(tmp_path, process_index=0) as w:
        w.write(1, {"loss": np.float32(0.5), "lr": 1.0})
        w.write(2, {"loss": jnp.asarray(0.25), "epsilon": 0.3, "split": "train"})
        w.write(3, {"lr": 0.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "lr": 1.0}, {"step": 2, "loss": 0.25, "epsilon": 0.3, "split": "train"},
                     {"step": 3, "lr": 0.5}]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr", "epsilon", "split"]  # header grew, first-seen order
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["epsilon"] == "" and rows[1]["epsilon"] == "0.3" and rows[2]["loss"] == ""
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    # Resume: a new writer keeps the header and appends.
    with MetricWriter(tmp_path, process_index=0, tensorboard=False) as w:
        w.write(4, {"loss": 0.1})
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["loss"] == "0.1"
    # Other processes write nothing.
    other = tmp_path / "other"
    MetricWriter(other, process_index=1).write(1, {"loss": 1.0})
    assert not other.exists()


def test_progress_line_and_eta_with_injected_clock():
    now = [100.0]
    out = []
    p = Progress(1000, clock=lambda: now[0], print_fn=out.append)
    now[0] = 110.0  # 10 updates of 256 examples in 10 s
    line = p.log(10, examples=2560, loss=0.69314, epsilon=1.234)
    assert line == "update   10/1000 (  1.0%) | 256.0 ex/s | loss 0.6931 | eps 1.23 | ETA 0:16:30"
    assert out == [line]
    now[0] = 130.0  # next 10 updates in 20 s: 2 s/update, 980 left
    line = p.line(20, examples=2560)
    assert line == "update   20/1000 (  2.0%) | 128.0 ex/s | ETA 0:32:40"
    assert format_duration(90061) == "1 day, 1:01:01"
    assert format_duration(float("nan")) == "?"
    assert p.line(20, examples=0).endswith("ETA ?")


def test_an_epsilon_without_guarantee_says_so_in_the_progress_line_and_tensorboard(tmp_path):
    """Issue 31: a run whose noise was public (guarantee_valid False) never shows a bare epsilon: the
    progress line marks it, and TensorBoard files it under its own tag; True and None (older callers)
    leave both as they were."""
    now = [0.0]
    p = Progress(100, clock=lambda: now[0], print_fn=None)
    now[0] = 1.0
    assert p.line(1, examples=8, epsilon=2.0, guarantee_valid=False).split(" | ")[2] == \
        "eps 2 (NO GUARANTEE: public noise)"
    for valid in (True, None):
        now[0] += 1.0
        assert p.line(2, examples=8, epsilon=2.0, guarantee_valid=valid).split(" | ")[2] == "eps 2"
    with MetricWriter(tmp_path, process_index=0) as w:
        w.write(1, {"epsilon": 2.0, "guarantee_valid": False, "grad_norm": 0.5},
                tensorboard_tags={"epsilon": "epsilon/NO_GUARANTEE_public_noise"})
        w.write(2, {"epsilon": 3.0, "guarantee_valid": True})
    assert scalars(tmp_path) == {"epsilon/NO_GUARANTEE_public_noise": [(1, 2.0)], "grad_norm": [(1, 0.5)],
                                 "epsilon": [(2, 3.0)]}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "epsilon": 2.0, "guarantee_valid": False, "grad_norm": 0.5}


def test_library_failures_go_to_the_workdir_log_not_the_terminal(tmp_path):
    """An absl error (orbax's writer threads), an uncaught exception in a thread (tensorboardX's flusher)
    and one in an atexit callback (tensorboardX's clean-up) land in WORKDIR/logs/libraries.log; stderr
    keeps one line saying so, and dpft's own lines."""
    import subprocess
    import sys
    script = f"""
import atexit, logging, sys, threading
from dpft.train import library_logs
logging.basicConfig()
print(library_logs.route_to({str(tmp_path)!r}))
logging.getLogger("absl").error("writer thread: RESOURCE_EXHAUSTED")
t = threading.Thread(target=lambda: 1 / 0, name="flusher"); t.start(); t.join()
def cleanup():
    raise OSError(28, "No space left on device")
atexit.register(cleanup)
print("dpft train: error: the verdict", file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "DPFT_DEBUG"})
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "logs" / "libraries.log").read_text()
    assert proc.stdout.strip() == str(tmp_path / "logs" / "libraries.log")
    assert "RESOURCE_EXHAUSTED" in log and "ZeroDivisionError" in log and "No space left on device" in log
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"dpft train: the libraries' own messages go to {tmp_path}/logs/"
                                                "libraries.log", "dpft train: error: the verdict"]
