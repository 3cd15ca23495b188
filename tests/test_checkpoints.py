"""Checkpoint import/export (dpft.models.checkpoints, registry.load_pretrained)."""
import dataclasses
import os
import pickle
import sys
import types

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import dpft.models as models
from dpft.errors import UsageError
from dpft.models import checkpoints as ckpt


def randomised(model, seed=0):
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    new = [jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32)) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def source():
    """A micro NFNet with every parameter (head, skip gains) non-trivial, and its logits."""
    model = randomised(models.create("nfnet_micro", 5))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    graphdef, params = nnx.split(model, nnx.Param)
    apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return model, x, apply, apply(params, x)


def leaves_equal(a, b):
    fa, fb = ckpt.flatten(a), ckpt.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("fmt,name", [("pickle", "F_haiku.npz"), ("npz", "flat.npz")])
def test_round_trip_gives_identical_logits(tmp_path, source, fmt, name):
    model, x, apply, want = source
    path = tmp_path / name
    ckpt.save_model(model, path, fmt)
    loaded = models.load_pretrained(path, "nfnet_micro")  # num_classes from the head
    assert loaded.num_classes == 5
    assert leaves_equal(ckpt.to_haiku_tree(loaded), ckpt.to_haiku_tree(model))
    got = apply(nnx.split(loaded, nnx.Param)[1], x)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # exporting the loaded model reproduces the file's tree exactly
    assert leaves_equal(ckpt.read_checkpoint(path), ckpt.to_haiku_tree(loaded))


def test_new_head_keeps_every_other_parameter(tmp_path, source):
    model = source[0]
    path = tmp_path / "p.pkl"
    ckpt.save_model(model, path)
    loaded = models.load_pretrained(path, "nfnet_micro", num_classes=3)
    old, new = ckpt.to_haiku_tree(model), ckpt.to_haiku_tree(loaded)
    assert old.keys() == new.keys()
    for module in old:
        if module == "NFNet/~/linear":
            assert new[module]["w"].shape == (old[module]["w"].shape[0], 3)
            assert not new[module]["w"].any() and not new[module]["b"].any()  # zeros init
        else:
            assert leaves_equal({module: old[module]}, {module: new[module]}), module
    with pytest.raises(ckpt.CheckpointError, match=r"NFNet/~/linear/[wb] has shape"):
        models.load_pretrained(path, "nfnet_micro", num_classes=3, allow_missing=())


def test_missing_extra_and_misshaped_parameters_are_named(source):
    model = source[0]
    target = models.create("nfnet_micro", 5)
    tree = ckpt.to_haiku_tree(model)
    missing = {m: dict(p) for m, p in tree.items()}
    del missing["NFNet/~/nf_block_2/~/conv1b"]["gain"]
    with pytest.raises(ckpt.CheckpointError, match="missing parameter NFNet/~/nf_block_2/~/conv1b/gain"):
        ckpt.apply_haiku_tree(target, missing)
    extra = {**tree, "NFNet/~/bogus": {"w": np.zeros(3, np.float32)}}
    with pytest.raises(ckpt.CheckpointError, match="unexpected parameter NFNet/~/bogus/w"):
        ckpt.apply_haiku_tree(target, extra)
    bad = {m: dict(p) for m, p in tree.items()}
    bad["NFNet/~/stem_conv1"]["w"] = np.zeros((3, 3, 4, 5), np.float32)
    with pytest.raises(ckpt.CheckpointError, match=r"NFNet/~/stem_conv1/w has shape \(3, 3, 4, 5\)"):
        ckpt.apply_haiku_tree(target, bad)
    assert issubclass(ckpt.CheckpointError, UsageError)


def test_non_numeric_and_non_finite_weights_are_refused_on_load(source, tmp_path):
    """String or object arrays (even of numbers) and NaN/inf weights: refused when the pickle is loaded
    into the model, naming the parameter (not later in jnp.asarray, or at update 1)."""
    model = source[0]
    tree = ckpt.to_haiku_tree(model)
    name = "NFNet/~/stem_conv1"
    w = tree[name]["w"]
    for value, says in ((w.astype(str), "is not numeric"), (w.astype(object), "dtype object is not numeric"),
                        (np.where(np.arange(w.size).reshape(w.shape) == 3, np.nan, w), "1 non-finite value"),
                        (np.full(w.shape, np.inf, np.float32), f"{w.size} non-finite value")):
        bad = {m: dict(p) for m, p in tree.items()}
        bad[name]["w"] = value
        with pytest.raises(ckpt.CheckpointError, match=f"{name}/w: .*{says}"):
            ckpt.apply_haiku_tree(models.create("nfnet_micro", 5), bad)
    # through the file format: a pickle with a string array passes the restricted loader, then is refused
    bad = {m: dict(p) for m, p in tree.items()}
    bad[name]["w"] = w.astype(str)
    ckpt.write_haiku_pickle(bad, tmp_path / "strings_haiku.npz")
    with pytest.raises(ckpt.CheckpointError, match="is not numeric"):
        ckpt.load_into(models.create("nfnet_micro", 5), tmp_path / "strings_haiku.npz")
    ckpt.apply_haiku_tree(models.create("nfnet_micro", 5), {m: {k: v.astype(jnp.bfloat16) for k, v in p.items()}
                                                             for m, p in tree.items()})  # bf16 weights load


def test_name_mapping_both_ways():
    model = nnx.eval_shape(lambda: models.create("nfnet_f0", 10))
    table = ckpt.param_table(model)
    assert table[("NFNet/~/nf_block", "skip_gain")][0] == ("blocks", 0, "skip_gain")
    assert table[("NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1", "w")][0] == (
        "blocks", 3, "squeeze_excite", "linear_1", "w")
    assert table[("NFNet/~/linear", "b")] == (("linear", "b"), (10,))
    # the map is a bijection
    assert len({path for path, _ in table.values()}) == len(table)
    assert all(ckpt.haiku_name(model, path) == key for key, (path, _) in table.items())


def test_layout_and_head_come_from_the_models_variant(monkeypatch):
    """No central table: a family without ``Variant.haiku`` cannot use Haiku names, and a
    ``Variant.head`` that is no module of the model is named."""
    from dpft.models import wrn
    vit = nnx.eval_shape(lambda: models.create("vit_micro", 2))
    with pytest.raises(ckpt.CheckpointError, match=r"ViT \(family 'vit'\) declares no Haiku layout"):
        ckpt.param_table(vit)
    monkeypatch.setattr(wrn, "VARIANTS", {k: dataclasses.replace(v, head="fc") for k, v in wrn.VARIANTS.items()})
    model = nnx.eval_shape(lambda: models.create("wrn_16_4", 3))
    assert ckpt.haiku_name(model, ("blocks", 1, "conv_0", "w")) == ("WideResNet/~/wrn_block_1/~/conv_0", "w")
    with pytest.raises(ckpt.CheckpointError, match=r"WideResNet \(family 'wrn'\): its head 'fc'.*no parameters"):
        ckpt.apply_haiku_tree(model, {}, allow_missing=("head",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil_haiku.npz"
    path.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": Evil()}}))
    with pytest.raises(ckpt.CheckpointError, match=r"forbidden global (posix|os|nt)\.system"):
        ckpt.read_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="forbidden global"):
        models.load_pretrained(path, "nfnet_micro")
    assert not marker.exists()

    class Getattr:  # a builtins lookup is refused as well
        def __reduce__(self):
            return (getattr, (str, "join"))

    path.write_bytes(pickle.dumps({"m": {"w": Getattr()}}))
    with pytest.raises(ckpt.CheckpointError, match="builtins.getattr"):
        ckpt.read_checkpoint(path)


def _install_fake_modules(names_to_attrs):
    """Temporarily register fake modules (for pickling by reference); returns a restorer."""
    saved = {name: sys.modules.get(name) for name in names_to_attrs}
    for name, attrs in names_to_attrs.items():
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so that its children import
        for k, v in attrs.items():
            setattr(mod, k, v)
            v.__module__ = name
            v.__qualname__ = k
        sys.modules[name] = mod

    def restore():
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return restore


def test_dill_style_pickle_with_flatmapping_loads(tmp_path, source):
    """A file shaped like DeepMind's: FlatMapping nodes, arrays via dill's _create_array."""
    model = source[0]
    tree = ckpt.to_haiku_tree(model)

    class FlatMapping(dict):
        def __reduce__(self):  # how haiku pickles its mappings
            return (FlatMapping, (dict(self),))

    def _create_array(f, args, state, npdict=None):
        raise AssertionError("never called while writing")

    class DillArray:
        def __init__(self, a):
            self.a = a

        def __reduce__(self):  # what dill writes for an ndarray
            f, args, state = self.a.__reduce__()
            return (_create_array, (f, args, state, None))

    restore = _install_fake_modules({"haiku": {}, "haiku._src": {},
                                     "haiku._src.data_structures": {"FlatMapping": FlatMapping},
                                     "dill": {}, "dill._dill": {"_create_array": _create_array}})
    try:
        obj = FlatMapping({m: FlatMapping({k: DillArray(v) for k, v in p.items()}) for m, p in tree.items()})
        data = pickle.dumps(obj, protocol=3)
    finally:
        restore()
    assert b"FlatMapping" in data and b"_create_array" in data
    path = tmp_path / "F_haiku.npz"
    path.write_bytes(data)
    loaded = ckpt.read_checkpoint(path)
    assert type(loaded) is dict and all(type(v) is dict for v in loaded.values())
    assert leaves_equal(loaded, tree)
    m2 = models.load_pretrained(path, "nfnet_micro")
    assert leaves_equal(ckpt.to_haiku_tree(m2), tree)


def test_orbax_checkpoint_haiku_and_nnx_layouts(tmp_path, source):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = source[0]
    tree = ckpt.to_haiku_tree(model)
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "hk", {"params": tree, "state": {}})
        saver.save(tmp_path / "nnx", {"params": jax.tree.map(np.asarray, pure)})
    for sub in ("hk", "nnx"):
        loaded = models.load_pretrained(tmp_path / sub, "nfnet_micro", num_classes=5)
        assert leaves_equal(ckpt.to_haiku_tree(loaded), tree), sub


def test_unreadable_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "nope.npz")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint format"):
        ckpt.read_checkpoint(junk)
    objs = tmp_path / "obj.npz"
    np.savez(objs, **{"NFNet/~/linear/w": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ckpt.CheckpointError, match="object arrays"):
        ckpt.read_checkpoint(objs)
    notree = tmp_path / "list.pkl"
    notree.write_bytes(pickle.dumps([np.zeros(2)]))
    with pytest.raises(ckpt.CheckpointError, match="top level"):
        ckpt.read_checkpoint(notree)
