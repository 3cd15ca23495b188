"""Checkpoint round trip (bitwise, dtypes), keep-last-N, atomic saves, preemption flag."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpft.workdir import checkpointing as ck


def _state(seed: int):
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"w": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                 "gain": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)},
        "linear": {"b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
    }
    opt = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
    opt_state = opt.init(params)
    # Make the optimizer state non-trivial (counts, moments).
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * (seed + 1), params)
    _, opt_state = opt.update(grads, opt_state, params)
    ema = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32) * 0.5, params)
    key = jax.random.key(seed)
    return {"params": params, "opt_state": opt_state, "ema": ema, "rng": key,
            "counter": jnp.asarray(seed, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)}


def _json(step):
    return {"step": {"step": step}, "data_state": {"epoch": 1, "order": [3, 1, 2]},
            "ledger": {"events": [{"q": 0.01, "sigma": 1.2, "steps": step}]}}


def _assert_bitwise(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if ck._is_key(x):
            assert ck._is_key(y) and jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_bitwise_with_dtypes_and_structure(tmp_path):
    state = _state(3)
    with ck.Checkpointer(tmp_path, keep=2) as c:
        c.save(7, pytrees=state, json_items=_json(7))
    assert ck.latest_step(tmp_path) == 7
    assert os.path.isdir(tmp_path / "checkpoints" / "7")
    with ck.Checkpointer(tmp_path) as c:
        r = c.restore(targets=state)
    assert r.step == 7
    assert r.json_items == _json(7)
    _assert_bitwise(r.pytrees, state)
    assert isinstance(r.pytrees["opt_state"][1][0], optax.ScaleByAdamState)
    # The restored key drives the same random stream.
    np.testing.assert_array_equal(jax.random.normal(r.pytrees["rng"], (3,)), jax.random.normal(state["rng"], (3,)))


def test_restore_without_targets_gives_values(tmp_path):
    state = _state(1)
    with ck.Checkpointer(tmp_path) as c:
        c.save(1, pytrees={"params": state["params"]}, json_items={})
        r = c.restore(1)
    np.testing.assert_array_equal(np.asarray(r.pytrees["params"]["conv"]["w"]), np.asarray(state["params"]["conv"]["w"]))
    assert r.json_items == {}


def test_round_trip_sharded_params(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    x = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    with ck.Checkpointer(tmp_path) as c:
        c.save(2, pytrees={"params": {"x": sharded}})
        r = c.restore(targets={"params": {"x": sharded}})
    out = r.pytrees["params"]["x"]
    assert out.sharding.is_equivalent_to(sharded.sharding, 2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))



def test_small_replicated_arrays_are_written_whole_and_big_ones_across_replicas(tmp_path, monkeypatch):
    """A replicated array on 8 devices: orbax's replica-parallel save slices it once per replica (an eager
    dispatch each). Slices under REPLICA_PARALLEL_MIN_BYTES are not worth it: small arrays are written
    whole; an array whose slices reach the minimum is still split. Both restore bitwise."""
    from orbax.checkpoint._src.serialization import replica_slices

    if jax.device_count() != 8 or jax.default_backend() != "cpu":
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    sliced = []
    real_slice = replica_slices.jax.lax.slice_in_dim
    monkeypatch.setattr(replica_slices.jax.lax, "slice_in_dim",
                        lambda x, *a, **k: sliced.append(x.shape) or real_slice(x, *a, **k))
    replicated = jax.NamedSharding(jax.make_mesh((8,), ("data",)), jax.P())
    rows = ck.REPLICA_PARALLEL_MIN_BYTES // 4  # float32 rows of 8 values: each of 8 slices is 2 * MIN bytes
    small = {"w": jnp.ones((3, 3, 2, 4)), "b": jnp.arange(8.0)}
    big = {"w": jnp.arange(rows * 8, dtype=jnp.float32).reshape(rows, 8) / 7.0}
    with ck.Checkpointer(tmp_path) as c:
        for step, tree in ((1, small), (2, big)):
            tree = jax.device_put(tree, replicated)
            sliced.clear()
            c.save(step, pytrees={"params": tree})
            assert len(sliced) == (8 if step == 2 else 0), (step, sliced)
            _assert_bitwise(c.restore(step, targets={"params": tree}).pytrees["params"], tree)

def test_keep_last_n(tmp_path):
    with ck.Checkpointer(tmp_path, keep=2) as c:
        for step in (1, 2, 3, 4):
            c.save(step, pytrees={"params": _state(step)["params"]}, json_items=_json(step))
        assert c.all_steps() == [3, 4]
        old = c.restore(3, targets={"params": _state(3)["params"]})
    _assert_bitwise(old.pytrees["params"], _state(3)["params"])
    assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == ["3", "4"]


def test_prune_deletes_the_oldest_steps_beyond_keep_that_an_interrupted_run_left(tmp_path):
    """A run killed before orbax's clean-up leaves more than `keep` steps; the next start prunes them."""
    with ck.Checkpointer(tmp_path, keep=4) as c:
        for step in (1, 2, 3, 4):
            c.save(step, pytrees={"params": _state(step)["params"]}, json_items=_json(step))
    with ck.Checkpointer(tmp_path, keep=2) as c:
        assert c.all_steps() == [1, 2, 3, 4]  # opening deletes nothing (the newest may be corrupt)
        assert c.prune() == [1, 2]
        assert c.all_steps() == [3, 4] and c.prune() == []
        newest = c.restore(4, targets={"params": _state(4)["params"]})
    _assert_bitwise(newest.pytrees["params"], _state(4)["params"])
    assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == ["3", "4"]
    with ck.Checkpointer(tmp_path, read_only=True) as c, pytest.raises(ck.CheckpointError, match="read-only"):
        c.prune()


def test_crash_mid_save_leaves_previous_intact(tmp_path, monkeypatch):
    good = _state(1)
    c = ck.Checkpointer(tmp_path, keep=3)
    c.save(1, pytrees=good, json_items=_json(1))

    # Crash at the last moment: every item is written into the temporary step directory,
    # then the final rename fails (as if the process died there).
    from orbax.checkpoint._src.path import atomicity

    seen = {}
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == "2":
            seen["tmp"] = str(self._tmp_path)
            seen["contents"] = sorted(os.listdir(str(self._tmp_path)))
            raise RuntimeError("simulated crash mid-save")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        c.save(2, pytrees=_state(2), json_items=_json(2))
    monkeypatch.undo()
    # orbax wrote everything into a temporary directory, never into checkpoints/2.
    assert ".orbax-checkpoint-tmp" in seen["tmp"]
    assert {"params", "opt_state", "ema", "rng", "ledger", "manifest"} <= set(seen["contents"])
    assert not os.path.exists(tmp_path / "checkpoints" / "2")
    c.close()

    # A restart sees step 1 only, bit-exact; its first save cleans the tmp directory up.
    assert ck.latest_step(tmp_path) == 1
    with ck.Checkpointer(tmp_path) as c2:
        r = c2.restore(targets=good)
        _assert_bitwise(r.pytrees, good)
        assert r.json_items == _json(1)
        c2.save(3, pytrees=good, json_items=_json(3))
        assert c2.all_steps() == [1, 3]
        assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]


def test_same_checkpointer_saves_again_after_a_failed_save(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == "2":
            raise RuntimeError("simulated crash")
        return await original(self, *args, **kwargs)

    with ck.Checkpointer(tmp_path) as c:
        c.save(1, pytrees={"params": _state(1)["params"]})
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
        with pytest.raises(RuntimeError):
            c.save(2, pytrees={"params": _state(2)["params"]})
        monkeypatch.undo()
        c.save(2, pytrees={"params": _state(2)["params"]})  # replaces the partial tmp dir
        assert c.all_steps() == [1, 2]
        _assert_bitwise(c.restore(2, targets={"params": _state(2)["params"]}).pytrees["params"], _state(2)["params"])


def test_non_serialisable_json_fails_cleanly(tmp_path):
    with ck.Checkpointer(tmp_path) as c:
        c.save(1, pytrees={"params": _state(0)["params"]}, json_items=_json(1))
        with pytest.raises(TypeError, match="data_state"):
            c.save(2, pytrees={"params": _state(0)["params"]}, json_items={"data_state": {"x": object()}})
        assert c.all_steps() == [1]
        assert c.restore().json_items == _json(1)


def test_errors(tmp_path):
    assert ck.latest_step(tmp_path) is None
    with ck.Checkpointer(tmp_path) as c:
        with pytest.raises(FileNotFoundError):
            c.restore()
        c.save(1, pytrees={"params": {"a": np.zeros(2, np.float32)}})
        with pytest.raises(FileNotFoundError, match="step 5"):
            c.restore(5)
        with pytest.raises(KeyError, match="ema"):
            c.restore(1, targets={"ema": {"a": np.zeros(2, np.float32)}})
        with pytest.raises(ValueError, match="unique"):
            c.save(2, pytrees={"a": {"x": np.zeros(1)}}, json_items={"a": 1})


