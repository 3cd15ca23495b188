"""Shared test set-up: 8 fake CPU devices for the sharding tests, float32 everywhere."""
import os

# Must be set before jax is imported anywhere in the test process (dpft.testing.cpu imports no jax):
# 8 fake CPU devices whose collectives wait for a slow, loaded machine instead of aborting after 40 s.
from dpft.testing import cpu as _cpu  # noqa: E402

# Programs over several devices compile optimised, like every multi-device run of the suite
# (`_cpu.xla_flags`): with LLVM at -O0 for everything, this process's in-process collectives over its 8
# devices crashed one CI run's worker (2026-12-07), as an -O0 all-reduce had hung the SLURM test's runs
# before. Programs on one device (most of this process's) compile at -O0, per program, below.
os.environ.setdefault("XLA_FLAGS", _cpu.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent XLA compilation cache for the whole run: made by the first process that imports
    # this file (pytest's controller under xdist, before it starts its workers, which inherit the
    # variable), shared by every worker and by their `dpft` subprocesses. A program compiled by one
    # test is loaded by every later test that builds the same program (a 6-update nfnet_micro
    # `dpft train`: 53 s cold, 20 s warm). A hit is the same executable. jax writes cache entries
    # atomically, so concurrent processes are safe. tests/test_gpu_check.py removes it (it measures
    # compiling).
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="dpft-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    # Every program, not only those that compile in over 1 s (jax's default): a `dpft train` also
    # compiles about 270 small programs (slices, comparisons, key folds; 7.3 s in all), which a warm
    # run then loads too (a 6-update nfnet_micro run on 8 fake devices, warm: 24.9 s -> 19.6 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# One-device programs at LLVM -O0 (`_cpu.fast_compile_one_device_programs`); imports jax.
_cpu.fast_compile_one_device_programs()

import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tmpfs_mount(tmp_path):
    """`mount(size)` -> a fresh real tmpfs of `size` (e.g. "400k") under tmp_path, unmounted after
    the test. Needs root: the test is skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A fresh fake gs:// store (tests/fake_gcs.py) in this process; yields the environment for
    subprocesses that use it too (they call `fake_gcs.install()` themselves)."""
    import fake_gcs
    from dpft import atomic_io

    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setenv(fake_gcs.ENV, str(root))
    monkeypatch.setattr(atomic_io, "_warned_private", set())  # warnings are once per path and process
    fake_gcs.install()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]), JAX_PLATFORMS="cpu")
    yield env
    fake_gcs.uninstall()


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path, gcs):
    """A directory to write in: a local one, or gs://bucket/... on the fake store."""
    return str(tmp_path / "local") if request.param == "local" else "gs://bucket/work"


#: Test modules that take longest on CI's 2 cores, longest first (seconds of one worker, `pytest
#: --durations=0`, 2026-12-07, after the audit moved to the Trainer). Under `--dist loadscope` a module runs on one worker, and the workers
#: take modules in collection order: starting with the longest (longest-processing-time-first
#: scheduling) keeps one worker from running a 6-minute module alone at the end.
LONGEST_FIRST = ("test_faults_e2e.py", "test_privacy_plan.py", "test_multihost_train.py", "test_slurm_local.py",
                 "test_bookkeeping.py", "test_train_e2e.py", "test_demo.py", "test_bookkeeping_nnx.py",
                 "test_gpu_check.py", "test_real_layout_e2e.py", "test_remote_paths.py", "test_launch.py",
                 "test_audit.py", "test_readme_commands.py", "test_notebooks.py", "test_vit.py", "test_preemption.py",
                 "test_distributed.py", "test_nfnet.py", "test_profile_step.py")


def pytest_collection_modifyitems(config, items):
    """Runs the modules of LONGEST_FIRST first, in that order; every other module after them in
    collection order; the tests of a module keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the order within
