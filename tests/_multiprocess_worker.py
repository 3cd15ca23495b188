"""One process of tests/test_multiprocess.py (not a test module itself).

    python tests/_multiprocess_worker.py OUT.npz

Multi-process when DPFT_COORDINATOR_ADDRESS / DPFT_NUM_PROCESSES / DPFT_PROCESS_ID are set
(dpft.distributed), else a single process. Runs UPDATES DP updates of the real step
(dpft.train.step) on a tiny conv net, over a mesh of all devices of all processes, twice:
noise off and noise on. The global batch of each update is fixed by a numpy seed; each
process feeds only its own rows. Writes the params of both runs (every leaf as the data of
this process's first shard) and checks the local shards agree.
"""
from __future__ import annotations

import json
import sys

from dpft import distributed


def main(out_path: str) -> int:
    plan = distributed.initialize_distributed()  # before anything touches the devices
    import jax
    import numpy as np
    import optax

    from dpft.privacy import adapters, engine, keys
    from dpft.privacy import plan as plan_lib
    from dpft.testing.models import SmallConvNet
    from dpft.train import step as step_lib

    updates, per_device, k, size, channels, classes = 3, 2, 2, 6, 2, 3
    mesh = distributed.make_data_mesh()
    n_dev, n_local = jax.device_count(), jax.local_device_count()
    global_batch = n_dev * per_device
    rows = slice(jax.process_index() * n_local * per_device, (jax.process_index() + 1) * n_local * per_device)

    model = SmallConvNet(channels, classes, channels=(3, 4), seed=1)
    loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
    optimizer = optax.sgd(0.5)

    def batch_of(u: int) -> dict:
        rs = np.random.RandomState(100 + u)
        mask = (rs.rand(global_batch) < 0.8).astype(np.float32)
        full = {"image": rs.randn(global_batch, k, size, size, channels).astype(np.float32),
                "label": np.repeat(rs.randint(0, classes, (global_batch, 1)), k, axis=1).astype(np.int32),
                "mask": mask, "example_id": np.where(mask > 0, np.arange(global_batch), -1).astype(np.int32)}
        return {name: v[rows] for name, v in full.items()}  # this process's rows only

    out = {}
    for sigma in (0.0, 1.1):
        clipping = engine.ClippingConfig(mode="flat", clip_norm=0.5)
        dp_plan = plan_lib.fixed_plan(clipping=clipping, noise_multiplier=sigma, expected_batch_size=0.8 * global_batch,
                                   params=params, secret=keys.RunSecret.insecure_fixed(7))
        cfg = step_lib.StepConfig(plan=dp_plan, microbatch_size=per_device)
        accumulate = step_lib.make_accumulate_fn(loss_fn, cfg, mesh)
        apply = step_lib.make_apply_fn(optimizer, cfg, mesh)
        state = distributed.replicate(step_lib.init_state(params, optimizer, cfg), mesh)
        for u in range(updates):
            acc = step_lib.zeros_accumulator(state["params"], mesh)
            for j in range(2):  # two physical batches per update
                batch = distributed.shard_batch(batch_of(2 * u + j), mesh)
                acc, _ = accumulate(state["params"], acc, batch, keys.dropout_key(7, u))
            state, _ = apply(state, acc, dp_plan.noise_base_key())
        for i, leaf in enumerate(jax.tree.leaves(state["params"])):
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            for s in shards[1:]:
                if not np.array_equal(s, shards[0]):
                    raise SystemExit(f"process {jax.process_index()}: leaf {i} differs across local devices")
            out[f"sigma{sigma}_leaf{i}"] = shards[0]
    np.savez(out_path, **out)
    with open(out_path + ".json", "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": n_dev, "local_device_count": n_local,
                   "plan": None if plan is None else plan.source}, f)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
