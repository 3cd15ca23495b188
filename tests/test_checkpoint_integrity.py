"""Real faults in real orbax checkpoints: flipped bytes (found where orbax itself does not notice),
truncated and missing items, fallback to the newest intact step, quarantine, read-only
readers that never clean up a live run's in-progress save, pinned snapshots, a full disk."""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dpft import errors
from dpft.workdir import checkpointing as C


def _state(seed: int) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"conv": {"w": jax.random.normal(k[0], (3, 3, 16, 32)), "b": jax.random.normal(k[1], (32,))},
              "linear": {"w": jax.random.normal(k[2], (64, 10))}}
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    opt_state = jax.tree.map(lambda x: x + jax.random.normal(k[0], x.shape) if x.dtype == jnp.float32 else x,
                             opt_state)  # random momentum (zeros would compress to nothing)
    ema = jax.tree.map(lambda x: x * 0.9, params)
    return {"params": params, "opt_state": opt_state, "ema": ema, "update": jnp.asarray(seed)}


def _save_steps(workdir, steps=(2, 4, 6)) -> dict[int, dict]:
    states = {}
    with C.Checkpointer(workdir, keep=5) as ckpt:
        for s in steps:
            states[s] = _state(s)
            ckpt.save(s, pytrees=states[s], json_items={"ledger": {"steps": s}, "data_state": {"update_index": s}})
    return states


def _data_files(item_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(item_dir):
        if os.sep + "d" in root[len(item_dir):]:
            out += [os.path.join(root, f) for f in files]
    return sorted(out, key=os.path.getsize, reverse=True)


def _plain_orbax_leaves(item_dir: str) -> list[np.ndarray] | None:
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(item_dir))]
    except Exception:  # noqa: BLE001 - orbax noticed the damage
        return None


def _find_silent_flip(item_dir: str) -> tuple[str, int]:
    """A byte of `item_dir`'s data whose flip orbax restores WITHOUT an error but with other values."""
    ref = _plain_orbax_leaves(item_dir)
    assert ref is not None
    for path in _data_files(item_dir):
        data = open(path, "rb").read()
        for frac in np.linspace(0.05, 0.95, 19):
            i = int(len(data) * frac)
            flipped = bytearray(data)
            flipped[i] ^= 0x01
            open(path, "wb").write(bytes(flipped))
            got = _plain_orbax_leaves(item_dir)
            open(path, "wb").write(data)
            if got is not None and any(not np.array_equal(a, b) for a, b in zip(ref, got)):
                return path, i
    pytest.fail(f"no byte of {item_dir} flips silently under plain orbax")


def _flip(path: str, i: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_checksums_written_and_verified(tmp_path):
    states = _save_steps(tmp_path, steps=(2,))
    with C.Checkpointer(tmp_path) as ckpt:
        r = ckpt.restore(2, targets={k: v for k, v in states[2].items()})
    n_leaves = sum(len(jax.tree.leaves(v)) for v in states[2].values())
    assert r.verified == n_leaves and r.unchecked == 0
    assert "checksums" not in r.json_items and r.json_items["ledger"] == {"steps": 2}


@pytest.mark.parametrize("item", ["params", "ema", "opt_state"])
def test_silently_flipped_byte_is_detected(tmp_path, item):
    states = _save_steps(tmp_path, steps=(2,))
    path, i = _find_silent_flip(os.path.join(C.checkpoint_dir(tmp_path), "2", item))
    _flip(path, i)  # orbax alone restores this checkpoint with altered values (checked above)
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CorruptCheckpoint, match=f"item '{item}': checksum mismatch in 1 array"):
            ckpt.restore(2, targets=dict(states[2]))
        with pytest.raises(C.CorruptCheckpoint, match="checksum mismatch"):
            ckpt.restore(2)  # also without targets


@pytest.mark.parametrize("item,edit", [("ledger", {"steps": 5}), ("data_state", {"update_index": 7})])
def test_an_edited_json_item_is_corrupt_and_the_run_falls_back(tmp_path, item, edit):
    """Every JSON item has its digest in the checksum record: a one-value edit of the latest step makes
    it corrupt (naming the item), and the newest intact step is used; the same value written with other
    spacing and key order is no edit."""
    import json
    states = _save_steps(tmp_path)
    path = os.path.join(C.checkpoint_dir(tmp_path), "6", item, "metadata")
    doc = json.load(open(path))
    json.dump(doc, open(path, "w"), indent=3)  # re-serialised, same value
    with C.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(6).json_items[item] == doc
    json.dump({**doc, **edit}, open(path, "w"))
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(C.CorruptCheckpoint, match=f"item '{item}': checksum mismatch"):
            ckpt.restore(6, targets=dict(states[6]))
        r, skipped = C.newest_intact(ckpt, lambda s: ckpt.restore(s, targets=dict(states[s])), report=lambda m: None)
    assert r.step == 4 and [s for s, _ in skipped] == [6]


def test_json_items_of_a_checkpoint_without_their_digests_are_read_unchecked(tmp_path):
    """Checkpoints written before the JSON digests existed still restore (their arrays are checked)."""
    import json
    states = _save_steps(tmp_path, steps=(2,))
    path = os.path.join(C.checkpoint_dir(tmp_path), "2", C.CHECKSUMS, "metadata")
    record = json.load(open(path))
    assert set(record["json"]) == {"ledger", "data_state"}
    del record["json"]
    json.dump(record, open(path, "w"))
    with C.Checkpointer(tmp_path) as ckpt:
        r = ckpt.restore(2, targets=dict(states[2]))
    assert r.json_items["ledger"] == {"steps": 2} and r.verified > 0


def test_the_config_item_read_alone_is_checked_against_the_checksum_record(tmp_path):
    """`read_json_item` (what `contract.checkpoint_config` reads for resume, evaluate, verify and export before
    any array) checks the item's digest as `restore` does: an edited config makes the step corrupt, naming
    the item, before any caller compares or builds a model from it; a checkpoint without JSON digests is
    read unchecked."""
    import json

    from dpft.config.base import config_to_json, load_config
    from dpft.workdir import contract

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "fake_chexpert_tiny.py"))
    with C.Checkpointer(tmp_path, keep=5) as ckpt:
        ckpt.save(2, pytrees={"params": {"w": jnp.ones(3)}}, json_items={"config": json.loads(config_to_json(config))})
    directory = C.checkpoint_dir(tmp_path)
    assert contract.checkpoint_config(directory, 2).train.optimizer.learning_rate == 4.0
    path = os.path.join(directory, "2", "config", "metadata")
    doc = json.load(open(path))
    doc["train"]["optimizer"]["learning_rate"] = 123.0
    json.dump(doc, open(path, "w"))
    with pytest.raises(C.CorruptCheckpoint, match=r"checkpoints/2 is corrupt: item 'config': checksum mismatch") as e:
        contract.checkpoint_config(directory, 2)
    assert e.value.reason == "item 'config': checksum mismatch (its JSON was edited or damaged)"  # not re-wrapped
    with pytest.raises(C.CorruptCheckpoint, match="item 'config': checksum mismatch"):
        C.read_json_item(directory, 2, "config")
    record_path = os.path.join(directory, "2", C.CHECKSUMS, "metadata")
    record = json.load(open(record_path))
    del record["json"]  # as written before the JSON digests existed
    json.dump(record, open(record_path, "w"))
    assert contract.checkpoint_config(directory, 2).train.optimizer.learning_rate == 123.0


def _truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("damage,needle", [
    ("truncate_ledger_json", "item 'ledger'"),
    ("remove_params_item", "item 'params'"),
    ("truncate_params_data", "item 'params'"),
    ("truncate_manifest", "item 'manifest'"),
    ("remove_checksums", "item 'checksums'"),
])
def test_damaged_latest_falls_back_to_newest_intact(tmp_path, damage, needle):
    states = _save_steps(tmp_path)
    step6 = os.path.join(C.checkpoint_dir(tmp_path), "6")
    if damage == "truncate_ledger_json":
        _truncate(os.path.join(step6, "ledger", "metadata"))
    elif damage == "remove_params_item":
        shutil.rmtree(os.path.join(step6, "params"))
    elif damage == "truncate_params_data":
        for f in _data_files(os.path.join(step6, "params")):
            _truncate(f)
    elif damage == "truncate_manifest":
        _truncate(os.path.join(step6, "manifest", "metadata"))
    elif damage == "remove_checksums":
        shutil.rmtree(os.path.join(step6, "checksums"))
    reports = []
    with C.Checkpointer(tmp_path) as ckpt:
        r, skipped = C.newest_intact(ckpt, lambda s: ckpt.restore(s, targets=dict(states[s])), report=reports.append)
        assert r.step == 4 and [s for s, _ in skipped] == [6] and needle in skipped[0][1]
        assert len(reports) == 1 and "checkpoints/6 is corrupt" in reports[0] and needle in reports[0]
        for a, b in zip(jax.tree.leaves(r.pytrees), jax.tree.leaves(states[4])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # Moved aside with its reason; the run can save step 6 again.
        moved = ckpt.quarantine(6, skipped[0][1])
        assert needle in open(os.path.join(moved, "REASON.txt")).read()
        assert ckpt.all_steps() == [2, 4]
        ckpt.save(6, pytrees=states[6], json_items={"ledger": {"steps": 6}, "data_state": {"update_index": 6}})
        assert ckpt.restore(6, targets=dict(states[6])).step == 6


def test_no_intact_checkpoint_is_an_error_never_a_fresh_start(tmp_path):
    states = _save_steps(tmp_path, steps=(2, 4))
    for s in (2, 4):
        _truncate(os.path.join(C.checkpoint_dir(tmp_path), str(s), "ledger", "metadata"))
    with C.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(errors.CheckpointError, match=r"no intact checkpoint \(step 4: .*step 2: .*refusing to start"):
            C.newest_intact(ckpt, lambda s: ckpt.restore(s, targets=dict(states[s])), report=lambda m: None)
    empty = tmp_path / "empty"
    with C.Checkpointer(empty) as ckpt:
        assert C.newest_intact(ckpt, ckpt.restore) == (None, [])


def test_read_only_reader_never_cleans_a_live_save_nor_creates_dirs(tmp_path):
    _save_steps(tmp_path, steps=(2,))
    live_tmp = os.path.join(C.checkpoint_dir(tmp_path), "4.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(live_tmp, "params"))  # another process's save in progress
    with C.Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == [2]
        reader.restore(2)
        with pytest.raises(errors.CheckpointError, match="read-only"):
            reader.save(3, pytrees={"x": jnp.ones(2)})
    assert os.path.isdir(live_tmp)
    # The hazard this avoids: a writable manager deletes other processes' in-progress saves.
    with C.Checkpointer(tmp_path) as writer:
        writer.save(3, pytrees={"x": jnp.ones(2)})
    assert not os.path.exists(live_tmp)
    with pytest.raises(errors.CheckpointError, match="no checkpoints directory"):
        C.Checkpointer(tmp_path / "typo", read_only=True)
    assert not (tmp_path / "typo").exists()


def test_pinned_snapshot_survives_deletion_of_its_step(tmp_path):
    states = _save_steps(tmp_path, steps=(2, 4))
    with C.pinned(tmp_path) as (reader, step):
        assert step == 4 and reader.read_only
        shutil.rmtree(os.path.join(C.checkpoint_dir(tmp_path), "4"))  # keep-N cleanup of a live run
        r = reader.restore(step, targets=dict(states[4]))
        assert r.verified > 0
    assert not os.path.exists(os.path.join(tmp_path, C.PIN_DIR))
    with pytest.raises(errors.CheckpointError, match="no checkpoint for update 4"):
        with C.pinned(tmp_path, 4):
            pass


@pytest.fixture
def small_tmpfs(tmpfs_mount):
    return tmpfs_mount("400k")


def test_disk_full_during_save_is_a_filesystem_error_and_keeps_previous(small_tmpfs):
    small = {"params": {"w": jnp.ones((8, 8))}, "update": jnp.asarray(1)}
    big = {"params": {"w": jax.random.normal(jax.random.key(0), (400, 400))}, "update": jnp.asarray(2)}
    with C.Checkpointer(small_tmpfs) as ckpt:
        ckpt.save(1, pytrees=small)
        with pytest.raises(errors.FilesystemError, match="cannot save checkpoint 2 .*previous checkpoints are intact"):
            ckpt.save(2, pytrees=big)
        assert ckpt.all_steps() == [1]
        np.testing.assert_array_equal(np.asarray(ckpt.restore(1, targets=small).pytrees["params"]["w"]),
                                      np.ones((8, 8)))
