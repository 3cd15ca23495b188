"""benchmarks/cost_model: XLA's costs read right (a matmul's flops and bytes are known), the per-layer
route table equal to shapes worked out by hand on a toy network, and the benchmark's command end to
end on vit_micro (compile only)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import common, cost_model
from dpft.privacy import adapters, bk_layers


def test_program_costs_of_a_matmul_are_its_known_flops_and_bytes():
    b, n, o = 8, 16, 4
    costs = cost_model.program_costs(jax.jit(lambda x, w: x @ w), jax.ShapeDtypeStruct((b, n), jnp.float32),
                                     jax.ShapeDtypeStruct((n, o), jnp.float32))
    assert costs["flops"] == 2 * b * n * o
    assert costs["argument_bytes"] == 4 * (b * n + n * o) and costs["output_bytes"] == 4 * b * o
    assert costs["bytes_accessed"] >= costs["argument_bytes"] + costs["output_bytes"]
    assert costs["compile_s"] > 0


class ToyNet(nnx.Module):
    """A grouped 3x3 conv (4 -> 6 channels, 2 groups, stride 1, SAME) on 8 x 8 images, then a dense head."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(6 * 8 * 8, 5, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)
        return self.head(y.reshape(y.shape[0], -1))


def test_layer_routes_equal_the_shapes_worked_out_by_hand():
    model = ToyNet(nnx.Rngs(0))
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    b = 3
    batch = {"image": jnp.ones((b, 1, 8, 8, 4)), "label": jnp.zeros((b, 1), jnp.int32),
             "mask": jnp.ones((b,)), "example_id": jnp.arange(b)}
    setup = common.Setup("toy", loss_fn, params, batch, 0)
    rows = {r["layer"].split(":")[0]: r for r in cost_model.layer_routes(setup)}
    assert set(rows) == {"conv", "head"}
    conv, head = rows["conv"], rows["head"]
    # conv: 64 output positions per example, fan-in 3*3*(4/2) = 18, fan-out 6/2 = 3 per group, 2 groups
    assert (conv["rows"], conv["fan_in"], conv["fan_out"], conv["groups"]) == (64, 18, 3, 2)
    assert conv["materialised_bytes"] == 2 * 18 * 3 * 4 and conv["ghost_bytes"] == 2 * 2 * 64 * 64 * 4
    assert conv["materialised_flops"] == 2 * 64 * 18 * 3 and conv["ghost_flops"] == 2 * 64 * 64 * (18 + 3)
    assert conv["route"] == "materialised" and conv["fewer_bytes_route"] == "materialised"
    # head: one row per example, 384 -> 5
    assert (head["rows"], head["fan_in"], head["fan_out"], head["groups"]) == (1, 384, 5, 1)
    assert head["route"] == ("ghost" if bk_layers.use_ghost("auto", bk_layers.matmul_cost(1, 384, 5))
                             else "materialised") == "ghost" == head["fewer_bytes_route"]
    totals = cost_model.route_totals(list(rows.values()), batch=10)
    expected = 10 * (conv["materialised_bytes"] + head["ghost_bytes"]) / 2 ** 20
    assert np.isclose(totals["flop_rule_mib"], expected) and totals["layers_that_would_change"] == []
    assert np.isclose(totals["materialised_gradients_mib"], 10 * conv["materialised_bytes"] / 2 ** 20)


@pytest.mark.slow
def test_command_compiles_the_programs_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost_model.main(["--models", "vit_micro", "--batch", "2", "--dtype", "float32", "--ghost", "auto", "bytes",
                            "--programs", "batched_backward", "bk_clipped_sum", "noise_flat", "bk_full_dp",
                            "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {(r["program"], r["ghost"]): r for r in doc["rows"]}
    assert set(rows) == {("batched_backward", "-"), ("noise_flat", "-")} | {
        (p, g) for p in ("bk_clipped_sum", "bk_full_dp", "dp_step") for g in ("auto", "bytes")}
    base = rows["batched_backward", "-"]
    for ghost in ("auto", "bytes"):
        dp, full, clipped = rows["dp_step", ghost], rows["bk_full_dp", ghost], rows["bk_clipped_sum", ghost]
        # The DP step: flops and bytes of the clipped sum plus one flat draw; compile time and memory of the real program.
        assert dp["flops"] == clipped["flops"] + rows["noise_flat", "-"]["flops"]
        assert (dp["compile_s"], dp["temp_bytes"]) == (full["compile_s"], full["temp_bytes"])
        assert np.isclose(dp["bytes_accessed_ratio"], dp["bytes_accessed"] / base["bytes_accessed"])
        assert clipped["flops"] > base["flops"]  # the norms and the clipping come on top of the gradient
    assert base["flops_ratio"] == 1.0
    # The flat draw: one normal per parameter, at a fixed cost each whatever the model.
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(common.make_setup("vit_micro", 2).params))
    assert rows["noise_flat", "-"]["argument_bytes"] >= 4 * n_params
    (routes,) = doc["routes"]
    assert routes["layers"] == len(routes["per_layer"]) > 0
    # the byte rule's layers: the routes the rule function takes for each layer's shapes
    for layer in routes["per_layer"]:
        cost = bk_layers.matmul_cost(layer["rows"], layer["fan_in"], layer["fan_out"])
        assert layer["fewer_bytes_route"] == ("ghost" if bk_layers.use_ghost("bytes", cost) else "materialised")
    printed = capsys.readouterr().out
    assert "vit_micro batch 2 (routes: auto): bytes_accessed" in printed and "goal <= 1.5x" in printed
    assert "vit_micro batch 2 (routes: bytes): bytes_accessed" in printed
