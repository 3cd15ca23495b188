"""The run's secret is out of other users' reach from the moment it exists: under umask 022, the
checkpoint tree, a quarantined (corrupt) checkpoint and an evaluation's pinned snapshot are
owner-only. Checked by mode, and, where the tests run as root, by trying to read the secret as
the user `nobody` (with a negative control: a plain 0644 file beside it is readable)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import jax.numpy as jnp
import pytest

from dpft import atomic_io
from dpft.workdir import checkpointing as ck

NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared_dir():
    """A directory every user may traverse (pytest's own tmp root is 0700, which would hide everything)."""
    d = tempfile.mkdtemp(prefix="dpft-perm-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def readable_by_nobody(path: str) -> bool | None:
    """Whether user nobody can read `path` (None where the tests cannot switch users)."""
    if os.geteuid() != 0:
        return None
    cat = shutil.which("cat")
    r = subprocess.run([cat, path], user=NOBODY, group=NOBODY, capture_output=True, timeout=60)
    return r.returncode == 0


def secret_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f"{os.sep}secret" in d]


def test_secret_is_owner_only_in_checkpoints_quarantine_and_pins(shared_dir):
    wd = os.path.join(shared_dir, "run")
    with umask(0o022):
        os.makedirs(wd)
        control = os.path.join(wd, "public.txt")
        with open(control, "w") as f:
            f.write("public")
        ckpt = ck.Checkpointer(wd, keep=3)
        for step in (1, 2):
            ckpt.save(step, pytrees={"params": {"w": jnp.ones(3)}},
                      json_items={"secret": {"words": ["0123456789abcdef"] * 8, "source": "csprng"}})
        ckpt.wait()
        assert atomic_io.is_owner_only(ck.checkpoint_dir(wd))
        live = secret_files(ck.checkpoint_dir(wd))
        assert live, "the test must find the secret item's files"
        moved = ckpt.quarantine(1, "test")
        ckpt.close()
        assert atomic_io.is_owner_only(os.path.join(wd, ck.QUARANTINE_DIR))
        quarantined = secret_files(moved)
        assert quarantined
        with ck.pinned(wd, 2, print_fn=lambda *a: None) as (reader, step):
            assert step == 2
            pin_root = os.path.join(wd, ck.PIN_DIR)
            assert atomic_io.is_owner_only(pin_root)
            pinned_files = secret_files(pin_root)
            assert pinned_files
            seen = {p: readable_by_nobody(p) for p in pinned_files}
    if readable_by_nobody(control) is None:
        pytest.skip("not root: the modes are checked, reading as another user is not")
    assert readable_by_nobody(control), "negative control: a 0644 file in a 0755 tree is readable"
    seen.update({p: readable_by_nobody(p) for p in live[:2] + quarantined[:2]})
    assert not any(seen.values()), [p for p, ok in seen.items() if ok]


def test_an_existing_world_readable_checkpoint_tree_is_made_owner_only(shared_dir):
    wd = os.path.join(shared_dir, "old_run")
    with umask(0o022):
        os.makedirs(os.path.join(wd, "checkpoints"))  # as an earlier dpft left it: 0755
        assert not atomic_io.is_owner_only(ck.checkpoint_dir(wd))
        ck.Checkpointer(wd, keep=2).close()
    assert atomic_io.is_owner_only(ck.checkpoint_dir(wd))


def test_individual_norms_are_owner_only_and_verify_lists_them_when_not(shared_dir):
    """The per-example norms of individual accounting (`WORKDIR/individual_norms/<update>.npz`) sit outside the
    checkpoint tree: their directory is made owner-only under umask 022, and `dpft verify` lists a
    world-readable one (and a world-readable norms file in it) as a private path open to other users."""
    import numpy as np

    from dpft.evaluate import verify_cli
    from dpft.privacy.individual import hook
    from dpft.privacy.individual.norms import NormRecorder

    wd = os.path.join(shared_dir, "run")
    rec = NormRecorder(5, 0.5, every=1)
    rec.record_all(0, np.linspace(0, 2, 5))
    with umask(0o022):
        os.makedirs(wd)
        item = hook.IndividualHook(rec).checkpoint_item(wd, 1, write=True)
    norms_dir, norms_file = os.path.join(wd, "individual_norms"), os.path.join(wd, item["norms_file"])
    assert atomic_io.is_owner_only(norms_dir) and atomic_io.is_owner_only(norms_file)
    assert norms_dir in verify_cli.private_paths(wd) and norms_file in verify_cli.private_paths(wd)
    assert verify_cli.permission_problems(wd) == []
    os.chmod(norms_dir, 0o755)
    os.chmod(norms_file, 0o644)
    problems = verify_cli.permission_problems(wd)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{norms_dir}: mode drwxr-xr-x lets other users read it")
    assert problems[1].startswith(f"{norms_file}: mode -rw-r--r-- lets other users read it")
