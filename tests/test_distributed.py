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


def test_tpu_slices_are_detected_from_the_launcher_or_gke():
    assert D.detect_cluster({"DPFT_CLUSTER": "tpu"}).source == "tpu"  # launch/tpu_vm.sh on a GCE TPU VM slice
    assert D.detect_cluster({"DPFT_CLUSTER": "tpu", "TPU_WORKER_ID": "3"}).rank == 3
    with pytest.raises(UsageError, match="DPFT_CLUSTER='gpu'"):
        D.detect_cluster({"DPFT_CLUSTER": "gpu"})
    slurm = D.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"})
    assert (slurm.rank, slurm.size) == (2, 4)


def test_initialize_is_noop_single_process(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    assert D.initialize_distributed(env={}) is None
    assert not called
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(D, "_backend_started", lambda: False)
    monkeypatch.setattr(D, "_count_device_files", lambda: 0)
    for var in D.VISIBLE_DEVICE_VARS + ("JAX_LOCAL_DEVICE_IDS",):
        monkeypatch.delenv(var, raising=False)
    D.initialize_distributed(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"})
    assert called == [{}]  # no GPU: jax picks the devices


def _slurm(tasks_per_node: str, local: int, visible: str | None, gpus_on_node: int | None = 4, **more) -> dict:
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": str(local), "SLURM_LOCALID": str(local),
           "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **more}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if gpus_on_node is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus_on_node)
    return env


def test_local_device_ids_from_slurm_and_cuda_variables():
    """The GPUs each process drives, for the layouts `launch/slurm.sbatch` documents (the values are
    what SLURM sets: CUDA_VISIBLE_DEVICES per task, SLURM_GPUS_ON_NODE, the step's tasks per node)."""
    ids = lambda env, files=0: D.local_device_plan(env, count_device_files=lambda: files).ids  # noqa: E731
    # One task per node driving all 4 GPUs (slurm.sbatch's default): jax alone would give it [SLURM_LOCALID] = [0].
    assert ids(_slurm("1(x4)", 0, "0,1,2,3")) == (0, 1, 2, 3)
    # One task per GPU with --gpus-per-task=1: SLURM binds GPU k to task k, which sees it as ordinal 0
    # (jax alone would ask for ordinal k: "invalid device ordinal").
    assert [ids(_slurm("4(x2)", k, str(k), SLURM_GPUS_PER_TASK="1")) for k in range(4)] == [(0,)] * 4
    # --ntasks-per-node=4 with --gpus-per-node=4 and no binding: every task sees all 4, each takes its own.
    assert [ids(_slurm("4", k, "0,1,2,3")) for k in range(4)] == [(0,), (1,), (2,), (3,)]
    # Two tasks sharing 4 GPUs: two each; 8 GPUs of a node listed by their physical numbers.
    assert [ids(_slurm("2", k, "4,5,6,7,0,1,2,3", gpus_on_node=8)) for k in range(2)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # --gpus-per-task=2 on a 4-GPU node: bound, both of its own.
    assert ids(_slurm("2", 1, "2,3", SLURM_GPUS_PER_TASK="2")) == (0, 1)
    assert ids(_slurm("2", 1, "2,3", gpus_on_node=None, SLURM_GPUS_PER_TASK="2")) == (0, 1)
    # Heterogeneous steps: node 3 of "2(x3),1" runs one task.
    assert ids(_slurm("2(x3),1", 0, "0,1", SLURM_NODEID="3")) == (0, 1)
    # No CUDA_VISIBLE_DEVICES (SLURM without GPU scheduling): the GPUs of the machine.
    assert ids(_slurm("1", 0, None, gpus_on_node=None), files=8) == tuple(range(8))
    assert ids(_slurm("2", 1, None, gpus_on_node=None), files=8) == (4, 5, 6, 7)
    # No GPU at all (CPU, TPU): jax chooses.
    assert ids(_slurm("2", 1, None, gpus_on_node=None)) is None
    assert ids(_slurm("1", 0, "")) is None
    # The user's own choice wins.
    assert ids({**_slurm("4", 2, "0,1,2,3"), "JAX_LOCAL_DEVICE_IDS": "1,3"}) == (1, 3)
    # HIP (AMD) is read like CUDA.
    env = {k: v for k, v in _slurm("2", 1, None).items()}
    assert ids({**env, "HIP_VISIBLE_DEVICES": "0,1,2,3"}) == (2, 3)
    # Three tasks cannot share 4 GPUs evenly: refused, naming the flag.
    with pytest.raises(UsageError, match="--gpus-per-task"):
        D.local_device_plan(_slurm("3", 0, "0,1,2,3"), count_device_files=lambda: 0)
    with pytest.raises(UsageError, match="SLURM_LOCALID=5"):
        D.local_device_plan(_slurm("4", 5, "0,1,2,3"), count_device_files=lambda: 0)


def test_jax_alone_would_pin_one_gpu_and_initialize_passes_all_ids(monkeypatch):
    """The bug fixed: jax's SLURM detection fills in local_device_ids=[SLURM_LOCALID] when none are given;
    initialize_distributed gives the ids of local_device_plan, which jax keeps."""
    from jax._src import clusters

    env = _slurm("1", 0, "0,1,2,3", SLURM_STEP_NODELIST="node1", SLURM_NTASKS="2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    detect = lambda ids: clusters.ClusterEnv.auto_detect_unset_distributed_params(  # noqa: E731
        None, None, None, ids, None, None)[3]
    assert list(detect(None)) == [0]  # jax's default: one GPU per task
    assert list(detect([0, 1, 2, 3])) == [0, 1, 2, 3]
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(D, "_backend_started", lambda: False)
    assert D.initialize_distributed().source == "slurm"
    assert called == [{"local_device_ids": [0, 1, 2, 3]}]
    called.clear()
    explicit = {"DPFT_COORDINATOR_ADDRESS": "127.0.0.1:1234", "DPFT_NUM_PROCESSES": "2", "DPFT_PROCESS_ID": "1"}
    D.initialize_distributed(env={**env, **explicit})
    assert called == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
                       "local_device_ids": [0, 1, 2, 3]}]
    # Too late: a backend already started (what `dpft train` did before this was fixed) is refused clearly.
    monkeypatch.setattr(D, "_backend_started", lambda: True)
    with pytest.raises(UsageError, match="before jax.distributed.initialize"):
        D.initialize_distributed()


def test_a_process_seeing_fewer_gpus_than_it_was_given_is_refused(monkeypatch):
    class Gpu:
        platform = "gpu"
        device_kind = "fake"

    env = _slurm("1", 0, "0,1,2,3")
    monkeypatch.setattr(jax, "local_devices", lambda: [Gpu()])
    with pytest.raises(UsageError, match="drives 1 GPU.*given 4"):
        D.check_local_devices(env)
    monkeypatch.setattr(jax, "local_devices", lambda: [Gpu()] * 4)
    assert D.check_local_devices(env).ids == (0, 1, 2, 3)
    monkeypatch.setattr(jax, "local_devices", lambda: [Gpu()])
    assert D.check_local_devices(_slurm("4", 2, "2", SLURM_GPUS_PER_TASK="1")).ids == (0,)


def test_one_process_commands_run_on_process_zero_only():
    assert D.not_this_process("dpft audit", {}) is None
    assert D.not_this_process("dpft audit", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None
    line = D.not_this_process("dpft audit", {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert line == "dpft audit runs on one process: process 0 of this slurm job runs it; process 1 of 2 exits"
    with pytest.raises(UsageError, match="--worker=0"):
        D.not_this_process("dpft demo", {"DPFT_CLUSTER": "tpu"})


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
import sys, time
import numpy as np
from dpft import distributed as D
plan = D.initialize_distributed()
import jax
mesh = D.make_data_mesh()
local = np.full((4, 3), jax.process_index() + 1, np.float32)  # 2 local devices x 2 rows
g = D.shard_batch({"x": local}, mesh)
total = jax.jit(lambda x: x.sum())
if jax.process_index() == 1:
    time.sleep(float(sys.argv[1]))  # a process that compiles 35 s slower than the other (a loaded host)
result = float(D.together(total, "sum")(g["x"]))
print("RESULT", plan.source, jax.process_count(), jax.device_count(), g["x"].shape[0], result, flush=True)
'''


@pytest.mark.slow
def test_two_local_processes_form_one_mesh_and_wait_for_a_slow_one(tmp_path):
    """2 processes x 2 devices over 127.0.0.1; process 1 reaches the first cross-process collective 35 s
    after process 0. Without `together`, gloo's communicator rendezvous gives up after 30 s ("Gloo context
    initialization failed: ... GetKeyValue() timed out"); with it both wait at the coordination barrier."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    from dpft.testing import cpu as cpu_env
    base = cpu_env.subprocess_env(2, DPFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", DPFT_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(script), "35"], env={**base, "DPFT_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        result = [l for l in out.splitlines() if l.startswith("RESULT")][0].split()
        # 2 processes x 2 devices; global batch 8 rows; sum = 12 * 1 + 12 * 2.
        assert result[1:] == ["explicit", "2", "4", "8", "36.0"]


def test_device_report_names_platform_and_warns_for_big_models_on_cpu():
    lines = D.device_report("nfnet_tiny", env={})
    assert lines[0].startswith(f"processes: 1 (this is 0), local devices: {jax.local_device_count()}, global devices: "
                               f"{jax.device_count()}; platform: {jax.devices()[0].platform}, device kind: ")
    assert len(lines) == 1
    if jax.devices()[0].platform == "cpu":
        big = D.device_report("nfnet_f0", env={})
        assert len(big) == 2 and big[1].startswith("WARNING: training nfnet_f0 on CPU") and "jax[cuda12]" in big[1]


def test_one_process_commands_under_a_multi_task_job_run_on_process_zero_only(tmp_path):
    """`dpft audit`, `dpft demo` and a model-less `dpft evaluate` started as task 1 of a 2-task SLURM job
    say so and exit 0 without doing the work (task 0 does it); nothing is written."""
    from dpft.testing import cpu as cpu_env

    env = cpu_env.subprocess_env(1, SLURM_JOB_ID="9", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1")
    for command in (["audit", "--steps", "1"], ["demo", "--workdir", str(tmp_path / "demo"), "--quick"],
                    ["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]):
        r = subprocess.run([sys.executable, "-m", "dpft.cli", *command], env=env, capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "runs on one process: process 0 of this slurm job runs it; process 1 of 2 exits" in r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_importing_every_dpft_module_starts_no_jax_backend():
    """jax.distributed.initialize() must come before any backend starts: no dpft module may start one
    when it is imported (an import-time `jax.devices()` would crash every multi-process start-up)."""
    code = ("import importlib, pkgutil, dpft\n"
            "names = [m.name for m in pkgutil.walk_packages(dpft.__path__, 'dpft.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "from jax._src import xla_bridge\n"
            "print(len(names), xla_bridge.backends_are_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    count, started = r.stdout.split()[-2:]
    assert int(count) > 80 and started == "False", r.stdout
