"""dpft.distributed: cluster detection, the device mesh, sharding, two local processes, device report."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft import distributed as D
from dpft.errors import UsageError


def test_detect_cluster_from_environment():
    assert D.detect_cluster({}) is None
    assert D.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert D.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}).source == "slurm"
    assert D.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}) is None
    assert D.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}).source == "tpu"
    env = {"DPFT_COORDINATOR_ADDRESS": "127.0.0.1:1234", "DPFT_NUM_PROCESSES": "2", "DPFT_PROCESS_ID": "1",
           "SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}
    plan = D.detect_cluster(env)
    assert plan.source == "explicit"
    assert plan.kwargs() == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert D.detect_cluster({**env, "DPFT_NUM_PROCESSES": "1", "DPFT_PROCESS_ID": "0"}) is None
    with pytest.raises(UsageError, match="DPFT_PROCESS_ID"):
        D.detect_cluster({"DPFT_COORDINATOR_ADDRESS": "h:1", "DPFT_NUM_PROCESSES": "2"})
    with pytest.raises(UsageError, match="DPFT_PROCESS_ID=2"):
        D.detect_cluster({**env, "DPFT_PROCESS_ID": "2"})
    with pytest.raises(UsageError, match="host:port"):
        D.detect_cluster({**env, "DPFT_COORDINATOR_ADDRESS": "localhost"})

    class Args:
        coordinator_address, num_processes, process_id = "h:9", 3, 0

    assert D.detect_cluster({}, Args()).kwargs() == {"coordinator_address": "h:9", "num_processes": 3, "process_id": 0}


def test_initialize_is_noop_single_process(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    assert D.initialize_distributed(env={}) is None
    assert not called
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    D.initialize_distributed(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    assert called == [{}]


def test_mesh_shard_batch_and_replicate():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    mesh = D.make_data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == 8
    batch = {"image": np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3), "mask": np.ones(16, np.float32)}
    g = D.shard_batch(batch, mesh)
    assert g["image"].shape == (16, 2, 3)
    np.testing.assert_array_equal(np.asarray(g["image"]), batch["image"])
    shards = sorted(g["image"].addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8
    for i, s in enumerate(shards):
        np.testing.assert_array_equal(np.asarray(s.data), batch["image"][2 * i: 2 * i + 2])
    params = {"w": jnp.ones((3, 3)), "key": jax.random.key(0)}
    rep = D.replicate(params, mesh)
    assert rep["w"].sharding.is_fully_replicated and len(rep["w"].addressable_shards) == 8
    # A sum over the sharded batch equals the numpy sum.
    assert float(jax.jit(lambda x: x.sum())(g["image"])) == pytest.approx(float(batch["image"].sum()))
    with pytest.raises(ValueError, match="divisible by the 8 local devices"):
        D.shard_batch({"x": np.zeros((12, 2))}, mesh)


_WORKER = r'''
import numpy as np
from dpft import distributed as D
plan = D.initialize_distributed()
import jax
mesh = D.make_data_mesh()
local = np.full((4, 3), jax.process_index() + 1, np.float32)  # 2 local devices x 2 rows
g = D.shard_batch({"x": local}, mesh)
total = float(jax.jit(lambda x: x.sum())(g["x"]))
print("RESULT", plan.source, jax.process_count(), jax.device_count(), g["x"].shape[0], total, flush=True)
'''


def test_two_local_processes_form_one_mesh(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    base = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
            "DPFT_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "DPFT_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**base, "DPFT_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        result = [l for l in out.splitlines() if l.startswith("RESULT")][0].split()
        # 2 processes x 2 devices; global batch 8 rows; sum = 12 * 1 + 12 * 2.
        assert result[1:] == ["explicit", "2", "4", "8", "36.0"]


def test_device_report_names_platform_and_warns_for_big_models_on_cpu():
    lines = D.device_report("nfnet_tiny")
    assert lines[0].startswith(f"platform: {jax.devices()[0].platform}, device kind: ")
    assert len(lines) == 1
    if jax.devices()[0].platform == "cpu":
        big = D.device_report("nfnet_f0")
        assert len(big) == 2 and big[1].startswith("WARNING: training nfnet_f0 on CPU") and "jax[cuda12]" in big[1]
