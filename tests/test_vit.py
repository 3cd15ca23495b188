"""ViT (dpft.models.vit) and big_vision checkpoint import (dpft.models.vit_checkpoints).

Independent checks: a Flax *Linen* ViT written here after big_vision's module structure, so
that Linen itself generates the parameter paths of a published checkpoint; its random
parameters are saved as a flat '/'-joined ``.npz`` (the published format) and imported with
dpft, logits compared to < 1e-4 relative. Parameter counts from the architecture formula and
the published ViT-B/16 count; position-embedding resampling against ``scipy.ndimage.zoom``
(what big_vision calls) and against exactness on linear functions.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

import dpft.models as models
from dpft.models import checkpoints, vit_checkpoints as vc

MICRO = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch=8, image=32)
CLASSES = 5


# ------------------------------------------------------------------ the Linen reference

class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))  # Linen's gelu: tanh approximation
        return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
        return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class RefViT(nn.Module):
    """big_vision's ViT forward pass (posemb added before the class token is prepended)."""
    num_classes: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int
    pool_type: str = "tok"

    @nn.compact
    def __call__(self, image):
        x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    name="embedding")(image)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, name="Transformer")(x)
        x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def reference(pool_type="tok", seed=0):
    """(Linen module, random params with every leaf perturbed, flat published-format dict)."""
    m = MICRO
    ref = RefViT(CLASSES, m["width"], m["depth"], m["mlp_dim"], m["num_heads"], m["patch"], pool_type)
    params = ref.init(jax.random.key(seed), jnp.zeros((1, m["image"], m["image"], 3)))["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), params)
    params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    return ref, params, flatten(params)


def images(n=3, size=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def save(tmp_path, flat, name="ckpt.npz"):
    path = tmp_path / name
    np.savez(path, **flat)
    return path


def rel_diff(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def n_params(model):
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------ forward vs reference

@pytest.mark.parametrize("pool_type", ["tok", "gap"])
def test_imported_checkpoint_matches_linen_reference(tmp_path, pool_type):
    ref, params, flat = reference(pool_type)
    path = save(tmp_path, flat)
    model = models.load_pretrained(path, "vit_micro", pool_type=pool_type)  # classes from the head
    # Linen's own parameter paths are exactly the names dpft maps to.
    assert set(flat) == set(vc.param_table(model))
    x = images()
    want = ref.apply({"params": params}, x)
    got = model(x)
    assert got.shape == (3, CLASSES) and got.dtype == jnp.float32
    assert rel_diff(got, want) < 1e-4


def old_augreg_layout(flat):
    """The same weights as vit_jax / AugReg files store them: a `params/` prefix, pre-Linen
    numbering in the blocks, the position embedding under Transformer/posembed_input with the
    class token's entry first (cls - that entry kept in `cls`)."""
    rename = {"LayerNorm_1": "LayerNorm_2", "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
              "MlpBlock_0": "MlpBlock_3"}
    out = {}
    rng = np.random.default_rng(7)
    pe_cls = rng.standard_normal((1, 1, flat["cls"].shape[-1])).astype(np.float32)
    for k, v in flat.items():
        parts = [rename.get(p, p) for p in k.split("/")]
        out["params/" + "/".join(parts)] = v
    out["params/cls"] = flat["cls"] - pe_cls
    del out["params/pos_embedding"]
    out["params/Transformer/posembed_input/pos_embedding"] = np.concatenate([pe_cls, flat["pos_embedding"]], 1)
    return out


def scanned_layout(flat):
    """big_vision's scan=True layout: one Transformer/encoderblock stacked over depth."""
    out = {k: v for k, v in flat.items() if not k.startswith("Transformer/encoderblock_")}
    for k in flat:
        if k.startswith("Transformer/encoderblock_0/"):
            rest = k[len("Transformer/encoderblock_0/"):]
            out["Transformer/encoderblock/" + rest] = np.stack(
                [flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(MICRO["depth"])])
    return out


@pytest.mark.parametrize("layout", [old_augreg_layout, scanned_layout], ids=["augreg_old", "scanned"])
def test_other_published_layouts_give_the_same_logits(tmp_path, layout):
    ref, params, flat = reference()
    model = models.load_pretrained(save(tmp_path, layout(flat)), "vit_micro")
    x = images()
    assert rel_diff(model(x), ref.apply({"params": params}, x)) < 1e-4


def test_bfloat16_storage_is_read(tmp_path):
    _, _, flat = reference()
    stored = dict(flat)
    bf = np.asarray(jnp.asarray(flat["embedding/kernel"], jnp.bfloat16))
    stored["embedding/kernel"] = bf.view("V2")  # how np.save stores bfloat16
    model = models.load_pretrained(save(tmp_path, stored), "vit_micro")
    got = np.asarray(model.embedding.kernel.get_value())
    np.testing.assert_array_equal(got, bf.astype(np.float32))


def test_export_round_trip(tmp_path):
    _, _, flat = reference()
    model = models.load_pretrained(save(tmp_path, flat), "vit_micro")
    vc.save_npz(model, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as data:
        assert set(data.files) == set(flat)
        for k in flat:
            np.testing.assert_array_equal(data[k], flat[k])


# ------------------------------------------------------------------ head and position embedding

def test_new_class_count_gives_a_zero_head_and_keeps_the_rest(tmp_path):
    _, _, flat = reference()
    model = models.load_pretrained(save(tmp_path, flat), "vit_micro", num_classes=3)
    assert np.all(np.asarray(model.head.kernel.get_value()) == 0) and model.head.kernel.get_value().shape == (32, 3)
    assert np.all(np.asarray(model.head.bias.get_value()) == 0)
    loaded = vc.to_flat(model)
    for k, v in flat.items():
        if not k.startswith("head/"):
            np.testing.assert_array_equal(loaded[k], v)
    assert np.all(np.asarray(model(images())) == 0)


def test_pre_logits_is_dropped_only_with_the_head(tmp_path):
    _, _, flat = reference()
    flat = dict(flat, **{"pre_logits/kernel": np.ones((32, 32), np.float32), "pre_logits/bias": np.ones(32, np.float32)})
    path = save(tmp_path, flat)
    model = models.load_pretrained(path, "vit_micro", num_classes=3)
    assert np.all(np.asarray(model.head.kernel.get_value()) == 0)
    with pytest.raises(checkpoints.CheckpointError, match="pre_logits"):
        models.load_pretrained(path, "vit_micro")


def test_position_embedding_is_resampled_to_a_new_image_size(tmp_path):
    _, _, flat = reference()
    model = models.load_pretrained(save(tmp_path, flat), "vit_micro", num_classes=3, image_size=48)
    got = np.asarray(model.pos_embedding.embedding.get_value())  # grid 4 -> 6
    old = flat["pos_embedding"].reshape(4, 4, -1)
    want = scipy.ndimage.zoom(old, (6 / 4, 6 / 4, 1), order=1).reshape(1, 36, -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model(images(2, 48)).shape == (2, 3)


@pytest.mark.parametrize("old,new", [(3, 7), (5, 2), (4, 4)])
def test_resample_posemb_is_exact_on_linear_functions(old, new):
    # Bilinear with aligned corners reproduces a + b*row + c*col at the mapped coordinates.
    r, c = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    pe = np.stack([1 + 2 * r + 3 * c, -r + 0.5 * c], -1).reshape(1, old * old, 2).astype(np.float32)
    s = (old - 1) / (new - 1)
    rn, cn = np.meshgrid(np.arange(new) * s, np.arange(new) * s, indexing="ij")
    want = np.stack([1 + 2 * rn + 3 * cn, -rn + 0.5 * cn], -1).reshape(1, new * new, 2)
    np.testing.assert_allclose(vc.resample_posemb(pe, new), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors

def _message(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_key_is_named(tmp_path):
    _, _, flat = reference()
    del flat["Transformer/encoderblock_1/LayerNorm_1/scale"]
    path = save(tmp_path, flat)
    with pytest.raises(checkpoints.CheckpointError) as e:
        models.load_pretrained(path, "vit_micro")
    msg = _message(e)
    assert str(path) in msg and "missing parameter Transformer/encoderblock_1/LayerNorm_1/scale" in msg


def test_misshaped_key_is_named(tmp_path):
    _, _, flat = reference()
    flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"] = np.zeros((32, 4, 8), np.float32)
    path = save(tmp_path, flat)
    with pytest.raises(checkpoints.CheckpointError) as e:
        models.load_pretrained(path, "vit_micro")
    msg = _message(e)
    assert str(path) in msg and "query/kernel has shape (32, 4, 8), model expects (32, 2, 16)" in msg


def test_unexpected_key_and_pool_mismatch_are_named(tmp_path):
    _, _, flat = reference()
    path = save(tmp_path, dict(flat, **{"MAPHead_0/probe": np.zeros((1, 1, 32), np.float32)}))
    with pytest.raises(checkpoints.CheckpointError, match="unexpected parameter MAPHead_0/probe"):
        models.load_pretrained(path, "vit_micro")
    with pytest.raises(checkpoints.CheckpointError, match="unexpected parameter cls .*gap"):
        models.load_pretrained(save(tmp_path, flat, "tok.npz"), "vit_micro", pool_type="gap")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        models.load_pretrained(tmp_path / "nope.npz", "vit_micro")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(checkpoints.CheckpointError) as e:
        models.load_pretrained(bad, "vit_micro")
    assert str(bad) in _message(e) and "not an .npz" in _message(e)


def test_non_numeric_and_non_finite_weights_are_refused_on_load(tmp_path):
    """As for the Haiku path (tests/test_checkpoints.py): string or object arrays (even of numbers) and
    NaN/inf weights are refused by `apply_flat`, naming the parameter; through a file, a string array is
    refused when it is read and a NaN when it is loaded."""
    _, _, flat = reference()
    name = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
    w = vc.normalise(flat)[name]
    model = models.create("vit_micro", CLASSES)
    for value, says in ((w.astype(str), "is not numeric"), (w.astype(object), "dtype object is not numeric"),
                        (np.where(np.arange(w.size).reshape(w.shape) == 3, np.nan, w), "1 non-finite value"),
                        (np.full(w.shape, np.inf, np.float32), f"{w.size} non-finite value")):
        bad = dict(vc.normalise(flat), **{name: value})
        with pytest.raises(checkpoints.CheckpointError, match=f"src.npz: {name}: .*{says}") as e:
            vc.apply_flat(model, bad, source="src.npz")
        _message(e)
    with pytest.raises(checkpoints.CheckpointError, match=f"{name} has dtype <U.*expected floating point"):
        models.load_pretrained(save(tmp_path, dict(flat, **{name: w.astype(str)}), "strings.npz"), "vit_micro")
    nan = np.where(np.arange(w.size).reshape(w.shape) == 3, np.nan, w).astype(np.float32)
    path = save(tmp_path, dict(flat, **{name: nan}), "nan.npz")
    with pytest.raises(checkpoints.CheckpointError, match=f"{path}: {name}: 1 non-finite value"):
        models.load_pretrained(path, "vit_micro")


# ------------------------------------------------------------------ sizes, dtypes, interface

def vit_param_count(width, depth, mlp, classes, patch=16, image=224, tok=True):
    """The architecture formula: patch conv, posemb, cls, blocks (2 LN, q/k/v/out, MLP), norm, head."""
    block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    tokens = (image // patch) ** 2
    return (patch * patch * 3 * width + width + tokens * width + (width if tok else 0) + depth * block
            + 2 * width + width * classes + classes)


@pytest.mark.parametrize("name,width,mlp", [("vit_ti16", 192, 768), ("vit_s16", 384, 1536), ("vit_b16", 768, 3072)])
def test_parameter_counts(name, width, mlp):
    model = nnx.eval_shape(lambda: models.create(name, 1000))
    assert n_params(model) == vit_param_count(width, 12, mlp, 1000)
    heads = {"vit_ti16": 3, "vit_s16": 6, "vit_b16": 12}[name]
    assert model.blocks[0].attention.query.kernel.get_value().shape == (width, heads, width // heads)
    assert models.variant_info(name)["train_imsize"] == 224


def test_vit_b16_matches_the_published_count():
    # 86,567,656 is ViT-B/16's published count (224 px, 1000 classes) with a separate position
    # embedding for the class token (197 tokens); big_vision's layout folds it into `cls`.
    model = nnx.eval_shape(lambda: models.create("vit_b16", 1000))
    assert n_params(model) == 86_567_656 - 768


def test_bfloat16_compute_close_to_float32(tmp_path):
    _, _, flat = reference()
    path = save(tmp_path, flat)
    f32 = models.load_pretrained(path, "vit_micro")
    bf16 = models.load_pretrained(path, "vit_micro", dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
    x = images()
    a, b = f32(x), bf16(x)
    assert b.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(a - b)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(a)))


def test_interface_and_bad_input():
    model = models.create("vit_micro", 4)
    assert np.all(np.asarray(model(images(2), train=True, key=jax.random.key(0))) == 0)  # zero head
    with pytest.raises(ValueError, match="built for 32x32"):
        model(images(2, 40))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        model(jnp.zeros((32, 32, 3)))
    with pytest.raises(models.registry.UsageError, match="pool_type"):
        models.create("vit_micro", 4, pool_type="map")


@pytest.mark.slow  # quick tier: see docs/running.md
def test_per_example_gradients_match_single_example_gradients():
    """vmap(grad) over a batch equals a loop of single-example grads (no cross-example mixing)."""
    model = models.create("vit_micro", 3, head_init="normal")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p)(x[None])
        return -jax.nn.log_softmax(logits)[0, y]

    x, y = images(3), jnp.array([0, 2, 1])
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)
    for i in range(3):
        single = jax.grad(loss)(params, x[i], y[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            assert float(jnp.linalg.norm(a[i] - b)) <= 1e-4 * float(jnp.linalg.norm(b)) + 1e-7


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch_shape", [(4,), (3, 1, 2)])
def test_self_attention_equals_flax_default(dtype, batch_shape):
    """dpft.nn.ops.self_attention (the ViT's attention_fn) against flax's own default attention
    (jax.nn.dot_product_attention's XLA path): values and the gradients of q, k, v, in float32 and
    bfloat16, for plain and per-example ([m, K = 1, B]) batch shapes; its dots carry no size-1 axis."""
    from dpft.nn import ops

    q, k, v = (jax.random.normal(key, batch_shape + (17, 3, 8), dtype) for key in jax.random.split(jax.random.key(0), 3))
    ref_fn = lambda *a: nnx.dot_product_attention(*a, deterministic=True)
    ours_fn = lambda *a: ops.self_attention(*a, deterministic=True, dropout_rate=0.0, dtype=dtype, precision=None,
                                            module=None, is_causal=False, broadcast_dropout=True, dropout_rng=None)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    ref, ours = ref_fn(q, k, v), ours_fn(q, k, v)
    assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol)
    grads = [jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), argnums=(0, 1, 2))(q, k, v)
             for fn in (ref_fn, ours_fn)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=tol)
    # No size-1 axis in any dot of the value and gradient, the input's own batch of one included
    # (a per-example call under vmap); flax's default adds one.
    ours_dots, ref_dots = ([line for line in jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                                                             argnums=(0, 1, 2))).lower(q, k, v).as_text().splitlines()
                            if "dot_general" in line] for fn in (ours_fn, ref_fn))
    assert ours_dots and not [d for d in ours_dots if "x1x" in d or "<1x" in d], ours_dots
    assert [d for d in ref_dots if "x1x" in d]


def test_self_attention_hands_other_options_to_flax():
    """A mask (or bias, causal, dropout, sown weights) goes to nnx.dot_product_attention unchanged."""
    from dpft.nn import ops

    q, k, v = (jax.random.normal(key, (2, 5, 2, 4)) for key in jax.random.split(jax.random.key(1), 3))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    np.testing.assert_array_equal(np.asarray(ops.self_attention(q, k, v, mask=mask, deterministic=True)),
                                  np.asarray(nnx.dot_product_attention(q, k, v, mask=mask, deterministic=True)))
    assert not np.allclose(np.asarray(ops.self_attention(q, k, v, mask=mask)), np.asarray(ops.self_attention(q, k, v)))
