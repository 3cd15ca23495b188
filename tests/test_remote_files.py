"""Inputs on object stores (`dpft.remote_files` and its users): data roots, prepared indexes,
pre-trained checkpoints and evaluation's checkpoint snapshot, each on a local path AND on the fake
`gs://` store (tests/fake_gcs.py, reached through the real etils.epath -> fsspec path).

The reference is always the same input read from a plain local copy: what is read through the
store must equal it record by record / array by array."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import fake_gcs
from dpft import paths, remote_files
from dpft.data import fake, load_splits
from dpft.errors import CheckpointError, DataError
from dpft.models.checkpoints import CheckpointError as ModelCheckpointError


def put_tree(local_dir: str, dest: str) -> str:
    """Copy local folder `local_dir` to `dest` (a local path, or a gs:// URL of the fake store)."""
    shutil.copytree(local_dir, fake_gcs.local(dest) if paths.is_remote(dest) else dest)
    return dest


def same_tables(a: dict, b: dict, prefix_a: str, prefix_b: str) -> None:
    """Tables equal record by record; image paths equal after swapping the root prefix."""
    assert sorted(a) == sorted(b)
    for split in a:
        assert len(a[split]) == len(b[split]) > 0
        assert a[split].meta == b[split].meta
        for ra, rb in zip(a[split].records(), b[split].records()):
            assert ra["image"].startswith(prefix_a) and rb["image"].startswith(prefix_b)
            assert ra["image"][len(prefix_a):].lstrip("/") == rb["image"][len(prefix_b):].lstrip("/")
            assert (ra["example_id"], ra["patient_id"], ra["attrs"]) == (rb["example_id"], rb["patient_id"], rb["attrs"])
            np.testing.assert_array_equal(ra["label"], rb["label"])
            np.testing.assert_array_equal(ra["label_mask"], rb["label_mask"])


def test_chexpert_root_reads_the_same(tmp_path, base):
    ref = fake.write_fake_chexpert(str(tmp_path / "ref"), n_patients=24, n_valid_patients=4, demo="xlsx")
    root = put_tree(ref, paths.join(base, "chexpert"))
    want, got = load_splits("chexpert", ref), load_splits("chexpert", root)
    same_tables(want, got, ref, root)
    assert "race" in got["train"].attribute_names  # the DEMO table was found by listing the store
    from dpft.data.augment import decode_image

    rec = got["test"][0]
    np.testing.assert_array_equal(np.asarray(decode_image(rec["image"])),
                                  np.asarray(decode_image(want["test"][0]["image"])))


def test_chexpert_missing_image_is_named(tmp_path, base):
    ref = fake.write_fake_chexpert(str(tmp_path / "ref"), n_patients=24, n_valid_patients=4, demo=None)
    root = put_tree(ref, paths.join(base, "chexpert"))
    victim = next(iter(fake.read_manifest(ref)["images"]))
    os.remove(os.path.join(fake_gcs.local(root) if paths.is_remote(root) else root, victim))
    with pytest.raises(DataError, match=f"image '{paths.join(root, victim)}' does not exist"):
        load_splits("chexpert", root)
    skipped = load_splits("chexpert", root, on_bad_image="skip")
    assert sum(len(t) for t in skipped.values()) == sum(len(t) for t in load_splits(
        "chexpert", ref, check_files=False).values()) - 1


def test_mimic_root_and_mimic_iv_dir_read_the_same(tmp_path, base):
    ref, iv = str(tmp_path / "ref" / "cxr"), str(tmp_path / "ref" / "iv")
    fake.write_fake_mimic_cxr(ref, n_subjects=12, iv_root=iv, iv_layout="hosp")
    root, iv_url = put_tree(ref, paths.join(base, "cxr")), put_tree(iv, paths.join(base, "iv"))
    want = load_splits("mimic_cxr", ref, mimic_iv_dir=iv)
    got = load_splits("mimic_cxr", root, mimic_iv_dir=iv_url)
    same_tables(want, got, ref, root)
    assert set(got["train"].attribute_names) == {"sex", "age", "race", "insurance", "view"}
    with pytest.raises(DataError, match="not found here or in hosp/"):
        load_splits("mimic_cxr", root, mimic_iv_dir=paths.join(base, "nothing"))


def test_prepare_writes_and_reads_its_index_on_the_store(tmp_path, base, capsys):
    from dpft import cli

    ref = fake.write_fake_chexpert(str(tmp_path / "ref"), n_patients=24, n_valid_patients=4, demo="csv")
    root = put_tree(ref, paths.join(base, "chexpert"))
    out = paths.join(base, "prepared")
    assert cli.main(["prepare", "chexpert", "--source", root, "--out", out, "--no-progress"]) == 0
    assert paths.isfile(paths.join(out, "summary.json")) and paths.isfile(paths.join(out, "index", "meta.json"))
    same_tables(load_splits("chexpert", ref), load_splits("chexpert", root, index_dir=paths.join(out, "index")),
                ref, root)
    assert cli.main(["prepare", "chexpert", "--source", root, "--no-progress"]) == 0  # default --out: on the store
    assert paths.isfile(paths.join(root, "dpft-index", "summary.json"))


@pytest.mark.parametrize("fmt", ["pickle", "npz", "orbax"])
def test_pretrained_checkpoint_reads_the_same(tmp_path, base, fmt):
    import orbax.checkpoint as ocp
    from flax import nnx

    from dpft import models
    from dpft.models import checkpoints

    src = models.create("nfnet_micro", 3, seed=1)
    local = str(tmp_path / "ref" / f"ckpt.{fmt}")
    os.makedirs(os.path.dirname(local))
    if fmt == "orbax":
        with ocp.StandardCheckpointer() as w:
            w.save(local, {"params": checkpoints.to_haiku_tree(src), "state": {}})
    else:
        checkpoints.save_model(src, local, fmt=fmt)
    remote = paths.join(base, f"ckpt.{fmt}")
    if os.path.isdir(local):
        put_tree(local, remote)
    else:
        atomic_io_write(remote, open(local, "rb").read())
    got = models.load_pretrained(remote, "nfnet_micro")
    want = models.load_pretrained(local, "nfnet_micro")
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(got, nnx.Param)),
                                nnx.to_flat_state(nnx.state(want, nnx.Param))):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    with pytest.raises(ModelCheckpointError, match=f"checkpoint '{paths.join(base, 'missing.npz')}' does not exist"):
        models.load_pretrained(paths.join(base, "missing.npz"), "nfnet_micro")


def atomic_io_write(path: str, data: bytes) -> None:
    from dpft import atomic_io

    atomic_io.make_dir(paths.dirname(path))
    atomic_io.write_bytes(path, data)


def test_vit_npz_reads_the_same(tmp_path, base):
    from dpft import models
    from dpft.models import vit_checkpoints

    src = models.create("vit_micro", 5, seed=2)
    local = str(tmp_path / "vit.npz")
    vit_checkpoints.save_npz(src, local)
    remote = paths.join(base, "vit.npz")
    atomic_io_write(remote, open(local, "rb").read())
    want, got = vit_checkpoints.read_flat(local), vit_checkpoints.read_flat(remote)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    atomic_io_write(paths.join(base, "not.npz"), b"\x80 not a zip")
    with pytest.raises(ModelCheckpointError, match="not an .npz"):
        vit_checkpoints.read_flat(paths.join(base, "not.npz"))


def test_file_set_lists_once_and_answers_like_the_disk(tmp_path, gcs, monkeypatch):
    ref = fake.write_fake_chexpert(str(tmp_path / "ref"), n_patients=4, n_valid_patients=2, demo=None)
    root = put_tree(ref, "gs://bucket/cx")
    calls = []
    real = remote_files.list_files
    monkeypatch.setattr(remote_files, "list_files", lambda url: calls.append(url) or real(url))
    files = remote_files.FileSet(root)
    names = list(fake.read_manifest(ref)["images"])
    assert all(files.exists(paths.join(root, n)) for n in names)
    assert not files.exists(paths.join(root, names[0] + ".gone"))
    assert calls == [root]  # one listing for every question
    assert files.exists(os.path.join(ref, names[0])) and not files.exists(os.path.join(ref, "nope"))


# ---------------------------------------------------------------------------- evaluation's snapshot

def _save_steps(directory: str, steps=(2, 4)) -> dict:
    import jax.numpy as jnp

    from dpft.workdir import checkpointing as C

    states = {}
    with C.Checkpointer(directory, keep=5) as ckpt:
        for s in steps:
            states[s] = {"params": {"w": jnp.full((3,), float(s))}, "opt_state": {"mu": jnp.ones(4) * s}}
            ckpt.save(s, pytrees=states[s], json_items={"plan": {"step": s}, "secret": {"key": "SECRET"}})
    return states


@pytest.fixture
def remote_run(gcs, monkeypatch):
    """gs://bucket/run with checkpoints 2 and 4. orbax writes arrays through tensorstore's own GCS
    driver (HTTP, never fsspec), so, as in the training test, orbax's side of the checkpoint
    directory is the fake store's backing folder; dpft's copy reads it as the store."""
    from dpft.workdir import checkpointing as C

    url = "gs://bucket/run"
    os.makedirs(fake_gcs.local(url))
    states = _save_steps(fake_gcs.local(url))
    real = C.checkpoint_dir
    monkeypatch.setattr(C, "checkpoint_dir", lambda w: fake_gcs.local(real(w)) if paths.is_remote(w) else real(w))
    return url, states


def test_remote_pin_reads_a_verified_copy_of_the_chosen_items(remote_run):
    from dpft.workdir import checkpointing as C

    url, states = remote_run
    before = sorted(os.walk(fake_gcs.local(url)))
    with C.pinned(url, items=("params", "plan")) as (ckpt, step):
        assert step == 4 and not paths.is_remote(ckpt.directory) and ckpt.read_only
        copied = os.listdir(os.path.join(ckpt.directory, "4"))
        assert "params" in copied and "opt_state" not in copied and "secret" not in copied
        r = ckpt.restore(step, items=("params", "plan"))
        assert r.verified == 1 and set(r.pytrees) == {"params"} and r.json_items == {"plan": {"step": 4}}
        np.testing.assert_array_equal(np.asarray(r.pytrees["params"]["w"]), np.asarray(states[4]["params"]["w"]))
        tmp = os.path.dirname(ckpt.directory)
        assert os.stat(tmp).st_mode & 0o077 == 0  # private
    assert not os.path.exists(tmp)
    assert sorted(os.walk(fake_gcs.local(url))) == before  # read-only on the workdir


def test_remote_pin_never_uses_a_step_deleted_mid_copy(remote_run, monkeypatch):
    """A keep-N cleanup deleting the step while it is copied: the copy is discarded and the then
    latest step read instead; with an explicit step, a CheckpointError."""
    from dpft.workdir import checkpointing as C

    url, states = remote_run
    real = remote_files.download_tree
    victims = [4]

    def delete_during_copy(src, dest, only=None):
        out = real(src, dest, only)
        if victims and src.rstrip("/").endswith(f"/{victims[0]}"):
            shutil.rmtree(os.path.join(C.checkpoint_dir(url), str(victims.pop())))  # the cleanup
        return out

    monkeypatch.setattr(remote_files, "download_tree", delete_during_copy)
    with C.pinned(url) as (ckpt, step):
        assert step == 2
        r = ckpt.restore(step)
        np.testing.assert_array_equal(np.asarray(r.pytrees["params"]["w"]), np.asarray(states[2]["params"]["w"]))
    victims.append(2)
    with pytest.raises(CheckpointError, match="checkpoint 2 was deleted while it was being read"):
        with C.pinned(url, 2):
            pass
