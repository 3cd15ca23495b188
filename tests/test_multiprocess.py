"""Two local processes on 127.0.0.1 (jax.distributed via DPFT_* variables, gloo CPU collectives,
the default of jax 0.10.2) run the real DP step and end with identical parameters, equal to a
single process holding the same global batch on as many devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from dpft.testing import cpu as cpu_env

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multiprocess_worker.py")
TIMEOUT = 300


def _free_port() -> int:
    try:
        import portpicker
        return portpicker.pick_unused_port()
    except ImportError:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPFT_", "SLURM_", "TPU_", "JAX_COMPILATION"))}
    env.update(XLA_FLAGS=cpu_env.xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
    return env


def _launch(out: str, env: dict[str, str], log: str) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, WORKER, out], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=HERE)


def _finish(procs: list[subprocess.Popen], logs: list[str]) -> None:
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("worker timed out:\n" + "\n".join(open(l).read()[-2000:] for l in logs))
    for p, log in zip(procs, logs):
        text = open(log).read()
        if p.returncode != 0:
            pytest.fail(f"worker exited {p.returncode}:\n{text[-4000:]}")


def test_two_processes_end_with_identical_params_equal_to_one_process(tmp_path):
    port = _free_port()
    outs = [str(tmp_path / f"proc{i}.npz") for i in range(2)] + [str(tmp_path / "single.npz")]
    logs = [o + ".log" for o in outs]
    procs = [
        _launch(outs[i], _env(2, DPFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", DPFT_NUM_PROCESSES="2",
                              DPFT_PROCESS_ID=str(i)), logs[i])
        for i in range(2)
    ]
    procs.append(_launch(outs[2], _env(4), logs[2]))
    _finish(procs, logs)

    infos = [json.load(open(o + ".json")) for o in outs]
    assert [(i["process_index"], i["process_count"], i["device_count"], i["local_device_count"]) for i in infos] == \
        [(0, 2, 4, 2), (1, 2, 4, 2), (0, 1, 4, 4)]
    assert infos[0]["plan"] == "explicit" and infos[2]["plan"] is None
    p0, p1, single = (dict(np.load(o)) for o in outs)
    assert set(p0) == set(p1) == set(single) and len(p0) >= 4
    for name in sorted(p0):
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=f"{name}: processes disagree")
    for name in sorted(p0):  # noise off and noise on (same key on both sides)
        np.testing.assert_allclose(p0[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The noise is really on in the sigma > 0 run (so the agreement above is not vacuous).
    off = [k for k in p0 if k.startswith("sigma0.0_")]
    diff = max(np.abs(p0[k] - p0[k.replace("sigma0.0_", "sigma1.1_")]).max() for k in off)
    assert diff > 1e-3
