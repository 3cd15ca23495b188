"""Multi-process start-up and data-parallel placement helpers.

`initialize_distributed` calls `jax.distributed.initialize()` exactly when the run spans
several processes, detected (first match wins) from
  1. explicit settings: `DPFT_COORDINATOR_ADDRESS` (host:port), `DPFT_NUM_PROCESSES`,
     `DPFT_PROCESS_ID` (all three), or the same as attributes of `args`
     (`coordinator_address`, `num_processes`, `process_id`);
  2. SLURM: `SLURM_JOB_ID` with `SLURM_NTASKS` > 1 (jax reads the coordinator, process count
     and rank from the SLURM variables itself);
  3. Cloud TPU: `DPFT_CLUSTER=tpu` (set by `launch/tpu_vm.sh` on every worker of a GCE TPU VM
     slice: jax reads the workers from the TPU metadata server) or `TPU_WORKER_HOSTNAMES`
     listing more than one host (GKE);
and is a no-op otherwise (one process, e.g. a laptop or a single GPU/TPU host).

It must run before anything initialises a jax backend (`jax.devices()`, `jax.process_index()`,
any computation): every `dpft` command that runs models calls it first (`dpft.cli`), and it
refuses with a clear error when a backend is already up.

GPUs: jax's own SLURM detection gives each process the single GPU `SLURM_LOCALID` (one GPU per
node with one task per node; "invalid device ordinal" with `--gpus-per-task=1`). dpft instead
computes the local device ids from `CUDA_VISIBLE_DEVICES` and the SLURM task layout
(`local_device_plan`, a pure function): every GPU a task can see is used, and GPUs a task shares
with other tasks of its node are split evenly between them. After start-up `check_local_devices`
refuses a process that sees fewer GPUs than it was given.

The mesh has one axis "data" over all devices of all processes. A host feeds its own
slice of the global batch (`shard_batch`); parameters are replicated (`replicate`).
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpft.errors import UsageError

DATA_AXIS = "data"
#: The variables that name the accelerators a process may use, first match wins (NVIDIA, AMD).
VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How to call `jax.distributed.initialize` (None fields: let jax auto-detect).

    `rank`/`size`: this process's index and the process count where known before start-up
    (explicit settings and SLURM), else None (TPU: jax asks the metadata server)."""

    source: str  # "explicit" | "slurm" | "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    rank: int | None = None
    size: int | None = None

    def kwargs(self) -> dict[str, Any]:
        keep = ("coordinator_address", "num_processes", "process_id")
        return {k: getattr(self, k) for k in keep if getattr(self, k) is not None}


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
        return ClusterPlan("explicit", str(given["coordinator_address"]), n, pid, rank=pid, size=n)
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        return ClusterPlan("slurm", rank=_int(env.get("SLURM_PROCID", "0"), "SLURM_PROCID"),
                           size=_int(env["SLURM_NTASKS"], "SLURM_NTASKS"))
    cluster = env.get("DPFT_CLUSTER", "").strip().lower()
    if cluster not in ("", "tpu"):
        raise UsageError(f"DPFT_CLUSTER={env.get('DPFT_CLUSTER')!r}: the only value is 'tpu' "
                         f"(set by launch/tpu_vm.sh); unset it otherwise")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if cluster == "tpu" or len(hosts) > 1:
        rank = env.get("TPU_WORKER_ID")
        return ClusterPlan("tpu", rank=None if rank in (None, "") else _int(rank, "TPU_WORKER_ID"),
                           size=len(hosts) if len(hosts) > 1 else None)
    return None


# ---------------------------------------------------------------- accelerators of this process

@dataclasses.dataclass(frozen=True)
class LocalDevicePlan:
    """Which of the GPUs this process can see it drives.

    `ids`: ordinals among the visible GPUs (what `jax.distributed.initialize(local_device_ids=...)`
    takes), or None for "no GPU here: let jax choose" (CPU, TPU). `why`: one line for the log."""

    ids: tuple[int, ...] | None
    why: str


def _visible(env: Mapping[str, str]) -> tuple[str, list[str]] | None:
    """(variable, entries) of the first visible-devices variable that is set, else None."""
    for name in VISIBLE_DEVICE_VARS:
        if name in env:
            value = env[name].strip()
            if value in ("", "NoDevFiles", "-1"):
                return name, []
            return name, [v.strip() for v in value.split(",") if v.strip()]
    return None


def _count_device_files() -> int:
    """NVIDIA GPUs on this machine (/dev/nvidia0, /dev/nvidia1, ...), without starting CUDA."""
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


def _tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks of this SLURM step on this node (1 outside SLURM).

    SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE look like "2(x3),1": entry i belongs to
    node i of the step (SLURM_NODEID)."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        text = env.get(name, "").strip()
        if not text:
            continue
        counts: list[int] = []
        for part in text.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                raise UsageError(f"{name}={text!r}: not a SLURM tasks-per-node list")
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = _int(env.get("SLURM_NODEID", "0"), "SLURM_NODEID")
        if not 0 <= node < len(counts):
            raise UsageError(f"SLURM_NODEID={node} but {name}={text!r} lists {len(counts)} node(s)")
        return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
    return 1


def local_device_plan(env: Mapping[str, str] | None = None,
                      count_device_files: Callable[[], int] = _count_device_files) -> LocalDevicePlan:
    """The GPUs this process drives, from `CUDA_VISIBLE_DEVICES` (or HIP/ROCR) and the SLURM task
    layout; pure apart from `count_device_files` (used only when no visible-devices variable is set).

    * `JAX_LOCAL_DEVICE_IDS` set: taken as given (the user decides).
    * No GPU visible: ids None (CPU or TPU; jax picks its devices).
    * One task on this node: every visible GPU.
    * Several tasks on this node, each seeing the node's GPUs (SLURM gave GPUs per node, not per
      task: the task sees all `SLURM_GPUS_ON_NODE`): task `SLURM_LOCALID` takes its even share;
      GPUs that do not split evenly are refused (UsageError naming the flags).
    * Several tasks, each seeing fewer GPUs than the node has (`--gpus-per-task`, `--gpu-bind`:
      SLURM already bound them): every visible GPU (their ordinals start at 0 in each task).
    """
    env = os.environ if env is None else env
    if env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
        ids = tuple(_int(x, "JAX_LOCAL_DEVICE_IDS") for x in env["JAX_LOCAL_DEVICE_IDS"].split(",") if x.strip())
        return LocalDevicePlan(ids, f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']}")
    vis = _visible(env)
    if vis is None:
        n_visible, seen = count_device_files(), "GPU device files"
    else:
        n_visible, seen = len(vis[1]), f"{vis[0]}={env[vis[0]]}"
    if n_visible == 0:
        return LocalDevicePlan(None, "no GPU visible")
    tasks = _tasks_on_node(env)
    local = _int(env.get("SLURM_LOCALID", "0"), "SLURM_LOCALID")
    if tasks <= 1:
        return LocalDevicePlan(tuple(range(n_visible)), f"all {n_visible} visible GPUs ({seen}), one task on this node")
    if not 0 <= local < tasks:
        raise UsageError(f"SLURM_LOCALID={local} must be in [0, {tasks}) (tasks on this node)")
    node_gpus = env.get("SLURM_GPUS_ON_NODE", "").strip()
    per_task = env.get("SLURM_GPUS_PER_TASK", "").strip()
    if node_gpus:
        shared = n_visible >= _int(node_gpus, "SLURM_GPUS_ON_NODE")
    elif per_task:
        shared = n_visible > _int(per_task.split(":")[-1], "SLURM_GPUS_PER_TASK")
    else:
        shared = n_visible >= tasks  # nothing says they are bound: a task that sees several shares them
    if not shared:
        return LocalDevicePlan(tuple(range(n_visible)),
                               f"all {n_visible} visible GPUs ({seen}), bound to this task by SLURM "
                               f"(task {local} of {tasks} on this node)")
    if n_visible % tasks:
        raise UsageError(f"{n_visible} GPUs ({seen}) cannot be split evenly between the {tasks} tasks on this node: "
                         f"use --gpus-per-task=N (or --ntasks-per-node that divides the GPUs per node)")
    k = n_visible // tasks
    return LocalDevicePlan(tuple(range(local * k, (local + 1) * k)),
                           f"GPUs {local * k}..{(local + 1) * k - 1} of {n_visible} visible ({seen}), "
                           f"shared by {tasks} tasks on this node: task {local}'s share")


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - a jax without the helper
        return False


def initialize_distributed(config_or_args: Any = None, *, env: Mapping[str, str] | None = None
                           ) -> ClusterPlan | None:
    """Start jax's multi-process runtime when needed (see module doc); returns the plan used.

    Must run before any other jax call that touches devices (UsageError otherwise). Idempotent.
    Passes the local device ids of `local_device_plan` (when GPUs are visible) so that jax's
    one-GPU-per-task SLURM default never applies.
    """
    plan = detect_cluster(env, config_or_args)
    if plan is None or jax.distributed.is_initialized():
        return plan
    if _backend_started():
        raise UsageError("multi-process start-up: a jax backend was started before jax.distributed.initialize(); "
                         "call dpft.distributed.initialize_distributed() first (this is a bug in the caller)")
    devices = local_device_plan(env)
    kwargs = plan.kwargs()
    if devices.ids is not None:
        kwargs["local_device_ids"] = list(devices.ids)
    jax.distributed.initialize(**kwargs)
    return plan


def not_this_process(what: str, env: Mapping[str, str] | None = None) -> str | None:
    """For commands that run on one process (`dpft audit`, `dpft demo`): None where this process runs
    it (a single-process job, or process 0 of a multi-process job), else the line to print before
    exiting 0. A multi-process job whose rank is unknown before start-up (a TPU slice without
    TPU_WORKER_ID) is refused: it cannot tell its processes apart without starting them all."""
    plan = detect_cluster(env)
    if plan is None or plan.rank == 0:
        return None
    if plan.rank is None:
        raise UsageError(f"{what} runs on one process; this {plan.source} job does not say which process this is: "
                         f"run it on one worker (e.g. gcloud ... ssh --worker=0)")
    return (f"{what} runs on one process: process 0 of this {plan.source} job runs it; process {plan.rank} "
            f"of {plan.size} exits")


def check_local_devices(env: Mapping[str, str] | None = None) -> LocalDevicePlan:
    """After start-up: UsageError when this process drives fewer GPUs than `local_device_plan` gave it
    (e.g. a task pinned to one GPU of several); returns the plan for the start-up line."""
    devices = local_device_plan(env)
    local = jax.local_devices()
    if devices.ids is not None and local and local[0].platform in ("gpu", "cuda", "rocm") \
            and len(local) < len(devices.ids):
        raise UsageError(f"process {jax.process_index()} drives {len(local)} GPU(s) but was given {len(devices.ids)} "
                         f"({devices.why}); check --gpus-per-task / --gpu-bind, or set JAX_LOCAL_DEVICE_IDS")
    return devices


# ---------------------------------------------------------------- keeping processes together

#: Seconds a process waits at a barrier for the others (a slow compile on a loaded host, a long save).
BARRIER_TIMEOUT_S = 3600


#: Barriers passed by this process. The coordination service wants a new id for each barrier; every
#: process passes the same barriers in the same order, so "<name>#<count>" names the same barrier on all.
_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has arrived at barrier `name` (the coordination service's barrier:
    no device collective, so no 30-second rendezvous). Every process must call the same barriers in
    the same order. A no-op in a single process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(f"dpft/{name}#{next(_BARRIERS)}", int(timeout_s * 1000))


def _signature(args: Any) -> str:
    """Shapes, dtypes and shardings of `args`: what decides whether jax compiles a new program."""
    return repr(jax.tree.map(lambda x: (getattr(x, "shape", ()), str(getattr(x, "dtype", type(x).__name__)),
                                        str(getattr(x, "sharding", ""))), args))


def together(fn: Callable, name: str) -> Callable:
    """`fn` (a jitted function, or a call such as `multihost_utils.process_allgather`) whose first
    call with each new argument signature first waits for every process.

    Why: with several processes on CPU, a program's first cross-process collective creates a gloo
    communicator whose rendezvous gives up after 30 seconds (not configurable; later calls wait as
    long as --xla_cpu_collective_timeout_seconds allows). Processes that compile at different
    speeds, or did different work just before (process 0 writes files), can be further apart than
    that. For a jitted `fn` the program is compiled before the barrier (`fn.lower(...).compile()`),
    so only the collective itself runs after it. A no-op wrapper in a single process."""
    seen: dict[str, Callable] = {}

    def call(*args: Any) -> Any:
        if jax.process_count() == 1:
            return fn(*args)
        key = _signature(args)
        if key not in seen:
            run = fn.lower(*args).compile() if hasattr(fn, "lower") else fn
            barrier(f"{name}/{len(seen)}")
            seen[key] = run
        return seen[key](*args)

    return call


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
CPU_SIZED_MODELS = ("nfnet_nano", "nfnet_micro", "nfnet_tiny")


def device_report(model_name: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Lines printed when a run starts: processes, local and global devices (and which GPUs this
    process drives, `check_local_devices`, which refuses too few), platform and device kind; a
    warning for a model larger than nfnet_tiny on CPU (usually a JAX without CUDA/TPU support)."""
    devices = jax.devices()
    d = devices[0]
    plan = check_local_devices(env)
    lines = [f"processes: {jax.process_count()} (this is {jax.process_index()}), local devices: "
             f"{jax.local_device_count()}, global devices: {len(devices)}; platform: {d.platform}, "
             f"device kind: {d.device_kind}" + (f"; {plan.why}" if plan.ids is not None and d.platform != "cpu"
                                                else "")]
    if d.platform == "cpu" and str(model_name).lower() not in CPU_SIZED_MODELS:
        lines.append(f"WARNING: training {model_name} on CPU will be very slow; if this machine has a GPU or TPU, "
                     f"install JAX for it (README, 'GPUs and TPUs': pip install -U 'jax[cuda12]' or 'jax[tpu]') "
                     f"and check with: python -c \"import jax; print(jax.devices())\"")
    return lines
