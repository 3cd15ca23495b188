"""`config.train.trainable`: parameter-efficient private fine-tuning (dpft.nn.partition, dpft.nn.lora,
dpft.models.trainable, dpft.train.step).

* the clipped sum over a trainable subset equals a brute-force loop (jax.grad of the WHOLE loss per
  example, restricted to the trainable leaves, clipped, summed), with the vmap and book-keeping engines;
* book-keeping neither taps nor norms an op with a frozen parameter (its discovery is asserted);
* after real updates (the Trainer, as `dpft train` runs it) frozen parameters are bit-identical and
  trainable ones changed; the plan's dimension is the trainable count; the start-up line says so;
* LoRA: merged forward == the unmerged x W0 + s (x A) B; at init == the base model, bit for bit;
* bad values and refused combinations are one clear UsageError.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpft.config.base import load_config
from dpft.config.validation import validate
from dpft.data import fake
from dpft.errors import UsageError
from dpft.models import registry, trainable
from dpft.nn import lora, partition as partition_lib
from dpft.privacy import adapters, bookkeeping, engine
from dpft.privacy.engine import ClippingConfig
from dpft.testing.models import GroupNormConvNet
from dpft.train import loop
from dpft.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "fake_chexpert_tiny.py")
M, C = 4, 0.05
MASK = np.array([1, 1, 0, 1], np.float32)
F32 = jnp.float32


def _ce(logits, views):
    return adapters.softmax_cross_entropy_loss(logits, views)


def _batch(size: int = 16, channels: int = 3):
    rs = np.random.RandomState(0)
    return {"image": jnp.asarray(rs.randn(M, 1, size, size, channels), F32),
            "label": jnp.asarray(rs.randint(0, 5, (M, 1)), jnp.int32), "mask": jnp.asarray(MASK)}


def _nfnet():
    return registry.create("nfnet_nano", 5, seed=0, head_init="normal")  # a zero head: zero gradients below it


def _brute_force(loss_fn, params, part, batch, rng):
    """sum_i mask_i clip_C(g_i restricted to the trainable leaves), g_i = jax.grad of the whole loss."""
    views = {k: v for k, v in batch.items() if k != "mask"}
    train_paths = set(partition_lib.param_paths(part.trainable(params)))
    total = None
    grad = jax.jit(jax.grad(lambda p, view, key: loss_fn(p, view, key)[0]))  # one example, the whole tree
    for i in range(M):
        g = grad(params, jax.tree.map(lambda v: v[i], views), jax.random.fold_in(rng, i))
        leaves = [np.asarray(x, np.float64) for p, x in zip(partition_lib.param_paths(g), jax.tree.leaves(g))
                  if p in train_paths]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in leaves))
        clipped = [MASK[i] * x * min(1.0, C / norm) for x in leaves]
        total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
    return total


@pytest.mark.parametrize("model_name,spec", [("nfnet", "head"), ("nfnet", "norms_and_head"),
                                             ("nfnet", "regex:stem_conv1|linear"),
                                             # a conv's bias alone (affine route), a gain alone (free route)
                                             ("nfnet", "regex:^(stem_conv0/bias|stem_conv1/gain|linear/)"),
                                             ("gn_cnn", "norms_and_head")])
@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_clipped_sum_of_the_trainable_subset_equals_brute_force(model_name, spec, method):
    model = _nfnet() if model_name == "nfnet" else GroupNormConvNet(3, 5, channels=(4, 8, 8), groups=2)
    head = "linear" if model_name == "nfnet" else "head"
    loss_fn, params, _ = adapters.nnx_loss_fn(model, _ce)
    part = trainable.partition(spec, model, params, head)
    t, f = part.split(params)
    assert partition_lib.count(t) < partition_lib.count(params)
    restricted = adapters.restrict_loss(loss_fn, f, part.combine, part.frozen)
    batch, rng = _batch(), jax.random.key(3)
    fn = engine.clipped_grad_sum if method == "vmap" else bookkeeping.bk_clipped_grad_sum
    got, stats = jax.jit(lambda t_, b: fn(restricted, t_, b, rng, clipping=ClippingConfig("flat", C),
                                          microbatch_size=M))(t, batch)
    want = _brute_force(loss_fn, params, part, batch, rng)
    leaves = jax.tree.leaves(got)
    assert len(leaves) == len(want)
    for g, w in zip(leaves, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-4, atol=1e-8)
    assert float(stats["norms"][2]) == 0.0  # padding


def test_bookkeeping_taps_no_op_with_a_frozen_parameter():
    """Discovery of the restricted loss: no tapped op trains a frozen parameter; ops whose parameters are all
    frozen are skipped (cheaper); a conv with a frozen kernel and trained gain/bias is tapped on its
    affine route (`taps.PARTIAL_ROUTES`); with "all" every op is tapped."""
    model = _nfnet()
    loss_fn, params, _ = adapters.nnx_loss_fn(model, _ce)
    views = {k: v for k, v in _batch().items() if k != "mask"}
    rng = jax.random.key(0)
    everything = bookkeeping.discover(loss_fn.tapped, params, views, rng)
    assert len(everything.specs) > 10 and not everything.skipped
    convs = {k for k, s in everything.specs.items() if s.kind == "ws_conv"}
    skip_gains = {"blocks/0:skip_gain", "blocks/1:skip_gain"}  # NFBlock's skip_gain: its own (generic) op
    for spec, tapped_ops in (("head", {"linear:linear"}), ("norms_and_head", {"linear:linear"} | skip_gains | convs),
                             ("regex:^(stem_conv0|linear)/", {"stem_conv0:conv", "linear:linear"}),
                             ("regex:^(stem_conv0/bias|linear/)", {"linear:linear", "stem_conv0:conv"})):
        part = trainable.partition(spec, model, params, "linear")
        t, f = part.split(params)
        restricted = adapters.restrict_loss(loss_fn, f, part.combine, part.frozen)
        found = bookkeeping.discover(restricted.tapped, t, views, rng, restricted.frozen_paths)
        assert set(found.specs) == tapped_ops, spec
        for s in found.specs.values():
            assert not set(s.param_paths.values()) & part.frozen
            assert set(s.frozen_paths.values()) <= part.frozen
        assert set(found.skipped) == set(everything.specs) - tapped_ops
        assert not found.free  # every trained parameter is normed by its op's route
        if spec == "norms_and_head":
            assert all(set(found.specs[k].frozen_paths) == {"w"} for k in convs)
        if spec.startswith("regex:^(stem_conv0/bias"):
            assert set(found.specs["stem_conv0:conv"].param_paths) == {"bias"}


def test_norms_and_head_selects_the_documented_parameters():
    model = _nfnet()
    _, params, _ = adapters.nnx_loss_fn(model, _ce)
    names = {p[-1] for p in partition_lib.param_paths(trainable.partition("norms_and_head", model, params,
                                                                          "linear").trainable(params))}
    assert names == {"gain", "bias", "skip_gain", "w", "b"}  # w, b: the head only
    cnn = GroupNormConvNet(3, 5, channels=(4, 8, 8), groups=2)
    _, p2, _ = adapters.nnx_loss_fn(cnn, _ce)
    kept = set(partition_lib.param_paths(trainable.partition("norms_and_head", cnn, p2, "head").trainable(p2)))
    norms = {("norms", i, n) for i in range(3) for n in ("scale", "bias")}
    assert kept == norms | {("head", "kernel"), ("head", "bias")}


def test_lora_merged_forward_equals_unmerged_and_the_base_model_at_init():
    cnn = GroupNormConvNet(3, 5, channels=(4, 8, 8), groups=2)
    _, params, merge = adapters.nnx_loss_fn(cnn, _ce)
    lo = trainable.partition("lora:2", cnn, params, "head", seed=1)
    assert isinstance(lo, lora.Lora) and ("head", "kernel") not in lo.kernels and len(lo.kernels) == 3
    state = {"params": params, **lo.init_items(params)}
    t, f = lo.split_input(lo.step_input(state))
    x = _batch()["image"][:, 0]
    base = merge(params)(x)
    # at init (B = 0): the merged model is the base model, bit for bit
    merged0 = lo.combine(t, f)
    for a, b in zip(jax.tree.leaves(merged0), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # non-zero B: the merged kernel's forward == x W0 + s (x A) B computed unmerged (the last conv as a dense
    # layer on its patches is overkill: check the first conv's output on its im2col rows)
    rs = np.random.RandomState(2)
    t["factors"] = jax.tree.map(lambda v: jnp.asarray(rs.randn(*v.shape), F32) * 0.1, t["factors"])
    merged = lo.combine(t, f)
    key = lora.factor_key(("convs", 0, "kernel"))
    a, b = t["factors"][key]["a"], t["factors"][key]["b"]
    w0 = cnn.convs[0].kernel[...]
    patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "OIHW", "NHWC"))
    # patches' features are (in, kh, kw): reorder W0 and A to that order
    w0_rows = jnp.transpose(w0, (2, 0, 1, 3)).reshape(-1, w0.shape[-1])
    a_rows = jnp.transpose(a.reshape(3, 3, 3, -1), (2, 0, 1, 3)).reshape(27, -1)
    hi = jax.lax.Precision.HIGHEST
    unmerged = (jnp.matmul(patches, w0_rows, precision=hi)
                + lora.SCALE * jnp.matmul(jnp.matmul(patches, a_rows, precision=hi), b, precision=hi))
    unmerged = unmerged + cnn.convs[0].bias[...]
    merged_model = merge(merged)
    got = merged_model.convs[0](x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(unmerged), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(merged_model(x)), np.asarray(base))


def test_lora_clipped_sum_equals_brute_force_over_its_factors():
    """vmap engine, LoRA trained tree {head, factors}: against jax.grad of the merged loss per example."""
    cnn = GroupNormConvNet(3, 5, channels=(4, 8, 8), groups=2)
    loss_fn, params, _ = adapters.nnx_loss_fn(cnn, _ce)
    lo = trainable.partition("lora:2", cnn, params, "head", seed=1)
    t, f = lo.split_input(lo.step_input({"params": params, **lo.init_items(params)}))
    rs = np.random.RandomState(4)
    t["factors"] = jax.tree.map(lambda v: jnp.asarray(rs.randn(*v.shape), F32) * 0.1, t["factors"])
    restricted = adapters.restrict_loss(loss_fn, f, lo.combine, lo.frozen)
    batch, rng = _batch(), jax.random.key(3)
    got, _ = jax.jit(lambda t_, b: engine.clipped_grad_sum(restricted, t_, b, rng, clipping=ClippingConfig("flat", C),
                                                            microbatch_size=M))(t, batch)
    views = {k: v for k, v in batch.items() if k != "mask"}
    want = None
    grad = jax.jit(jax.grad(lambda tt, view, key: loss_fn(lo.combine(tt, f), view, key)[0]))
    for i in range(M):
        g = grad(t, jax.tree.map(lambda v: v[i], views), jax.random.fold_in(rng, i))
        norm = float(engine.global_norm_f32(g))
        g = jax.tree.map(lambda x: MASK[i] * np.asarray(x, np.float64) * min(1.0, C / norm), g)
        want = g if want is None else jax.tree.map(np.add, want, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-4, atol=1e-8)
    assert partition_lib.count(t) == 5 * 8 + 5 + sum(2 * (math.prod(s[:-1]) + s[-1]) for s in
                                                      ((3, 3, 3, 4), (3, 3, 4, 8), (3, 3, 8, 8)))


# ---------------------------------------------------------------- values and combinations
@pytest.mark.parametrize("value,needle", [
    ("heads", "unknown"), ("regex:(", "not a valid Python regex"), ("lora:0", "positive integer"),
    ("lora:x", "positive integer"), ("regex:", "empty")])
def test_bad_values_are_one_clear_error(value, needle):
    config = load_config(TINY, [f"--config.train.trainable={value}"])
    with pytest.raises(UsageError, match=needle) as e:
        validate(config, check_paths=False)
    assert f"config.train.trainable={value!r}" in str(e.value)


def test_a_regex_matching_nothing_names_the_field_value_and_example_paths():
    model = _nfnet()
    _, params, _ = adapters.nnx_loss_fn(model, _ce)
    with pytest.raises(UsageError) as e:
        trainable.partition("regex:^nothing$", model, params, "linear")
    msg = str(e.value)
    assert "config.train.trainable='regex:^nothing$'" in msg and "matches no parameter" in msg
    assert "blocks/0/conv0/bias" in msg


def test_lora_refuses_bookkeeping_and_auto_picks_vmap():
    from dpft.config import run_plan
    config = load_config(TINY, ["--config.train.trainable=lora:4", "--config.train.grad_method=bookkeeping"])
    with pytest.raises(UsageError) as e:
        validate(config, check_paths=False)
    line = str(e.value)
    assert "config.train.grad_method='bookkeeping'" in line and "config.train.trainable='lora:4'" in line
    assert "\n" not in line
    auto = load_config(TINY, ["--config.train.trainable=lora:4"])
    validate(auto, check_paths=False)
    assert run_plan.grad_method(auto) == "vmap"
    assert run_plan.grad_method(load_config(TINY, [])) == "auto"


def test_old_configs_upgrade_to_all():
    from dpft.config import upgrade
    old = load_config(TINY, []).to_dict()
    del old["train"]["trainable"]
    assert upgrade.upgrade(old).train.trainable == "all"


# ---------------------------------------------------------------- real updates through the Trainer
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake.write_fake_chexpert(str(tmp_path_factory.mktemp("chexpert")), n_patients=20, n_valid_patients=4)


def _overrides(root: str, value: str, updates: int = 2, extra: tuple = ()) -> list[str]:
    return [f"--config.data.root={root}", "--config.model.name=nfnet_nano", f"--config.train.num_updates={updates}",
            "--config.train.batch_size=8", "--config.train.physical_batch_size=16",
            "--config.train.microbatch_size=2", "--config.data.augmult=1", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=1", "--config.privacy.insecure_fixed_noise_seed=7",
            "--config.privacy.clip_norm=1.0", "--config.eval.splits=test", f"--config.train.trainable={value}", *extra]


def _flat(tree) -> dict[str, np.ndarray]:
    return {partition_lib.path_name(p): np.asarray(x)
            for p, x in zip(partition_lib.param_paths(tree), jax.tree.leaves(tree))}


def _run_dpft_train(root, workdir, value: str, capsys, extra: tuple = ()) -> list[str]:
    """`dpft train` (in-process) -> its output lines."""
    from dpft import cli
    assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *_overrides(root, value, extra=extra)]) == 0
    return capsys.readouterr().out.splitlines()


def _initial_and_final(root, workdir, value: str, extra: tuple = ()):
    """(the run's wiring with its initial state, the final checkpoint's state) of a finished workdir."""
    from dpft.workdir import checkpointing
    t = loop.Trainer(load_config(TINY, _overrides(root, value, extra=extra)), str(workdir), print_fn=lambda *a: None)
    initial = dict(t.state)
    with checkpointing.Checkpointer(str(workdir), keep=2) as ckpt:
        assert t.restore(ckpt)
    return t, initial, t.state


BANDMF = ("--config.privacy.mechanism=bandmf", "--config.privacy.bandmf.bands=2")


@pytest.mark.parametrize("value,trained,extra", [
    ("head", {"linear/w", "linear/b"}, ()),
    # BandMF's correlated noise over the trained tree only: its noise state has the head's shape
    ("head", {"linear/w", "linear/b"}, BANDMF),
    pytest.param("lora:2", None, (), marks=pytest.mark.slow),  # the head and every kernel "w" (merged) change
], ids=["head", "head-bandmf", "lora:2"])
def test_dpft_train_leaves_frozen_parameters_bit_identical(root, tmp_path, capsys, value, trained, extra):
    """`dpft train` with train.trainable: 2 updates; the final checkpoint's frozen params and EMA are the
    initial ones bit for bit, the trained ones changed; the plan's dimension is the trained count and the
    start-up line says it."""
    if jax.device_count() not in (1, 2, 4, 8):
        pytest.skip("physical batch 16 = devices x 2 x k")
    lines = _run_dpft_train(root, tmp_path / "run", value, capsys, extra)
    t, initial, final = _initial_and_final(root, tmp_path / "run", value, extra)
    assert int(final["update"]) == 2
    before, after = _flat(initial["params"]), _flat(final["params"])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    if trained is None:
        trained = {k for k in before if k.endswith("/w")} | {"linear/b"}
    assert changed == trained
    ema_before, ema_after = _flat(initial["ema"]), _flat(final["ema"])
    assert {k for k in ema_before if not np.array_equal(ema_before[k], ema_after[k])} == trained
    dim = partition_lib.count(step_lib.trainable_part(final, t.step_cfg))
    assert t.plan.dimension == dim and t.plan.to_dict()["dimension"] == dim
    assert t.plan.model_size == partition_lib.count(final["params"]) == 3696
    assert f"trainable: {value}, {dim:,} of 3,696 parameters noised" in lines
    if value.startswith("lora"):
        assert t.plan.grad_method == "vmap" and "lora" in t._pytrees()
    if extra:  # BandMF: one correlated noise vector (b - 1 = 1) per TRAINED parameter, and it moved
        assert t.plan.correlated and t.plan.bands == 2
        trained_tree = step_lib.trainable_part(final, t.step_cfg)
        assert jax.tree.structure(final["noise_state"]) == jax.tree.structure(trained_tree)
        for z, p in zip(jax.tree.leaves(final["noise_state"]), jax.tree.leaves(trained_tree)):
            assert z.shape == (1,) + p.shape and np.any(np.asarray(z) != 0)


@pytest.mark.slow
def test_lora_run_resumes_bitwise_and_evaluates_the_merged_model(root, tmp_path):
    """2 updates straight vs 1, stop, resume, 1: identical params, factors, EMA, optimizer state; `dpft
    evaluate` and `dpft export` of the LoRA workdir need no LoRA (its params item is the merged model)."""
    from dpft import cli
    config = load_config(TINY, _overrides(root, "lora:2"))
    whole = loop.Trainer(config, str(tmp_path / "a"), print_fn=lambda *a: None)
    whole.run()
    first = loop.Trainer(config, str(tmp_path / "b"), print_fn=lambda *a: None)
    assert first.run(max_updates_this_call=1).preempted
    second = loop.Trainer(config, str(tmp_path / "b"), print_fn=lambda *a: None)
    second.run()
    assert second.updates_done == 2
    for name in ("params", "lora", "ema", "opt_state"):
        for a, b in zip(jax.tree.leaves(whole.state[name]), jax.tree.leaves(second.state[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "a")]) == 0
    assert cli.main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "release")]) == 0
    released = [p.name for p in (tmp_path / "release").rglob("*") if p.is_dir()]
    assert "lora" not in released  # the release is the merged model only
