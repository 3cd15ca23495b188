"""Book-keeping on models built from standard Flax NNX layers (dpft.nn.nnx_layers, bk_layers).

Every layer kind is checked against brute-force per-example gradients (jax.vmap of jax.grad of
the same loss: an independent computation, no patches, no ghost norms): per-example norms and
the clipped sum, on the ghost and the materialised route. Whole models (a GroupNorm CNN and a
small ViT with a class token and position embedding) against the vmap engine, with augmult,
padding, automatic clipping, 8 devices, and the bf16 sensitivity bound.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from flax import nnx

from dpft.nn import nnx_layers, taps
from dpft.testing.jaxprs import low_precision_dots
from dpft.privacy import adapters, bk_layers, bookkeeping, engine, keys
from dpft.privacy import plan as plan_lib
from dpft.privacy.engine import ClippingConfig

F32 = jnp.float32
M, K = 4, 2
MASK = np.array([1, 1, 0, 1], np.float32)


class Probe(nnx.Module):
    """Applies one layer: the per-view loss <layer(x), d> makes d the output gradient."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


def dot_loss(z, views):
    return jnp.sum((z.astype(F32) * views["d"]).reshape(z.shape[0], -1), axis=1)


def brute_force(loss_fn, params, views, rng):
    """Per-example gradients by jax.vmap(jax.grad) -> (norms float64 [m], flat grads [m, P] float64)."""
    def one(v):
        return jax.grad(lambda p: loss_fn(p, v, rng)[0])(params)
    grads = jax.vmap(one)(views)
    flat = np.concatenate([np.asarray(g, np.float64).reshape(M, -1) for g in jax.tree.leaves(grads)], axis=1)
    return np.linalg.norm(flat, axis=1), flat


def check_layer(layer, x, kinds, ghost="auto", rtol=1e-4):
    """Book-keeping norms and clipped sum of Probe(layer) == brute force; the tapped kinds == kinds."""
    loss_fn, params, _ = adapters.nnx_loss_fn(Probe(layer), dot_loss)
    z = jax.eval_shape(lambda: layer(x[0]))
    d = jnp.asarray(np.random.RandomState(1).randn(M, *z.shape), F32)
    views = {"image": x, "d": d}
    rng = jax.random.key(0)
    specs = bookkeeping.discover_ops(loss_fn.tapped, params, views, rng)
    assert sorted(s.kind for s in specs.values()) == sorted(kinds)
    norms, flat = brute_force(loss_fn, params, views, rng)
    c = float(np.median(norms))  # half of the examples are clipped
    factors = MASK * np.minimum(1.0, c / norms)
    want = factors @ flat
    batch = dict(views, mask=jnp.asarray(MASK))
    got_sum, stats = jax.jit(lambda p: bookkeeping.bk_clipped_grad_sum(
        loss_fn, p, batch, rng, clipping=ClippingConfig(mode="flat", clip_norm=c), microbatch_size=2,
        ghost=ghost))(params)
    np.testing.assert_allclose(np.asarray(stats["norms"]), norms * MASK, rtol=rtol)
    got = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(got_sum)])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def rand(*shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), F32)


RNGS = functools.partial(nnx.Rngs, 0)
CONV_CASES = {
    "same_3x3": (dict(kernel_size=(3, 3)), (7, 6, 4)),
    "stride2_valid": (dict(kernel_size=(3, 3), strides=2, padding="VALID"), (7, 6, 4)),
    "explicit_pairs": (dict(kernel_size=(2, 3), padding=((1, 2), (0, 1))), (7, 6, 4)),
    "int_pad_dilated": (dict(kernel_size=(3, 3), padding=1, kernel_dilation=2), (7, 6, 4)),
    "grouped_strided": (dict(kernel_size=(3, 3), feature_group_count=2, strides=(2, 1)), (7, 6, 4)),
    "circular": (dict(kernel_size=(3, 3), padding="CIRCULAR"), (5, 6, 4)),
    "pointwise_no_bias": (dict(kernel_size=(1, 1), use_bias=False), (5, 5, 4)),
    "causal_1d": (dict(kernel_size=(3,), padding="CAUSAL"), (9, 4)),
    "conv_3d": (dict(kernel_size=(2, 2, 2), strides=(1, 2, 1)), (4, 4, 3, 4)),
    # non-overlapping patches (a ViT patch embedding): reshape + one transpose; 9 is cropped to 8
    "patchify": (dict(kernel_size=(4, 4), strides=4, padding="VALID"), (8, 9, 4)),
    "patchify_grouped_1d": (dict(kernel_size=(3,), strides=3, padding="VALID", feature_group_count=2), (10, 4)),
    # per-example kernel gradient (432) larger than (x, d) (156): materialised norm, sum by the VJP
    "kernel_larger_than_activations": (dict(kernel_size=(3, 3), padding="VALID"), (3, 3, 8)),
}


@pytest.mark.parametrize("ghost", ["always", "never"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_brute_force(case, ghost):
    kw, in_shape = CONV_CASES[case]
    layer = nnx.Conv(in_shape[-1], 6, rngs=RNGS(), **kw)
    check_layer(layer, rand(M, K, *in_shape), ["nnx_conv"], ghost)


@pytest.mark.parametrize("kernel,groups,spatial", [((4, 4), 1, (8, 9)), ((2, 3), 2, (6, 7)), ((3,), 1, (10,)),
                                                   ((2, 2, 2), 1, (4, 5, 4))])
def test_channel_major_patches_of_patchify_convs_equal_lax_patches(kernel, groups, spatial):
    """`bk_layers.conv_patches_cm` (reshape route for stride = kernel) == lax.conv_general_dilated_patches
    reordered from (C, *k) to (groups, *k, C/groups) features."""
    from dpft.nn import nnx_layers
    from dpft.privacy import bk_layers
    nd, c = len(kernel), 4
    cfg = nnx_layers.Conv(kernel, kernel, (1,) * nd, ((0, 0),) * nd, groups)
    x = rand(2, *spatial, c)
    got = bk_layers.conv_patches_cm(x, cfg)
    sp = "DHW"[3 - nd:]
    ref = lax.conv_general_dilated_patches(x, kernel, kernel, "VALID",
                                           dimension_numbers=(f"N{sp}C", f"OI{sp}", f"NC{sp}"))
    outs = ref.shape[2:]
    ref = ref.reshape((2, groups, c // groups) + kernel + outs)
    ref = jnp.moveaxis(ref, 2, 2 + nd).reshape((2, groups, -1) + outs)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_conv_with_input_dilation_is_free_and_exact():
    layer = nnx.Conv(4, 3, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)), rngs=RNGS())
    check_layer(layer, rand(M, K, 4, 4, 4), [])  # untapped: its parameters are free parameters


@pytest.mark.parametrize("ghost", ["always", "never"])
@pytest.mark.parametrize("case", ["linear", "linear_narrowing", "linear_no_bias", "general_2in_2out",
                                  "general_middle_axis"])
def test_dense_matches_brute_force(case, ghost):
    layer, shape = {
        "linear": (nnx.Linear(5, 7, rngs=RNGS()), (3, 5)),
        "linear_narrowing": (nnx.Linear(7, 3, rngs=RNGS()), (4, 7)),  # fan-in > fan-out: G^T = D^T A
        "linear_no_bias": (nnx.Linear(5, 7, use_bias=False, rngs=RNGS()), (5,)),
        "general_2in_2out": (nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=RNGS()), (6, 2, 3)),
        "general_middle_axis": (nnx.LinearGeneral(3, 4, axis=1, rngs=RNGS()), (3, 5)),
    }[case]
    check_layer(layer, rand(M, K, *shape), ["nnx_dense"], ghost)


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_dense_contractions_have_no_size_one_batch_dimension(ghost):
    """A dense layer is one group: its per-example dots batch over examples alone (a size-1 group
    axis as a dot batch dimension made XLA:CPU copy ViT-Ti's activations around every dot)."""
    params = {"kernel": jnp.ones((8, 3)), "bias": jnp.ones((3,))}
    x, d = rand(M, K, 5, 8), rand(M, K, 5, 3, seed=1)

    def run(x, d):
        sq, summer = bk_layers.dense_norms(params, x, d, nnx_layers.Dense((2,)), ghost)
        return sq, summer(jnp.ones((M,)))

    batch_sizes = []
    for eqn in jax.make_jaxpr(run)(x, d).jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            batch_sizes.append(tuple(eqn.invars[0].aval.shape[a] for a in lhs_batch))
    assert (M,) in batch_sizes  # the per-example contractions (norms)
    assert all(1 not in b for b in batch_sizes), batch_sizes


@pytest.mark.parametrize("ghost", ["always", "never"])
def test_embed_matches_brute_force_with_repeated_tokens(ghost):
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 7, (M, K, 6)), jnp.int32)  # 12 rows, 7 ids
    check_layer(nnx.Embed(7, 4, rngs=RNGS()), tokens, ["nnx_embed"], ghost)


NORM_CASES = {
    "layer_norm": (lambda: nnx.LayerNorm(5, rngs=RNGS()), (3, 5)),
    "layer_norm_no_bias_eps": (lambda: nnx.LayerNorm(5, use_bias=False, epsilon=0.5, rngs=RNGS()), (3, 5)),
    "layer_norm_no_scale": (lambda: nnx.LayerNorm(5, use_scale=False, rngs=RNGS()), (3, 5)),
    "layer_norm_two_feature_axes": (
        lambda: nnx.LayerNorm(15, reduction_axes=(-2, -1), feature_axes=(-2, -1), use_fast_variance=False,
                              rngs=RNGS()), (2, 3, 5)),
    "layer_norm_bfloat16": (lambda: nnx.LayerNorm(5, dtype=jnp.bfloat16, rngs=RNGS()), (3, 5)),
    "rms_norm": (lambda: nnx.RMSNorm(5, rngs=RNGS()), (3, 5)),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_norm_layers_match_brute_force(case):
    # nnx_norm route: scale/bias gradients from the layer's own normalisation of the recorded x
    # (computed again in float32 with m merged into the call's axis 0) and the output gradient.
    make, shape = NORM_CASES[case]
    layer = make()
    rtol = 5e-3 if layer.dtype == jnp.bfloat16 else 1e-4  # bf16: brute force rounds in bf16 (2^-9)
    check_layer(layer, rand(M, K, *shape), ["nnx_norm"], rtol=rtol)


@pytest.mark.parametrize("case", ["norm_over_the_call_batch_axis", "group_norm", "einsum", "conv_transpose"])
def test_free_parameter_layers_match_brute_force(case):
    layer, shape = {
        # statistics across axis 0 of a call (the augmult views): not tapped, free parameters
        "norm_over_the_call_batch_axis": (nnx.LayerNorm(5, reduction_axes=(0, -1), rngs=RNGS()), (3, 5)),
        "group_norm": (nnx.GroupNorm(8, num_groups=4, rngs=RNGS()), (4, 4, 8)),
        "einsum": (nnx.Einsum("kab,bc->kac", (5, 7), (7,), rngs=RNGS()), (3, 5)),
        "conv_transpose": (nnx.ConvTranspose(4, 3, (3, 3), strides=2, rngs=RNGS()), (4, 4, 4)),
    }[case]
    # Parameters of untapped layers: exact per-example gradients from parameter perturbations
    # (one [m, *param] gradient each).
    check_layer(layer, rand(M, K, *shape), [])


def test_multi_head_attention_through_its_projections():
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=RNGS())
    check_layer(layer, rand(M, K, 5, 8), ["nnx_dense"] * 4)


class CalledTwice(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(5, 5, rngs=RNGS())

    def __call__(self, x):
        return self.lin(self.lin(x))


class TiedEmbedding(nnx.Module):
    def __init__(self):
        self.emb = nnx.Embed(7, 4, rngs=RNGS())

    def __call__(self, x):
        return self.emb.attend(self.emb(x))


class ScannedLayers(nnx.Module):
    """Two stacked nnx.Linear applied by nnx.scan: one call per stacked parameter slice."""

    def __init__(self):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(5, 5, rngs=rngs)
        self.layers = make(RNGS())

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return jax.nn.relu(layer(h))
        return body(x, self.layers)


@pytest.mark.parametrize("model,x,match", [
    (ScannedLayers, rand(M, K, 3, 5), r"tap layers:call: parameter kernel has shape \(5, 5\) .* \(2, 5, 5\)"),
    (lambda: Probe(nnx.BatchNorm(5, rngs=RNGS())), rand(M, K, 3, 5), "layer layer is an nnx.BatchNorm"),
    (CalledTwice, rand(M, K, 3, 5), r"layer lin \(Linear\) is called twice"),
    (TiedEmbedding, jnp.zeros((M, K, 3), jnp.int32), "parameter emb/embedding of layer emb .* elsewhere"),
], ids=["scanned", "batchnorm", "called_twice", "tied_embedding"])
def test_refusals_name_the_layer(model, x, match):
    module = model()
    loss_fn, params, _ = adapters.nnx_loss_fn(module, lambda z, v: jnp.sum(z.reshape(z.shape[0], -1), axis=1))
    batch = {"image": x, "mask": jnp.ones([M], F32)}
    with pytest.raises(ValueError, match=match):
        bookkeeping.bk_clipped_grad_sum(loss_fn, params, batch, jax.random.key(0),
                                        clipping=ClippingConfig(mode="flat", clip_norm=1.0), microbatch_size=2)


# ----------------------------------------------------------------------------- whole models

NUM_CLASSES = 3


class GroupNormCNN(nnx.Module):
    """A plain user CNN: conv-GN-relu x2 (strided, grouped), mean pool, linear head."""

    def __init__(self, dtype=F32):
        rngs = RNGS()
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs, dtype=dtype)
        self.gn1 = nnx.GroupNorm(8, num_groups=4, rngs=rngs, dtype=dtype)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=2, rngs=rngs, dtype=dtype)
        self.gn2 = nnx.GroupNorm(8, num_groups=2, rngs=rngs, dtype=dtype)
        self.head = nnx.Linear(8, NUM_CLASSES, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = jax.nn.relu(self.gn1(self.conv1(x)))
        h = jax.nn.relu(self.gn2(self.conv2(h)))
        return self.head(jnp.mean(h, axis=(1, 2))).astype(F32)


class ClsPos(nnx.Module):
    """Prepends a class token and adds a position embedding (ViT): free parameters."""

    def __init__(self, tokens: int, dim: int, rngs: nnx.Rngs):
        self.cls = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.pos = nnx.Param(0.5 * jax.random.normal(rngs.params(), (1, tokens + 1, dim)))

    def __call__(self, x):
        cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs, dtype):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False, rngs=rngs, dtype=dtype)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.mlp1 = nnx.Linear(dim, 2 * dim, rngs=rngs, dtype=dtype)
        self.mlp2 = nnx.Linear(2 * dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x))))


class TinyViT(nnx.Module):
    """Patch conv (4x4, stride 4) -> class token + positions -> 2 blocks -> LayerNorm -> head(cls)."""

    def __init__(self, image: int = 8, dim: int = 8, dtype=F32):
        rngs = RNGS()
        self.patch = nnx.Conv(3, dim, (4, 4), strides=4, padding="VALID", rngs=rngs, dtype=dtype)
        self.embed = ClsPos((image // 4) ** 2, dim, rngs)
        self.blocks = nnx.List([Block(dim, rngs, dtype) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.head = nnx.Linear(dim, NUM_CLASSES, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = self.patch(x)
        h = self.embed(h.reshape(h.shape[0], -1, h.shape[-1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0]).astype(F32)


MODELS = {"gn_cnn": GroupNormCNN, "vit": TinyViT}
#: The models of the whole-model tests; the ViT's (attention, embeddings) only in the full suite
#: (`make test`): the quick tier keeps the GroupNorm CNN (docs/running.md, "The test suite").
MODEL_PARAMS = [pytest.param("gn_cnn"), pytest.param("vit", marks=pytest.mark.slow)]
B = 8
BATCH_MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)


def make_batch(k, seed=0):
    rs = np.random.RandomState(seed)
    return {"image": jnp.asarray(rs.randn(B, k, 8, 8, 3), F32),
            "label": jnp.asarray(np.repeat(rs.randint(0, NUM_CLASSES, (B, 1)), k, axis=1), jnp.int32),
            "mask": jnp.asarray(BATCH_MASK)}


@functools.lru_cache(maxsize=None)
def setup(name, dtype=F32):
    loss_fn, params, _ = adapters.nnx_loss_fn(MODELS[name](dtype=dtype), adapters.softmax_cross_entropy_loss)
    return loss_fn, params


def assert_same(ref, got, rtol=2e-5):
    (ref_sum, ref_stats), (got_sum, got_stats) = ref, got
    assert jax.tree.structure(ref_sum) == jax.tree.structure(got_sum)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_sum))
    for a, b in zip(jax.tree.leaves(got_sum), jax.tree.leaves(ref_sum)):
        assert a.dtype == F32 and np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * scale)
    assert set(got_stats) == set(ref_stats)
    for key in ref_stats:
        np.testing.assert_allclose(np.asarray(got_stats[key]), np.asarray(ref_stats[key]), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_PARAMS)
@pytest.mark.parametrize("mode", ["flat", "automatic"])
def test_model_equals_vmap_engine(name, mode):
    loss_fn, params = setup(name)
    batch = make_batch(2)
    clipping = ClippingConfig(mode=mode, clip_norm=0.1, gamma=0.01)
    rng = jax.random.key(7)
    run = {m: jax.jit(lambda p, fn=fn: fn(loss_fn, p, batch, rng, clipping=clipping, microbatch_size=4,
                                           position_offset=3))(params)
           for m, fn in (("vmap", engine.clipped_grad_sum), ("bk", bookkeeping.bk_clipped_grad_sum))}
    assert_same(run["vmap"], run["bk"])
    norms = np.asarray(run["vmap"][1]["norms"])
    assert np.all(norms[BATCH_MASK > 0] > 0.1) and np.all(np.asarray(run["bk"][1]["norms"])[BATCH_MASK == 0] == 0)
    # vit: the class token and positions are free parameters, the rest is tapped (LayerNorms too);
    # gn_cnn: the GroupNorms' scales and biases are free parameters
    specs = bookkeeping.discover(loss_fn.tapped, params, {k: v for k, v in batch.items() if k != "mask"}, rng)
    kinds = {"vit": {"nnx_conv", "nnx_dense", "nnx_norm"}, "gn_cnn": {"nnx_conv", "nnx_dense"}}[name]
    assert {s.kind for s in specs.specs.values()} == kinds
    free = {"vit": {"embed/cls", "embed/pos"}, "gn_cnn": {"gn1/scale", "gn1/bias", "gn2/scale", "gn2/bias"}}[name]
    assert set(specs.free) == free


def test_auto_grad_method_picks_bookkeeping_for_a_standard_nnx_model():
    _, params = setup("gn_cnn")
    plan = plan_lib.fixed_plan(clipping=ClippingConfig(mode="flat", clip_norm=1.0), noise_multiplier=1.0,
                               expected_batch_size=8.0, params=params, secret=keys.RunSecret.insecure_fixed(0),
                               grad_method="auto")
    assert plan.grad_method == "bookkeeping"


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_eight_devices_equal_the_vmap_engine(name):
    from dpft import distributed
    from dpft.train import step as step_lib
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices (tests/conftest.py)")
    loss_fn, params = setup(name)
    mesh = distributed.make_data_mesh(jax.devices()[:8])
    rs = np.random.RandomState(3)
    n = 16
    mask = np.ones(n, np.float32)
    mask[[3, 12]] = 0
    batch = {"image": rs.randn(n, 2, 8, 8, 3).astype(np.float32),
             "label": rs.randint(0, NUM_CLASSES, (n, 2)).astype(np.int32), "mask": mask}
    sums, stats = {}, {}
    for method in ("vmap", "bookkeeping"):
        plan = plan_lib.fixed_plan(clipping=ClippingConfig(mode="flat", clip_norm=0.1), noise_multiplier=0.0,
                                   expected_batch_size=8.0, params=params, secret=keys.RunSecret.insecure_fixed(0),
                                   grad_method=method)
        accumulate = step_lib.make_accumulate_fn(loss_fn, step_lib.StepConfig(plan=plan, microbatch_size=1), mesh)
        acc, st = accumulate(distributed.replicate(params, mesh), step_lib.zeros_accumulator(params, mesh),
                             distributed.shard_batch(batch, mesh), jax.random.key(5))
        sums[method] = step_lib.global_sum(acc, mesh)
        stats[method] = {k: np.asarray(v) for k, v in st.items()}
    assert_same((sums["vmap"], stats["vmap"]), (sums["bookkeeping"], stats["bookkeeping"]))


def native_vs_float32(layer, x, ghost):
    """One tapped layer's (norms, weighted sum) on the same bf16 x and d by the float32 route and
    the tensor-core route (matmul="native"), and the count of bf16-operand dots of each."""
    loss_fn, params, _ = adapters.nnx_loss_fn(Probe(layer), dot_loss)
    z = jax.eval_shape(lambda: layer(x[0]))
    d = jnp.asarray(np.random.RandomState(1).randn(M, *z.shape), jnp.bfloat16)
    (spec,) = bookkeeping.discover_ops(loss_fn.tapped, params, {"image": x, "d": d}, jax.random.key(0)).values()
    flat = {taps.param_path(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    op_params = {n: flat[path] for n, path in spec.param_paths.items()}
    weights = jnp.asarray([0.5, 1.0, 0.0, 0.25], F32)
    out, dots = {}, {}
    for mm in ("float32", "native"):
        def run(xx, dd, mm=mm):
            sq, summer = bookkeeping.op_norms(spec, op_params, xx, dd, ghost, mm)
            return sq, summer(weights)
        out[mm] = jax.jit(run)(x, d)
        dots[mm] = low_precision_dots(run, x, d)
    return out, dots


def test_split_dot_is_within_two_to_the_minus_17_of_the_exact_contraction():
    """split_dot (bf16 a, float32 b as bf16 high + low parts) vs float64: |error| <= 2^-17 sum|a||b|
    (+ float32 accumulation); a single bf16 rounding of b (negative control) is far outside it."""
    from dpft.privacy import bk_layers
    rs = np.random.RandomState(0)
    a = jnp.asarray(rs.randn(16, 512)).astype(jnp.bfloat16)
    b = jnp.asarray(rs.randn(512, 32) * np.exp(3 * rs.randn(512, 1)), F32)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    exact, scale = a64 @ b64, np.abs(a64) @ np.abs(b64)
    bound = (2.0 ** -17 + 512 * 2.0 ** -24) * scale
    got = np.asarray(jax.jit(lambda x, y: bk_layers.split_dot("ij,jk->ik", x, y, True))(a, b), np.float64)
    assert np.all(np.abs(got - exact) <= bound)
    single = np.asarray(bk_layers.dot("ij,jk->ik", a, b.astype(jnp.bfloat16), True), np.float64)
    assert np.max(np.abs(single - exact) / bound) > 10


@pytest.mark.parametrize("ghost", ["always", "never"])
@pytest.mark.parametrize("case", ["same_3x3", "grouped_strided", "conv_3d", "kernel_larger_than_activations",
                                  "linear", "general_2in_2out"])
def test_bfloat16_native_operands_equal_the_float32_route(case, ghost):
    """bf16 x and d: the tensor-core route (bf16 operands, float32 accumulation: matmul="native",
    what "auto" takes off CPU) gives the float32 route's norms and weighted sum on the same
    inputs (products of bf16 numbers are exact in float32: only the summation order and the
    weighted sum's hi/lo split, 2^-16, differ), and it really contracts bf16 operands."""
    if case in CONV_CASES:
        kw, in_shape = CONV_CASES[case]
        layer = nnx.Conv(in_shape[-1], 6, rngs=RNGS(), dtype=jnp.bfloat16, **kw)
    else:
        layer, in_shape = {"linear": (nnx.Linear(5, 7, rngs=RNGS(), dtype=jnp.bfloat16), (3, 5)),
                           "general_2in_2out": (nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=RNGS(),
                                                                  dtype=jnp.bfloat16), (6, 2, 3))}[case]
    x = rand(M, K, *in_shape).astype(jnp.bfloat16)
    out, dots = native_vs_float32(layer, x, ghost)
    (sq32, sum32), (sqn, sumn) = out["float32"], out["native"]
    np.testing.assert_allclose(np.asarray(sqn), np.asarray(sq32), rtol=1e-5)
    for name in sum32:
        scale = float(jnp.max(jnp.abs(sum32[name])))
        np.testing.assert_allclose(np.asarray(sumn[name]), np.asarray(sum32[name]), rtol=1e-4, atol=1e-5 * scale)
    assert dots["native"] > 0 and dots["float32"] == 0, dots


@pytest.mark.parametrize("name", MODEL_PARAMS)
@pytest.mark.parametrize("matmul", ["float32", "native"])
def test_bfloat16_removing_one_example_moves_the_sum_by_at_most_c(name, matmul):
    """bf16 compute, float32 params: ||S - S_-i|| <= C (1 + 1e-4) on aligned gradients, every route,
    with float32 contractions and with the tensor-core route (bf16 operands)."""
    from dpft.privacy.sensitivity import aligned_batch, removal_distances
    loss_fn, params = setup(name, jnp.bfloat16)
    rs = np.random.default_rng(0)
    batch = aligned_batch({"image": rs.standard_normal([1, 8, 8, 3]).astype(np.float32),
                           "label": np.zeros([1], np.int32)}, 16)
    c = 0.01
    clipping = ClippingConfig(mode="flat", clip_norm=c)
    for ghost in bookkeeping.GHOST_CHOICES:
        sum_fn = jax.jit(lambda b, g=ghost: bookkeeping.bk_clipped_grad_sum(
            loss_fn, params, b, jax.random.key(0), clipping=clipping, microbatch_size=16, ghost=g,
            matmul=matmul)[0])
        d = removal_distances(sum_fn, batch, [0, 7, 15])
        assert np.all(d <= c * (1 + 1e-4)), (ghost, d / c)
        assert np.all(d >= c * (1 - 1e-3)), (ghost, d / c)
