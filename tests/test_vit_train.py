"""End to end: `dpft train` DP fine-tunes a micro ViT from a big_vision-format `.npz` checkpoint
(config `model.checkpoint`) on a fake CheXpert copy, 2 updates, in a subprocess (8 fake CPU devices)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dpft.models as models
from dpft.data import fake
from dpft.models import vit_checkpoints
from dpft.workdir import checkpointing
from dpft.testing import cpu as cpu_env

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fake_chexpert_vit_micro.py")
RUN_TIMEOUT = 900  # seconds (2 shared CPU cores)


def test_dp_fine_tuning_from_a_big_vision_checkpoint(tmp_path):
    if jax.device_count() != 8:
        pytest.skip(f"needs the 8 fake CPU devices of tests/conftest.py, have {jax.device_count()}")
    root = tmp_path / "data"
    fake.write_fake_chexpert(str(root), n_patients=40, n_valid_patients=10, image_size=32)
    pretrained = models.create("vit_micro", 10, seed=3, head_init="normal")  # "public pre-training", 10 classes
    ckpt = tmp_path / "vit_micro.npz"
    vit_checkpoints.save_npz(pretrained, ckpt)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPFT_", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS=cpu_env.xla_flags(8), JAX_PLATFORMS="cpu")
    exe = shutil.which("dpft", path=os.path.dirname(sys.executable))
    cmd = ([exe] if exe else [sys.executable, "-m", "dpft.cli"]) + [
        "train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), f"--config.data.root={root}",
        f"--config.model.checkpoint={ckpt}", "--config.train.num_updates=2", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    with checkpointing.Checkpointer(str(tmp_path / "run")) as c:
        restored = c.restore(2)
    params = restored.pytrees["params"]
    trained = {vit_checkpoints.bv_name(tuple(k)): np.asarray(v) for k, v in _flat(params)}
    start = vit_checkpoints.to_flat(pretrained)
    fresh = vit_checkpoints.to_flat(models.create("vit_micro", 3, seed=0))
    # The body started from the checkpoint (2 small DP-SGD updates away), not from a fresh init ...
    for key in ("embedding/kernel", "pos_embedding", "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"):
        moved = np.max(np.abs(trained[key] - start[key]))
        assert moved < 0.05 < np.max(np.abs(trained[key] - fresh[key])), key
    # ... and the head is new: one output per CheXpert label (not the checkpoint's 10), started at zero.
    assert trained["head/kernel"].shape[1] != 10 and np.max(np.abs(trained["head/kernel"])) < 0.05


def _flat(tree, prefix=()):
    """(path, leaf) pairs of a nested dict/list tree (orbax-restored NNX state; leaves may be {"value": x})."""
    if isinstance(tree, dict) and set(tree) == {"value"}:
        yield prefix, tree["value"]
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (int(k) if isinstance(k, str) and k.isdigit() else k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, prefix + (i,))
    else:
        yield prefix, tree
