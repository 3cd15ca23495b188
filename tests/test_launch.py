"""launch/: the launch scripts (local, SLURM, TPU VM) and sweep expansion (launch/sweep.py).
Distributed start-up: tests/test_distributed.py; metric files and progress: tests/test_logging_utils.py."""
import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dpft.testing import cpu as cpu_env


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
DIGITS = os.path.join(ROOT, "configs", "digits_demo.py")

_spec = importlib.util.spec_from_file_location("dpft_launch_sweep", os.path.join(LAUNCH, "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _bash_n(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _stub(tmp_path, name):
    """An executable that prints its arguments one per line (a fake srun/dpft/gcloud)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "' + name + '" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bindir


# ----------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["local.sh", "slurm.sbatch", "tpu_vm.sh"])
def test_static_scripts_parse(script):
    _bash_n(os.path.join(LAUNCH, script))


def test_local_sh_passes_overrides_through(tmp_path):
    bindir = _stub(tmp_path, "dpft")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    wd = tmp_path / "run dir"
    r = subprocess.run(
        ["bash", os.path.join(LAUNCH, "local.sh"), "configs/x.py:eps=4", str(wd), "--config.eval.splits=a,b",
         "--config.model.checkpoint=/path with space/F0.npz"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert r.stdout.splitlines() == ["dpft", "train", "--config", "configs/x.py:eps=4", "--workdir", str(wd),
                                      "--config.eval.splits=a,b", "--config.model.checkpoint=/path with space/F0.npz"]
    assert wd.is_dir()
    r = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "onlyone"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_slurm_sbatch_runs_srun_with_overrides(tmp_path):
    bindir = _stub(tmp_path, "srun")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    env.pop("DPFT_COORDINATOR_ADDRESS", None)
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", str(tmp_path / "w"), "--config.seed=3"],
                       capture_output=True, text=True, env=env, check=True)
    assert r.stdout.splitlines() == ["srun", "--kill-on-bad-exit=0", "--wait=300", "dpft", "train", "--config", "c.py",
                                      "--workdir", str(tmp_path / "w"), "--config.seed=3"]


def test_launchers_create_no_local_folder_for_an_object_store_workdir(tmp_path):
    """local.sh and slurm.sbatch used to `mkdir -p gs://b/run`, leaving a folder named `gs:` in the cwd."""
    for script, stub in (("local.sh", "dpft"), ("slurm.sbatch", "srun")):
        cwd = tmp_path / script
        cwd.mkdir()
        bindir = _stub(cwd, stub)
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
        env.pop("DPFT_COORDINATOR_ADDRESS", None)
        r = subprocess.run(["bash", os.path.join(LAUNCH, script), "c.py", "gs://bucket/run"], capture_output=True,
                           text=True, env=env, cwd=cwd, check=True)
        assert "gs://bucket/run" in r.stdout.splitlines()
        assert sorted(os.listdir(cwd)) == ["bin"], script


def test_slurm_sbatch_says_how_to_ask_for_cpus(tmp_path):
    bindir = _stub(tmp_path, "srun")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5", "SLURM_CPUS_ON_NODE": "2"}
    env.pop("SLURM_CPUS_PER_TASK", None)
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, check=True)
    assert "--cpus-per-task=N" in r.stderr
    (bindir / "srun").write_text('#!/usr/bin/env bash\necho "srun sees SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK"\n')
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", str(tmp_path / "w")],
                       capture_output=True, text=True, env={**env, "SLURM_CPUS_PER_TASK": "3"}, check=True)
    assert r.stdout.strip() == "srun sees SRUN_CPUS_PER_TASK=3" and "--cpus-per-task" not in r.stderr


def _tpu_vm(*args, **env_extra) -> list[list[str]]:
    """The gcloud commands launch/tpu_vm.sh would run (DPFT_DRY_RUN), each as argv."""
    env = {**os.environ, "DPFT_DRY_RUN": "1", "DPFT_PROJECT": "proj", **env_extra}
    r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), *args], capture_output=True, text=True, env=env,
                       check=True)
    return [shlex.split(line) for line in r.stdout.splitlines()]


def test_tpu_vm_starts_every_worker_detached_with_tpu_detection(tmp_path):
    """The remote command, run here as a worker's ssh session would run it: dpft starts with
    DPFT_CLUSTER=tpu (dpft.distributed then lets jax read the slice from the TPU metadata), the
    overrides intact, and survives the session's hang-up (SIGHUP to the whole ssh session)."""
    import signal
    import time

    (argv,) = _tpu_vm("my-tpu", "us-central2-b", "configs/x.py", "gs://b/run", "--config.data.root=/my data",
                      DPFT_REMOTE_DIR=str(tmp_path / "checkout"))
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone"]
    assert "--worker=all" in argv and argv[argv.index("--project") + 1] == "proj"
    remote = argv[argv.index("--command") + 1]
    # A worker: the checkout's .venv puts a fake `dpft` on PATH that records its arguments, then runs on.
    venv = tmp_path / "checkout" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{venv}:$PATH"\n')
    out = tmp_path / "dpft-args.txt"
    (venv / "dpft").write_text('#!/usr/bin/env bash\nsleep 2\n'
                               f'{{ echo "DPFT_CLUSTER=$DPFT_CLUSTER"; printf "%s\\n" "$@"; }} > {out}\n')
    (venv / "dpft").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    session = subprocess.Popen(["bash", "-c", remote], env={**os.environ, "HOME": str(home)},
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert "started; log ~/dpft-logs/run.log" in session.stdout.readline()
    os.killpg(session.pid, signal.SIGHUP)  # the connection drops
    session.wait(timeout=60)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert out.read_text().splitlines() == ["DPFT_CLUSTER=tpu", "train", "--config", "configs/x.py", "--workdir",
                                            "gs://b/run", "--config.data.root=/my data"]
    assert (home / "dpft-logs" / "run.log").exists()


def test_tpu_vm_install_and_logs_commands():
    scp, ssh = _tpu_vm("install", "my-tpu", "zone-a")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "my-tpu:~/dpft-src.tar.gz" and scp[5].endswith(".tar.gz")
    setup = ssh[ssh.index("--command") + 1]
    assert "--worker=all" in ssh and "tar -xzf ~/dpft-src.tar.gz -C ~/dpft" in setup
    assert ".venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'" in setup
    (logs,) = _tpu_vm("logs", "my-tpu", "zone-a", "gs://b/run/", "3")
    assert "--worker=3" in logs and logs[logs.index("--command") + 1] == "tail -n +1 -F ~/dpft-logs/run.log"
    r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "install", "only-tpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


# ----------------------------------------------------------------------------- sweep


def test_sweep_expansion_is_cartesian_product_in_order():
    jobs = sweep.expand([sweep.parse_sweep("privacy.epsilon=0.5,1,2"), sweep.parse_sweep("--config.train.batch_size=64,128")])
    assert jobs == [
        {"privacy.epsilon": e, "train.batch_size": b} for e in ("0.5", "1", "2") for b in ("64", "128")
    ]
    assert sweep.job_name(jobs[0]) == "epsilon-0.5_batch_size-64"
    names = [sweep.job_name(j) for j in jobs]
    assert len(set(names)) == len(names)
    # Same last component: full field paths keep names apart.
    clash = {"train.optimizer.name": "adam", "train.lr_schedule.name": "cosine"}
    assert sweep.job_name(clash) == "train.optimizer.name-adam_train.lr_schedule.name-cosine"
    with pytest.raises(sweep.SweepError, match="twice"):
        sweep.expand([("a", ["1"]), ("a", ["2"])])
    with pytest.raises(sweep.SweepError, match="no values"):
        sweep.parse_sweep("privacy.epsilon=")
    with pytest.raises(sweep.SweepError, match="FIELD="):
        sweep.parse_sweep("privacy.epsilon")


def test_sweep_prints_one_command_per_job(tmp_path, capsys):
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path), "--sweep", "privacy.epsilon=0.5,1,2,4,8",
                     "--set", "train.num_updates=3"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    for line, eps in zip(lines, ["0.5", "1", "2", "4", "8"]):
        argv = shlex.split(line)
        assert argv[:4] == ["dpft", "train", "--config", DIGITS]
        assert argv[argv.index("--workdir") + 1] == os.path.join(str(tmp_path), f"epsilon-{eps}")
        assert argv[-2:] == ["--config.train.num_updates=3", f"--config.privacy.epsilon={eps}"]


def test_sweep_checks_fields_before_running(tmp_path, capsys):
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path), "--sweep", "privacy.epsilom=1,2"])
    assert rc == 2 and "epsilom" in capsys.readouterr().err
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path), "--sweep", "train.batch_size=1.5,2"])
    assert rc == 2 and "train.batch_size" in capsys.readouterr().err


def test_sweep_run_executes_sequentially(tmp_path, capsys):
    bindir = _stub(tmp_path, "fake-dpft")
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path / "runs"), "--sweep", "seed=1,2",
                     "--run", "--dpft", str(bindir / "fake-dpft")])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["seed-1", "seed-2"]


def test_sweep_run_jobs_share_one_compilation_cache(tmp_path, monkeypatch):
    """--run's jobs see one persistent XLA cache: WORKDIR-jax-cache by default, an existing
    $JAX_COMPILATION_CACHE_DIR kept, --compile-cache DIR, or none with --compile-cache ''."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "env-dpft"
    fake.write_text('#!/usr/bin/env bash\necho "${JAX_COMPILATION_CACHE_DIR:-none}" >> "$(dirname "$0")/caches"\n')
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    for extra in ([], ["--compile-cache", str(tmp_path / "mine")], ["--compile-cache", ""]):
        assert sweep.main(["--config", DIGITS, "--workdir", str(runs), "--sweep", "seed=1,2", "--run", "--dpft",
                           str(fake), *extra]) == 0
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "outer"))
    assert sweep.main(["--config", DIGITS, "--workdir", str(runs), "--sweep", "seed=1", "--run", "--dpft", str(fake)]) == 0
    assert (bindir / "caches").read_text().split() == [f"{runs}-jax-cache"] * 2 + [str(tmp_path / "mine")] * 2 + \
        ["none"] * 2 + [str(tmp_path / "outer")]


def test_sweep_slurm_array_script(tmp_path):
    out = tmp_path / "sweep.sbatch"
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path / "runs"), "--sweep", "privacy.epsilon=1,8",
                     "--sweep", "train.optimizer.name=sgd,adam", "--slurm", str(out),
                     "--sbatch-option=--gpus-per-node=8"])
    assert rc == 0
    text = out.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --gpus-per-node=8" in text
    _bash_n(out)
    # Execute array task 2 with a fake srun: it must run job 2 (epsilon=8, sgd).
    bindir = _stub(tmp_path, "srun")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "2"}
    env.pop("DPFT_COORDINATOR_ADDRESS", None)
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, check=True)
    argv = r.stdout.splitlines()
    assert argv[argv.index("--workdir") + 1] == str(tmp_path / "runs" / "epsilon-8_name-sgd")
    assert argv[-2:] == ["--config.privacy.epsilon=8", "--config.train.optimizer.name=sgd"]
    env["SLURM_ARRAY_TASK_ID"] = "4"
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 2


FINETUNE = os.path.join(ROOT, "configs", "digits_finetune.py")


def test_sweep_imbalance_study_with_seeds_and_baseline(tmp_path, capsys):
    """minority fraction x epsilon x seeds plus the non-private baseline per (fraction, seed), in one sweep."""
    rc = sweep.main(["--config", FINETUNE, "--workdir", str(tmp_path), "--set", "model.checkpoint=",
                     "--sweep", "data.options.minority_fraction=0.001,0.3", "--sweep", "privacy.epsilon=1.15,16.2",
                     "--seeds", "0,1", "--baseline", "private=False", "--evaluate"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2 * 2 + 2 * 2
    jobs = [shlex.split(line) for line in lines]
    names = [os.path.basename(j[j.index("--workdir") + 1]) for j in jobs]
    assert names[:2] == ["minority_fraction-0.001_epsilon-1.15_seed-0", "minority_fraction-0.001_epsilon-1.15_seed-1"]
    baseline = [j for j, n in zip(jobs, names) if "non-private" in n]
    assert [n for n in names if "non-private" in n] == [
        f"minority_fraction-{f}_epsilon-non-private_seed-{s}" for f in ("0.001", "0.3") for s in (0, 1)]
    for j in baseline:
        assert j[j.index("--config") + 1] == FINETUNE + ":private=False"
        assert "--config.privacy.enabled=False" in j and not any(a.startswith("--config.privacy.epsilon") for a in j)
    for j in jobs:
        assert "&&" in j and j[j.index("&&") + 1:][:2] == ["dpft", "evaluate"] and j[-1] == "--reuse-predictions"
    # the configs load: the baseline is non-private with its own optimizer, the DP jobs are private
    from dpft.config.base import load_config
    base = load_config(FINETUNE + ":private=False", ["--config.privacy.enabled=False", "--config.seed=1"])
    dp = load_config(FINETUNE, ["--config.privacy.epsilon=1.15", "--config.data.options.minority_fraction=0.3"])
    assert (base.privacy.enabled, base.train.optimizer.name, base.seed) == (False, "adam", 1)
    assert (dp.privacy.enabled, dp.privacy.epsilon, dp.data.options.minority_fraction) == (True, 1.15, 0.3)
    with pytest.raises(sweep.SweepError, match="privacy.epsilon"):
        sweep.make_jobs(sweep.build_parser().parse_args(["--config", FINETUNE, "--workdir", "w", "--seeds", "0",
                                                         "--baseline"]))


def test_sweep_run_with_evaluate_and_baseline_without_arg(tmp_path, capsys):
    bindir = _stub(tmp_path, "fake-dpft")
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path / "runs"), "--sweep", "privacy.epsilon=2",
                     "--seeds", "0", "--baseline", "--evaluate", "--run", "--dpft", str(bindir / "fake-dpft")])
    assert rc == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["epsilon-2_seed-0", "epsilon-non-private_seed-0"]
    hint = next(line for line in out.splitlines() if line.startswith("compare with:"))
    assert "evaluate --compare" in hint and "--x privacy.epsilon" in hint and "--series" not in hint  # seeds aggregate


def test_sweep_slurm_script_with_baseline_and_evaluate(tmp_path):
    out = tmp_path / "s.sbatch"
    rc = sweep.main(["--config", FINETUNE, "--workdir", str(tmp_path / "runs"), "--sweep", "privacy.epsilon=4.98",
                     "--seeds", "0", "--baseline", "private=False", "--evaluate", "--slurm", str(out)])
    assert rc == 0
    _bash_n(out)
    bindir = _stub(tmp_path, "srun")
    dpft_stub = _stub(tmp_path, "dpft")
    env = {**os.environ, "PATH": f"{bindir}:{dpft_stub}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1"}
    env.pop("DPFT_COORDINATOR_ADDRESS", None)
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, check=True)
    lines = r.stdout.splitlines()
    assert FINETUNE + ":private=False" in lines and "--config.privacy.enabled=False" in lines
    assert lines[-5:] == ["dpft", "evaluate", "--workdir", str(tmp_path / "runs" / "epsilon-non-private_seed-0"),
                          "--reuse-predictions"]


# ----------------------------------------------------------------------------- distributed


# ----------------------------------------------------------------------------- metrics


@pytest.mark.slow
def test_imbalance_recipe_from_configs_sweep_and_compare(tmp_path):
    """The README's study, tiny: public pre-training config, then sweep.py over the fine-tune config
    (fraction x epsilon x seed + baseline, from the pre-training's checkpoint), then --compare; nfnet_nano
    instead of the configs' nfnet_tiny (0.6x the compile time). One seed:
    the aggregation over seeds (cells of 2 runs) is tested by tests/test_demo.py's imbalance study."""
    env = dict(os.environ, XLA_FLAGS=cpu_env.xla_flags(1))  # one CPU device
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    dpft = tmp_path / "dpft"
    dpft.write_text(f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} -m dpft.cli "$@"\n')
    dpft.chmod(0o755)
    pub = tmp_path / "public"
    r = subprocess.run([str(dpft), "train", "--config", os.path.join(ROOT, "configs", "digits_pretrain.py"),
                        "--workdir", str(pub), "--config.train.num_updates=3", "--config.train.checkpoint_every=3",
                        "--config.model.name=nfnet_nano"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tmp_path / "imb"
    r = subprocess.run([sys.executable, os.path.join(LAUNCH, "sweep.py"), "--config", FINETUNE, "--workdir", str(runs),
                        "--set", f"model.checkpoint={pub}/checkpoints/3/params", "--set", "model.name=nfnet_nano",
                        "--set", "train.num_updates=2",
                        "--set", "train.checkpoint_every=2", "--set", "individual.enabled=False",
                        "--sweep", "data.options.minority_fraction=0.3", "--sweep", "privacy.epsilon=4.98",
                        "--seeds", "0", "--baseline", "private=False", "--evaluate", "--run", "--dpft", str(dpft)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(os.listdir(runs)) == [f"minority_fraction-0.3_epsilon-{e}_seed-{s}"
                                        for e in ("4.98", "non-private") for s in (0,)]
    for d in os.listdir(runs):
        cfg = json.loads((runs / d / "config.json").read_text())
        assert cfg["model"]["checkpoint"].endswith("checkpoints/3/params")
        assert cfg["privacy"]["enabled"] is ("non-private" not in d)
        assert (runs / d / "eval" / "2" / "metrics.json").is_file()
    hint = next(line for line in r.stdout.splitlines() if line.startswith("compare with:"))
    assert "--x privacy.epsilon --series data.options.minority_fraction" in hint
    out = tmp_path / "cmp"
    r = subprocess.run([str(dpft), "evaluate", "--compare", *[str(runs / d) for d in sorted(os.listdir(runs))],
                        "--x", "data.options.minority_fraction", "--series", "privacy.epsilon", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cmp = json.loads((out / "compare.json").read_text())
    assert [(c["series"], c["x"], c["n_runs"]) for c in cmp["cells"]] == [(4.98, 0.3, 1), (None, 0.3, 1)]
    for run in cmp["runs"]:  # the realised subgroup sizes of each run's training split
        cov = json.loads((Path(run["run_dir"]) / "attribute_coverage.json").read_text())
        assert run["train_groups"]["group"] == cov["attributes"]["group"]["splits"]["train"]["groups"]
        n = run["train_groups"]["group"]
        assert 0.25 < n["minority"] / (n["minority"] + n["majority"]) < 0.35
    assert f"group: majority {n['majority']}, minority {n['minority']}" in (out / "compare.md").read_text()


# ----------------------------------------------------------------------------- SLURM resources, preemption

def _sbatch_lines(text):
    return [line[len("#SBATCH "):].strip() for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_sbatch_requests_gpus_cpus_signal_and_requeue():
    opts = _sbatch_lines(open(os.path.join(LAUNCH, "slurm.sbatch")).read())
    names = {o.split("=")[0]: (o.split("=", 1)[1] if "=" in o else None) for o in opts}
    assert "--gpus-per-node" in names or "--gres" in names
    # No CPU or task-count request that a small node cannot meet (a job asking for more CPUs than a node has
    # stays pending for ever), and none that stops `sbatch --ntasks=2` from putting two tasks on one node.
    assert "--cpus-per-task" not in names and "--ntasks-per-node" not in names and "--ntasks" not in names
    assert names["--signal"].startswith(("B:USR1@", "B:TERM@")) and int(names["--signal"].split("@")[1]) >= 60
    assert "--requeue" in names
    text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    assert "--account" in text and "--partition" in text  # documented


def _fake_slurm(tmp_path, srun_body):
    """A fake `srun` (runs `srun_body` in bash) and a `scontrol` recording its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "srun").write_text("#!/usr/bin/env bash\n" + srun_body)
    (bindir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for name in ("srun", "scontrol"):
        (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "123"}
    env.pop("DPFT_COORDINATOR_ADDRESS", None)
    env.pop("DPFT_NO_REQUEUE", None)
    return env


# The fake training step: marks that it started, then on SIGUSR1/SIGTERM exits 75 as dpft does.
_STOPPABLE = ('trap "echo stopped-by-USR1; exit 75" USR1\ntrap "echo stopped-by-TERM; exit 75" TERM\n'
              'touch "$STARTED"\nfor i in $(seq 600); do sleep 0.1; done\nexit 0\n')


def _run_signalled(script, args, env, sig, tmp_path):
    import signal as signal_lib
    import time

    started = tmp_path / "started"
    env = {**env, "STARTED": str(started)}
    proc = subprocess.Popen(["bash", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    proc.send_signal(getattr(signal_lib, sig))
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_slurm_sbatch_usr1_before_time_limit_requeues(tmp_path):
    env = _fake_slurm(tmp_path, _STOPPABLE)
    rc, out, err = _run_signalled(os.path.join(LAUNCH, "slurm.sbatch"), ["c.py", str(tmp_path / "w")], env, "SIGUSR1",
                                  tmp_path)
    assert "stopped-by-USR1" in out
    assert rc == 0 and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "123"], err


def test_slurm_sbatch_term_exits_75_without_requeue(tmp_path):
    env = _fake_slurm(tmp_path, _STOPPABLE)
    rc, out, err = _run_signalled(os.path.join(LAUNCH, "slurm.sbatch"), ["c.py", str(tmp_path / "w")], env, "SIGTERM",
                                  tmp_path)
    assert "stopped-by-TERM" in out and rc == 75 and not (tmp_path / "scontrol.log").exists(), err


def test_slurm_sbatch_passes_the_exit_code_through(tmp_path):
    env = _fake_slurm(tmp_path, "exit 6\n")
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", str(tmp_path / "w")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 6 and not (tmp_path / "scontrol.log").exists()


def test_sweep_array_script_carries_slurm_sbatch_resources(tmp_path):
    out = tmp_path / "sweep.sbatch"
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path / "runs"), "--sweep", "privacy.epsilon=1,8",
                     "--slurm", str(out), "--sbatch-option=--gpus-per-node=8", "--sbatch-option=--partition=gpu"])
    assert rc == 0
    got = _sbatch_lines(out.read_text())
    base = _sbatch_lines(open(os.path.join(LAUNCH, "slurm.sbatch")).read())
    for opt in base:
        name = opt.split("=")[0]
        if name not in ("--job-name", "--output", "--gpus-per-node"):
            assert opt in got, opt
    assert [o for o in got if o.startswith("--gpus-per-node")] == ["--gpus-per-node=8"]
    assert "--partition=gpu" in got and "--array=0-1" in got
    assert "exec bash" in out.read_text()  # the batch shell runs slurm.sbatch's body (its traps)
    # Array task 1 stopped by SIGUSR1 before its time limit: requeued.
    env = _fake_slurm(tmp_path, _STOPPABLE)
    env["SLURM_ARRAY_TASK_ID"] = "1"
    rc, stdout, err = _run_signalled(str(out), [], env, "SIGUSR1", tmp_path)
    assert rc == 0 and "stopped-by-USR1" in stdout and "requeue" in (tmp_path / "scontrol.log").read_text(), err


def test_sweep_run_reruns_a_job_stopped_early(tmp_path, capsys):
    counter = tmp_path / "count"
    fake = tmp_path / "dpft"
    fake.write_text(f'#!/usr/bin/env bash\necho x >> {counter}\n[[ $(wc -l < {counter}) -ge 2 ]] && exit 0\nexit 75\n')
    fake.chmod(0o755)
    rc = sweep.main(["--config", DIGITS, "--workdir", str(tmp_path / "runs"), "--sweep", "seed=1", "--run",
                     "--dpft", str(fake), "--no-check"])
    assert rc == 0 and len(counter.read_text().split()) == 2
    assert "stopped early" in capsys.readouterr().err




def test_sweep_run_jobs_at_once_with_a_log_per_job_and_a_failure_stops_new_jobs(tmp_path, capsys):
    """--jobs 2: two jobs run at the same time (each fake job waits until it has seen the other start),
    each job's output goes to its JOB/sweep.log, then evaluate follows its training; a failed job lets the
    running one finish but starts no new one (without --keep-going), and --jobs 0 is a usage error."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fake = tmp_path / "dpft"
    fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == evaluate ]]; then echo evaluated >> "$3/evaluated"; exit 0; fi
wd=$(for a in "$@"; do [[ $prev == --workdir ]] && echo "$a"; prev=$a; done)
name=$(basename "$wd")
if [[ $name == seed-3 ]]; then touch {marks}/failed; exit 3; fi
if [[ $name == seed-4 ]]; then  # ends well after seed-3 failed (the sweep then starts no new job)
  for i in $(seq 1 600); do [[ -e {marks}/failed ]] && break; sleep 0.1; done; sleep 3; exit 0; fi
touch {marks}/"$name"
for i in $(seq 1 600); do [[ $(ls {marks} | wc -l) -ge 2 ]] && break; sleep 0.1; done
echo "training $name, $(ls {marks} | wc -l) started"
exit 0
""")
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    assert sweep.main(["--config", DIGITS, "--workdir", str(runs), "--sweep", "seed=1,2", "--run", "--jobs", "2",
                       "--evaluate", "--dpft", str(fake), "--no-check"]) == 0
    for seed in (1, 2):
        assert (runs / f"seed-{seed}" / "sweep.log").read_text().strip() == f"training seed-{seed}, 2 started"
        assert (runs / f"seed-{seed}" / "evaluated").read_text().split() == ["evaluated"]
    out = capsys.readouterr().out
    assert "[1/2] started (output in" in out and "[2/2] done" in out and "compare with:" in out

    runs = tmp_path / "runs2"
    rc = sweep.main(["--config", DIGITS, "--workdir", str(runs), "--sweep", "seed=3,4,5", "--run", "--jobs", "2",
                     "--dpft", str(fake), "--no-check"])
    assert rc == 3
    assert (runs / "seed-4" / "sweep.log").is_file() and not (runs / "seed-5").exists()  # started, never started
    assert "sweep: job 0 exited with 3" in capsys.readouterr().err
    assert sweep.main(["--config", DIGITS, "--workdir", str(runs), "--sweep", "seed=1", "--run", "--jobs", "0",
                       "--dpft", str(fake), "--no-check"]) == 2
