"""Multi-process start-up and data-parallel placement helpers.

`initialize_distributed` calls `jax.distributed.initialize()` exactly when the run spans
several processes, detected (first match wins) from
  1. explicit settings: `DPFT_COORDINATOR_ADDRESS` (host:port), `DPFT_NUM_PROCESSES`,
     `DPFT_PROCESS_ID` (all three), or the same as attributes of `args`
     (`coordinator_address`, `num_processes`, `process_id`);
  2. SLURM: `SLURM_JOB_ID` with `SLURM_NTASKS` > 1 (jax reads the SLURM variables itself);
  3. Cloud TPU VM pods: `TPU_WORKER_HOSTNAMES` listing more than one host (jax asks the TPU
     metadata itself);
and is a no-op otherwise (one process, e.g. a laptop or a single GPU/TPU host).

The mesh has one axis "data" over all devices of all processes. A host feeds its own
slice of the global batch (`shard_batch`); parameters are replicated (`replicate`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpft.errors import UsageError

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How to call `jax.distributed.initialize` (None fields: let jax auto-detect)."""

    source: str  # "explicit" | "slurm" | "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source" and v is not None}


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}={value!r} must be an integer") from None


def detect_cluster(env: Mapping[str, str] | None = None, args: Any = None) -> ClusterPlan | None:
    """The multi-process plan implied by `env` (default os.environ) and `args`, or None.

    Pure apart from reading `env`; raises UsageError for incomplete/inconsistent settings.
    """
    env = os.environ if env is None else env
    explicit = {
        "coordinator_address": getattr(args, "coordinator_address", None) or env.get("DPFT_COORDINATOR_ADDRESS"),
        "num_processes": getattr(args, "num_processes", None) or env.get("DPFT_NUM_PROCESSES"),
        "process_id": getattr(args, "process_id", None),
    }
    if explicit["process_id"] is None:
        explicit["process_id"] = env.get("DPFT_PROCESS_ID")
    given = {k: v for k, v in explicit.items() if v not in (None, "")}
    if given:
        missing = [k for k in explicit if k not in given]
        if missing:
            names = {"coordinator_address": "DPFT_COORDINATOR_ADDRESS", "num_processes": "DPFT_NUM_PROCESSES",
                     "process_id": "DPFT_PROCESS_ID"}
            raise UsageError(
                "multi-process settings are incomplete: set "
                + ", ".join(names[m] for m in missing)
                + f" (given: {', '.join(names[k] + '=' + str(v) for k, v in given.items())})"
            )
        n = _int(given["num_processes"], "DPFT_NUM_PROCESSES")
        pid = _int(given["process_id"], "DPFT_PROCESS_ID")
        if n < 1 or not 0 <= pid < n:
            raise UsageError(f"DPFT_PROCESS_ID={pid} must be in [0, DPFT_NUM_PROCESSES={n})")
        if ":" not in str(given["coordinator_address"]):
            raise UsageError(f"DPFT_COORDINATOR_ADDRESS={given['coordinator_address']!r} must be host:port")
        if n == 1:
            return None
        return ClusterPlan("explicit", str(given["coordinator_address"]), n, pid)
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return ClusterPlan("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return ClusterPlan("tpu")
    return None


def initialize_distributed(config_or_args: Any = None, *, env: Mapping[str, str] | None = None) -> ClusterPlan | None:
    """Start jax's multi-process runtime when needed (see module doc); returns the plan used.

    Must run before any other jax call that touches devices. Idempotent.
    """
    plan = detect_cluster(env, config_or_args)
    if plan is None or jax.distributed.is_initialized():
        return plan
    jax.distributed.initialize(**plan.kwargs())
    return plan


def make_data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes).

    The axis type is jax's default for `jax.make_mesh` (Explicit in jax 0.10): place
    inputs with `jax.device_put(x, NamedSharding(mesh, P("data")))` before `jax.shard_map`.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over "data", the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch (pytree, leading axis B_local) -> global jax arrays.

    The global leading axis is B_local * process_count, split over "data"; each host's
    rows land on its own devices. B_local must be divisible by the local device count.
    """
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    sharding = data_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_local:
            raise ValueError(
                f"batch leaf of shape {x.shape}: leading axis must be divisible by the {n_local} local devices"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (identical on every host) fully replicated on the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


# Models small enough to train on a CPU in reasonable time (tests, the demo).
CPU_SIZED_MODELS = ("nfnet_micro", "nfnet_tiny")


def device_report(model_name: str) -> list[str]:
    """Lines printed when a run starts: platform, device kind and count; a warning for a model
    larger than nfnet_tiny on CPU (usually a JAX without CUDA/TPU support; see README)."""
    devices = jax.devices()
    d = devices[0]
    lines = [f"platform: {d.platform}, device kind: {d.device_kind}, {len(devices)} device(s) in "
             f"{jax.process_count()} process(es), {jax.local_device_count()} local"]
    if d.platform == "cpu" and str(model_name).lower() not in CPU_SIZED_MODELS:
        lines.append(f"WARNING: training {model_name} on CPU will be very slow; if this machine has a GPU or TPU, "
                     f"install JAX for it (README, 'GPUs and TPUs': pip install -U 'jax[cuda12]' or 'jax[tpu]') "
                     f"and check with: python -c \"import jax; print(jax.devices())\"")
    return lines
