"""Registries (dpft.registry, dpft.models.registry, dpft.data.DATASETS): adding a model or a data set
is one new file plus one registry line -- proved with toy entries that then train end to end, the toy
model also from a Haiku-format checkpoint (its layout and head declared in its own file)."""
from __future__ import annotations

import pickle
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dpft import data, models
from dpft.errors import UsageError
from dpft.models import registry as models_registry
from dpft.registry import Registry

TOY_MODEL = '''
"""A toy model file: an MLP over the flattened image, its head and its Haiku checkpoint names."""
import jax.numpy as jnp
from flax import nnx

from dpft.models.variant import HaikuLayout, Variant


class ToyMLP(nnx.Module):
    def __init__(self, num_classes, *, dtype=jnp.float32, rngs, hidden=16, depth=2, image_size=8):
        sizes = [image_size * image_size * 3] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs, dtype=dtype) for a, b in zip(sizes, sizes[1:])])
        self.classifier = nnx.Linear(hidden, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, images, *, train=False, key=None):
        x = images.reshape(images.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.classifier(x).astype(jnp.float32)


VARIANTS = {"toy_mlp": Variant("toy", ToyMLP, dict(hidden=16, depth=2, image_size=8), 8, 8,
                               head="classifier", haiku=HaikuLayout("toy_mlp", {"layers": "dense"}))}
'''

#: The toy's Haiku checkpoint written by hand, {module: {param: shape}} (a 5-class head), and where
#: each module lives in the NNX model.
TOY_CHECKPOINT = {"toy_mlp/~/dense": {"kernel": (192, 16), "bias": (16,)},
                  "toy_mlp/~/dense_1": {"kernel": (16, 16), "bias": (16,)},
                  "toy_mlp/~/classifier": {"kernel": (16, 5), "bias": (5,)}}
TOY_MODULES = {"toy_mlp/~/dense": lambda m: m.layers[0], "toy_mlp/~/dense_1": lambda m: m.layers[1],
               "toy_mlp/~/classifier": lambda m: m.classifier}

TOY_DATA = '''
"""A toy data set file: two classes of 8x8 noise images, told apart by their mean."""
import dataclasses

import numpy as np

from dpft.data.base import DatasetSpec, TableMeta, from_records


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    per_split: int = 48
    seed: int = 0


def load_splits(root=None, **options):
    opts = ToyOptions(**options)
    rng = np.random.default_rng(opts.seed)
    meta = TableMeta(name="toy", task="multiclass", class_names=("dark", "light"), eval_tasks=(),
                     attribute_names=("group",))
    splits, next_id = {}, 0
    for split in ("train", "validation", "test"):
        records = []
        for _ in range(opts.per_split):
            y = int(rng.integers(2))
            image = np.clip(rng.normal(80 + 100 * y, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            records.append({"example_id": next_id, "patient_id": str(next_id), "image": image, "label": y,
                            "attrs": {"group": "a" if next_id % 2 else "b"}})
            next_id += 1
        splits[split] = from_records(records, split=split, meta=meta)
    return splits


DATASET = DatasetSpec(load_splits, ToyOptions, required_attributes=("group",), needs_root=False)
'''


@pytest.fixture
def toy_entries(tmp_path, monkeypatch):
    """Writes the two toy files on sys.path and adds ONE line to each registry."""
    (tmp_path / "toy_model.py").write_text(textwrap.dedent(TOY_MODEL))
    (tmp_path / "toy_data.py").write_text(textwrap.dedent(TOY_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(models_registry.MODEL_FAMILIES.entries, "toy", "toy_model:VARIANTS")
    monkeypatch.setitem(data.DATASETS.entries, "toy", "toy_data:DATASET")
    yield
    for m in ("toy_model", "toy_data"):
        sys.modules.pop(m, None)


def test_registry_lookup_and_errors():
    r = Registry("widget", {"a": "math:pi", "b": "math:nope", "c": "no_such_module_xyz:x"})
    assert r.names() == ("a", "b", "c") and "a" in r and "z" not in r and len(r) == 3
    assert r.get("a") == np.pi
    with pytest.raises(UsageError, match=r"unknown widget 'z'; choose from a, b, c"):
        r.get("z")
    with pytest.raises(UsageError, match=r"widget 'b': cannot load math:nope"):
        r.get("b")
    with pytest.raises(UsageError, match=r"widget 'c': cannot load no_such_module_xyz:x"):
        r.get("c")
    with pytest.raises(ValueError, match="not 'module:attribute'"):
        Registry("widget", {"a": "math.pi"})


def test_every_registered_name_resolves():
    names = models.names()
    assert {"nfnet_f0", "nfnet_f7", "nfnet_tiny", "nfnet_micro", "wrn_16_4"} <= set(names)
    for name in names:
        info = models.variant_info(name)
        assert info["name"] == name and info["train_imsize"] > 0
    for name in data.DATASETS:
        spec = data.dataset(name)
        assert callable(spec.load_splits) and isinstance(spec.option_defaults(), dict)
    assert data.option_defaults("chexpert")["index_dir"] is None and data.option_defaults("nope") == {}


def test_a_model_registered_twice_is_refused(monkeypatch):
    monkeypatch.setitem(models_registry.MODEL_FAMILIES.entries, "again", "dpft.models.wrn:VARIANTS")
    with pytest.raises(ValueError, match="wrn_16_4.*two families"):
        models.names()


def _toy_config() -> ml_collections.ConfigDict:
    from dpft.config import base as cb
    c = cb.base_config(locked=False)
    c.model.name = "toy_mlp"
    c.data.name = "toy"
    c.data.root = ""
    c.data.image_size = c.data.eval_image_size = 8
    c.data.random_crop = False
    c.data.random_flip = False
    c.data.augmult = 1
    c.data.num_workers = 0
    c.privacy.epsilon = 4.0
    c.privacy.delta = 1e-3
    c.privacy.insecure_fixed_noise_seed = 3  # reproducible test only
    c.train.batch_size = 16
    c.train.physical_batch_size = 16
    c.train.microbatch_size = 2
    c.train.num_updates = 2
    c.train.checkpoint_every = 1
    c.train.log_every = 1
    c.train.eval_every = 0
    c.eval.splits = ("test",)
    c.eval.params = "raw"
    c.train.ema_decay = 0.0
    return cb.finalize(cb.add_option_defaults(c))


def test_toy_model_and_data_set_are_one_file_and_one_line_each(toy_entries, tmp_path):
    assert "toy_mlp" in models.names() and "toy" in data.DATASETS
    model = models.create("toy_mlp", 2)
    assert model(np.zeros((3, 8, 8, 3), np.float32)).shape == (3, 2)
    assert set(data.option_defaults("toy")) == {"per_split", "seed"}
    config = _toy_config()
    from dpft.config import validation
    from dpft.train import loop
    validation.validate(config, num_examples=48, num_devices=jax.local_device_count())
    result = loop.train(config, str(tmp_path / "run"), print_fn=lambda *a, **k: None)
    assert result.updates_done == 2 and 0 < result.epsilon_spent < 4.0 + 1e-6
    assert result.plan.grad_method == "bookkeeping"  # standard nnx.Linear layers: auto = book-keeping
    preds = np.load(result.predictions["test"])
    assert preds["logits"].shape == (48, 2)


def _write_toy_checkpoint(path) -> dict[str, dict[str, np.ndarray]]:
    """DeepMind's on-disk format, by hand: a pickle of {module_name: {param_name: ndarray}}."""
    rng = np.random.default_rng(7)
    tree = {m: {p: rng.standard_normal(shape).astype(np.float32) for p, shape in params.items()}
            for m, params in TOY_CHECKPOINT.items()}
    path.write_bytes(pickle.dumps(tree, protocol=4))
    return tree


def _assert_params_are(model, tree, modules) -> None:
    """The parameters of `modules` (Haiku names) in `model` equal `tree`'s; the model has no
    parameters other than TOY_CHECKPOINT's."""
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == sum(map(len, TOY_CHECKPOINT.values()))
    for module, params in tree.items():
        if module in modules:
            for name, value in params.items():
                np.testing.assert_array_equal(np.asarray(getattr(TOY_MODULES[module](model), name)[...]), value,
                                              err_msg=f"{module}/{name}")


def test_toy_model_starts_dpft_train_from_its_haiku_checkpoint(toy_entries, tmp_path):
    """The model `dpft train` builds with config.model.checkpoint (dpft.config.build.build_model): the
    toy (one file + one line, no edit of dpft.models.checkpoints) loads every parameter from the file;
    its 5-class head is replaced by a fresh 2-class one (the toy data set has 2 classes)."""
    from dpft.config import build

    tree = _write_toy_checkpoint(tmp_path / "toy_haiku.npz")
    config = _toy_config()
    with config.unlocked():
        config.model.checkpoint = str(tmp_path / "toy_haiku.npz")
    model = build.build_model(config, num_classes=2)
    _assert_params_are(model, tree, ["toy_mlp/~/dense", "toy_mlp/~/dense_1"])
    fresh = models.create("toy_mlp", 2, seed=config.seed)
    assert model.classifier.kernel.shape == (16, 2) and model.classifier.bias.shape == (2,)
    np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]), np.asarray(fresh.classifier.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.classifier.bias[...]), np.asarray(fresh.classifier.bias[...]))


def test_toy_model_checkpoint_keeps_its_head_round_trips_and_names_errors(toy_entries, tmp_path):
    from dpft.models import checkpoints

    path = tmp_path / "toy_haiku.npz"
    tree = _write_toy_checkpoint(path)
    model = models.load_pretrained(path, "toy_mlp")  # the class count from the file's head
    assert model.classifier.kernel.shape == (16, 5)
    _assert_params_are(model, tree, TOY_MODULES)
    checkpoints.save_model(model, tmp_path / "export.pkl")
    with open(tmp_path / "export.pkl", "rb") as f:
        exported = pickle.load(f)
    assert exported.keys() == tree.keys()
    for module, params in tree.items():
        assert exported[module].keys() == params.keys()
        for name, value in params.items():
            np.testing.assert_array_equal(exported[module][name], value)
    del tree["toy_mlp/~/dense_1"]["bias"]
    path.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(checkpoints.CheckpointError, match=f"{path}: missing parameter toy_mlp/~/dense_1/bias"):
        models.load_pretrained(path, "toy_mlp", num_classes=3)
