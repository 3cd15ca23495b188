"""The data-parallel DP update of dpft.train.step on 8 fake CPU devices (tests/conftest.py).

Every result is compared against an independent reference computed here with
`jax.vmap(jax.grad(...))`, explicit clipping, a plain sum, division by the expected batch
size and the optax.sgd rule written out (p - lr * g); and the 8-device mesh against a
1-device mesh running the same code.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpft.privacy import adapters, engine, keys, noise
from dpft.privacy import plan as plan_lib
from dpft.testing.models import SmallConvNet
from dpft import distributed
from dpft.train import step as step_lib

B, K, H, C_IN, NUM_CLASSES = 16, 2, 6, 2, 3  # physical batch 16 = 8 devices x 2
MICRO = 2
LR = 0.5
SEED = 3
SECRET = keys.RunSecret.insecure_fixed(SEED)
NOISE_KEY = keys.noise_base_key(SECRET)
EXPECTED = 12.0  # public expected batch size (differs from any realised count below)
MASK = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0], np.float32)
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _need_8_devices():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices (XLA_FLAGS from tests/conftest.py); have {jax.device_count()}")


@functools.lru_cache(maxsize=None)
def model_setup():
    model = SmallConvNet(C_IN, NUM_CLASSES, channels=(3, 4), seed=1)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    return loss_fn, params


@functools.lru_cache(maxsize=None)
def mesh_of(n: int):
    return distributed.make_data_mesh(jax.devices()[:n])


def make_batch(seed: int, n: int = B, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    mask = MASK if mask is None else mask
    assert mask.shape == (n,)
    return {
        "image": rs.randn(n, K, H, H, C_IN).astype(np.float32),
        "label": np.repeat(rs.randint(0, NUM_CLASSES, (n, 1)), K, axis=1).astype(np.int32),
        "mask": mask.astype(np.float32),
        "example_id": np.where(mask > 0, np.arange(n), -1).astype(np.int32),
    }


def step_config(*, clip: float = 0.5, mode: str = "flat", sigma: float = 0.0, ema: float = 0.0,
                polyak: bool = False) -> step_lib.StepConfig:
    clipping = engine.ClippingConfig(mode=mode, clip_norm=clip)
    plan = plan_lib.fixed_plan(clipping=clipping, noise_multiplier=sigma, expected_batch_size=EXPECTED,
                               params=None, secret=SECRET)
    return step_lib.StepConfig(plan=plan, microbatch_size=MICRO, ema_decay=ema, polyak=polyak)


_FNS: dict = {}


def compiled(cfg: step_lib.StepConfig, n_devices: int):
    """(accumulate, apply) for cfg on a mesh of the first n devices; built once per pair."""
    key = (cfg, n_devices)
    if key not in _FNS:
        loss_fn, _ = model_setup()
        mesh = mesh_of(n_devices)
        _FNS[key] = (step_lib.make_accumulate_fn(loss_fn, cfg, mesh),
                     step_lib.make_apply_fn(optax.sgd(LR), cfg, mesh))
    return _FNS[key]


def run_updates(cfg: step_lib.StepConfig, n_devices: int, updates: list[list[dict]]):
    """Runs the updates (each a list of physical batches) from the initial params; returns the state."""
    _, params = model_setup()
    mesh = mesh_of(n_devices)
    accumulate, apply = compiled(cfg, n_devices)
    state = distributed.replicate(step_lib.init_state(params, optax.sgd(LR), cfg), mesh)
    all_stats = []
    for u, batches in enumerate(updates):
        acc = step_lib.zeros_accumulator(state["params"], mesh)
        for j, batch in enumerate(batches):
            acc, stats = accumulate(state["params"], acc, distributed.shard_batch(batch, mesh),
                                    keys.dropout_key(SEED, u))
            all_stats.append(jax.tree.map(np.asarray, stats))
        state, _ = apply(state, acc, NOISE_KEY)
    return state, all_stats


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_close(got, want, **tol):
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **(tol or TOL))


# ----------------------------------------------------------------- independent reference

@functools.lru_cache(maxsize=None)
def _per_example_grads_fn():
    loss_fn, _ = model_setup()

    def one(p, views, key):
        return jax.grad(lambda q: loss_fn(q, views, key)[0])(p)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def reference_grad_sum(params, batch: dict, clip: float | None) -> tuple[list[np.ndarray], np.ndarray]:
    """sum_i mask_i * clip(g_i) (float64 leaves) and the per-example norms, from jax.vmap(jax.grad)."""
    views = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("mask", "example_id")}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(batch["mask"].shape[0]))
    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(_per_example_grads_fn()(params, views, keys))]
    norms = np.sqrt(sum(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in grads))
    factor = np.ones_like(norms) if clip is None else np.minimum(1.0, clip / norms)
    weight = factor * (batch["mask"] > 0)
    total = [np.tensordot(weight, g, axes=1) for g in grads]
    return total, norms


def sgd(params_leaves: list[np.ndarray], grad_leaves: list[np.ndarray]) -> list[np.ndarray]:
    return [p - LR * g for p, g in zip(params_leaves, grad_leaves)]


def unflatten_like(params, leaves_list):
    return jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x, jnp.float32) for x in leaves_list])


def expected_noise(update: int, sigma: float, clip: float, params) -> list[np.ndarray]:
    """sigma*C*(z_1 + z_2 + z_3)/sqrt(3), z_s ~ N(0, 1) of shape (n,) with key noise_key(seed, update)[s] of
    the three 64-bit streams, n the number of parameters, cut into the leaves in order (the documented draw)."""
    ps = jax.tree.leaves(params)
    k = noise.noise_key(NOISE_KEY, update)
    assert k.shape == (3,)
    n = sum(p.size for p in ps)
    z = sum(np.asarray(jax.random.normal(ks, (n,), jnp.float32), np.float64) for ks in k) / np.sqrt(3.0)
    cuts = np.cumsum([p.size for p in ps])[:-1]
    return [sigma * clip * part.reshape(p.shape) for part, p in zip(np.split(z, cuts), ps)]


# ----------------------------------------------------------------- tests

@pytest.mark.slow  # quick tier: see docs/running.md
def test_noiseless_update_8_devices_equals_1_device_and_reference():
    _, params = model_setup()
    batch = make_batch(0)
    ref_sum, norms = reference_grad_sum(params, batch, None)
    clip = float(np.median(norms[MASK > 0]))  # half the real examples are clipped
    cfg = step_config(clip=clip)
    ref_sum, norms = reference_grad_sum(params, batch, clip)
    want = sgd(leaves(params), [g / EXPECTED for g in ref_sum])
    state8, stats8 = run_updates(cfg, 8, [[batch]])
    state1, stats1 = run_updates(cfg, 1, [[batch]])
    assert (norms[MASK > 0] > clip * 1.01).any() and (norms[MASK > 0] < clip * 0.99).any()
    assert_trees_close(state8["params"], want)
    assert_trees_close(state1["params"], want)
    assert_trees_close(state8["params"], state1["params"])
    np.testing.assert_allclose(stats8[0]["norms"], norms * MASK, rtol=1e-5)
    np.testing.assert_array_equal(stats8[0]["mask"], MASK)
    assert int(state8["update"]) == 1
    # The update moved the params (the comparison above is not trivially true).
    assert max(np.abs(a - b).max() for a, b in zip(leaves(state8["params"]), leaves(params))) > 1e-3


def test_noise_is_replicated_bitwise_and_equals_privatize():
    _, params = model_setup()
    sigma, clip = 1.3, 0.5
    cfg = step_config(clip=clip, sigma=sigma, ema=0.9, polyak=True)
    batch = make_batch(1)
    state8, _ = run_updates(cfg, 8, [[batch]])
    # (1) every device holds the same bits of every replicated leaf.
    for name, tree in (("params", state8["params"]), ("ema", state8["ema"]), ("polyak", state8["polyak"])):
        for leaf in jax.tree.leaves(tree):
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            assert len(shards) == 8
            for s in shards[1:]:
                np.testing.assert_array_equal(s, shards[0], err_msg=f"{name} differs across devices")
    # (2) = privatize(reference clipped sum, noise_key(seed, 0)), as one device would compute it.
    ref_sum, _ = reference_grad_sum(params, batch, clip)
    noisy = noise.privatize(unflatten_like(params, ref_sum), noise.noise_key(NOISE_KEY, 0), noise_multiplier=sigma,
                            clip_norm=clip, expected_batch_size=EXPECTED)
    want = sgd(leaves(params), [np.asarray(g, np.float64) for g in jax.tree.leaves(noisy)])
    assert_trees_close(state8["params"], want, rtol=1e-5, atol=1e-5)
    state1, _ = run_updates(cfg, 1, [[batch]])
    assert_trees_close(state8["params"], state1["params"], rtol=1e-5, atol=1e-5)
    # (3) EMA (warm-up decay min(0.9, 1/10) at t=0) and Polyak (= params after one update).
    d = 0.1
    assert_trees_close(state8["ema"], [d * p + (1 - d) * w for p, w in zip(leaves(params), want)],
                       rtol=1e-5, atol=1e-5)
    assert_trees_close(state8["polyak"], want, rtol=1e-5, atol=1e-5)


def test_noise_of_each_update_is_exactly_the_documented_draw():
    """An all-padding batch has a clipped sum of exactly 0, so each update is pure noise."""
    _, params = model_setup()
    sigma, clip = 2.0, 0.25
    cfg = step_config(clip=clip, sigma=sigma)
    empty = make_batch(2, mask=np.zeros(B, np.float32))
    state1, _ = run_updates(cfg, 8, [[empty]])
    state2, _ = run_updates(cfg, 8, [[empty], [empty]])
    n0 = expected_noise(0, sigma, clip, params)
    n1 = expected_noise(1, sigma, clip, params)
    p1 = sgd(leaves(params), [n / EXPECTED for n in n0])
    p2 = sgd(p1, [n / EXPECTED for n in n1])
    assert_trees_close(state1["params"], p1, rtol=1e-6, atol=1e-6)
    assert_trees_close(state2["params"], p2, rtol=1e-6, atol=1e-6)
    # Fresh noise per update (not the same key twice), with std sigma*C.
    flat0 = np.concatenate([n.ravel() for n in n0])
    flat1 = np.concatenate([n.ravel() for n in n1])
    assert abs(np.corrcoef(flat0, flat1)[0, 1]) < 0.3
    assert 0.5 * sigma * clip < flat0.std() < 1.5 * sigma * clip
    # A 1-device mesh draws the same noise.
    state1_1dev, _ = run_updates(cfg, 1, [[empty]])
    assert_trees_close(state1_1dev["params"], state1["params"], rtol=1e-6, atol=1e-6)


def test_accumulating_physical_batches_equals_one_big_batch():
    _, params = model_setup()
    cfg = step_config(clip=0.3)
    masks = [MASK, np.roll(MASK, 5), np.ones(B, np.float32)]
    small = [make_batch(10 + i, mask=m) for i, m in enumerate(masks)]
    big = {k: np.concatenate([b[k] for b in small]) for k in small[0]}
    state_small, _ = run_updates(cfg, 8, [small])
    state_big, _ = run_updates(cfg, 8, [[big]])
    assert_trees_close(state_small["params"], state_big["params"])
    ref_sum, _ = reference_grad_sum(params, big, 0.3)
    assert_trees_close(state_small["params"], sgd(leaves(params), [g / EXPECTED for g in ref_sum]))


@pytest.mark.parametrize("mode", ["flat", "none"])
def test_padding_rows_change_nothing(mode):
    _, params = model_setup()
    cfg = step_config(clip=0.4, mode=mode)
    base = make_batch(4)
    pad = MASK == 0
    garbage = dict(base)
    rs = np.random.RandomState(99)
    image = base["image"].copy()
    # Private mode sums with `where`, so even NaN rows give 0; the non-private backward pass
    # multiplies by the (zero) cotangent, so there use huge finite values instead.
    image[pad] = np.nan if mode == "flat" else 1e6 * rs.randn(*image[pad].shape)
    label = base["label"].copy()
    label[pad] = (label[pad] + 1) % NUM_CLASSES
    garbage.update(image=image, label=label)
    zeros = dict(base, image=np.where(pad[:, None, None, None, None], 0.0, base["image"]).astype(np.float32))
    s_garbage, stats = run_updates(cfg, 8, [[garbage]])
    s_zeros, _ = run_updates(cfg, 8, [[zeros]])
    for a, b in zip(leaves(s_garbage["params"]), leaves(s_zeros["params"])):
        np.testing.assert_array_equal(a, b)
    real = {k: v[~pad] for k, v in base.items()}
    ref_sum, _ = reference_grad_sum(params, real, 0.4 if mode == "flat" else None)
    assert_trees_close(s_garbage["params"], sgd(leaves(params), [g / EXPECTED for g in ref_sum]))
    for k, v in stats[0].items():
        assert np.all(v[pad] == 0), f"stats[{k!r}] is not 0 on padding rows"
        assert np.all(np.isfinite(v)), k


def test_non_private_mode_is_plain_sgd_on_the_masked_mean():
    """mode 'none', sigma 0: p - lr * grad(mean of real losses) * B_real / B_expected."""
    loss_fn, params = model_setup()
    cfg = step_config(mode="none")
    assert cfg.plan.sensitivity == 0.0
    batch = make_batch(5)
    views = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("mask", "example_id")}
    real = MASK > 0

    def masked_mean_loss(p):
        losses = jax.vmap(lambda v: loss_fn(p, v, jax.random.key(0))[0])(views)
        return jnp.sum(jnp.where(real, losses, 0.0)) / real.sum()

    g = jax.grad(masked_mean_loss)(params)
    want = sgd(leaves(params), [np.asarray(x, np.float64) * real.sum() / EXPECTED for x in jax.tree.leaves(g)])
    state8, stats = run_updates(cfg, 8, [[batch]])
    state1, _ = run_updates(cfg, 1, [[batch]])
    assert_trees_close(state8["params"], want)
    assert_trees_close(state1["params"], want)
    assert np.all(stats[0]["norms"] == 0)
    # Differs from the clipped update at a small clip norm: clipping really is off.
    clipped, _ = reference_grad_sum(params, batch, 1e-3)
    assert max(np.abs(a - b).max() for a, b in zip(leaves(state8["params"]),
                                                  sgd(leaves(params), [c / EXPECTED for c in clipped]))) > 1e-3


def test_shard_batch_places_rows_on_their_devices():
    mesh = mesh_of(8)
    batch = make_batch(6)
    placed = distributed.shard_batch(batch, mesh)
    for shard in placed["example_id"].addressable_shards:
        i = mesh.devices.tolist().index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), batch["example_id"][2 * i: 2 * i + 2])
    acc = step_lib.zeros_accumulator(model_setup()[1], mesh)
    for leaf, p in zip(jax.tree.leaves(acc), jax.tree.leaves(model_setup()[1])):
        assert leaf.shape == (8,) + p.shape and not np.any(np.asarray(leaf))


def test_the_noise_key_is_an_argument_never_a_constant_of_the_compiled_update():
    """Invariant 7 where programs are cached on disk (a persistent XLA compilation cache: the test
    suite's, tests/conftest.py, or a user's JAX_COMPILATION_CACHE_DIR): the secret noise key
    enters the compiled update as an argument, so no cached program holds it. Negative control:
    the same check finds the key's words when the key is closed over."""
    cfg = step_config(sigma=1.0)
    _, params = model_setup()
    mesh = mesh_of(8)
    _, apply = compiled(cfg, 8)
    state = distributed.replicate(step_lib.init_state(params, optax.sgd(LR), cfg), mesh)
    acc = step_lib.zeros_accumulator(state["params"], mesh)
    words = [str(int(w)) for w in np.asarray(jax.random.key_data(NOISE_KEY)).ravel()]
    assert len(words) == 6 and all(len(w) > 3 for w in words)  # three 64-bit streams: 192 key bits
    program = jax.jit(apply).lower(state, acc, NOISE_KEY).as_text()
    assert not [w for w in words if w in program], "the noise key is compiled into the update"
    closed_over = jax.jit(lambda s, a: apply(s, a, NOISE_KEY)).lower(state, acc).as_text()
    assert all(w in closed_over for w in words), "the check cannot see a compiled-in key"


def test_zeros_accumulator_is_one_program_of_sharded_float32_zeros():
    """[D, *shape] float32 zeros sharded over the data axis, for every leaf; a second call of the same
    structure and mesh runs the same compiled program (not one dispatch per leaf)."""
    mesh = distributed.make_data_mesh()
    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": [jnp.ones((5,)), jnp.ones((2, 2, 2))]}
    before = step_lib._zeros_fn.cache_info()
    for _ in range(2):
        acc = step_lib.zeros_accumulator(params, mesh)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(acc)):
            assert a.shape == (mesh.shape[distributed.DATA_AXIS], *p.shape) and a.dtype == jnp.float32
            assert a.sharding.spec == jax.P(distributed.DATA_AXIS) and not np.asarray(a).any()
    after = step_lib._zeros_fn.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 1
