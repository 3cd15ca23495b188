"""Every command in README.md runs, with tiny data, so none goes stale.

The commands are the lines of README.md's fenced shell blocks (```sh, ```bash, ```shell or no
language), with continuation lines joined and comments dropped. They run with `bash -c` from a
scratch directory in which `configs` and `launch` link to this checkout and `.venv` to this
Python's environment; the commands of one README section run in order, two sections at a time
(a command may use what an earlier command of its own section made):

- `dpft ...` runs for real (this checkout's code). Placeholder paths (`/data/...`, `/ckpt/...`)
  point at fake data sets in the real on-disk formats (`dpft.data.fake`) and a small Haiku-format
  checkpoint; trainings get TINY overrides (nfnet_nano, small images and batches, 2 updates),
  evaluations a small bootstrap. `dpft evaluate` reads the workdir that the README's `dpft train`
  wrote.
- `python launch/sweep.py ... --run`: `dpft` on PATH runs the sweep's first non-private job (train
  and evaluate) for real and records the others (48 fine-tunings would take 20 minutes; a DP
  training runs above, and the non-private one compiles in a quarter of its time); TINY overrides
  go in as `--set`, so the sweep checks them for every job. A checkpoint path
  `RUN/checkpoints/N/params` must name the last update of the README's run RUN (checked against
  its config), and then names the tiny run's.
- `make TARGET`: `make -n TARGET` in the checkout (the target exists, its recipe expands).
- `pip install REQ`: the named extras exist (dpft's in setup.py, others in the installed
  package's metadata); nothing is installed.
- `sbatch [OPTIONS] SCRIPT ...`: a stub `sbatch` checks each option's name and runs SCRIPT with
  bash (array task 0); `srun`, `scontrol` and `gcloud` are stubs that record their arguments, and
  `dpft` is one too, so that no job trains.
- `launch/tpu_vm.sh ...`: with DPFT_DRY_RUN=1 (prints the gcloud commands), from the checkout.
- Anything else must match NOT_RUN (with the reason); a README command that neither runs here
  nor is listed fails `test_every_readme_command_is_run_or_listed`.

Also checked here, cheaply: the README's length, its relative links and those of docs/*.md, the
flags of the Commands table, the extras it names, and setup.py's long_description.
"""
from __future__ import annotations

import ast
import glob
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from dpft.testing import cpu as cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 250

SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
#: Overrides that make a README training tiny (fake data, CPU, seconds).
TINY_TRAIN = ["--config.train.num_updates=2", "--config.train.eval_every=0", "--config.train.checkpoint_every=2"]
TINY_MEDICAL = ["--config.model.name=nfnet_nano", "--config.model.dtype=float32", "--config.data.image_size=32",
                "--config.data.eval_image_size=32", "--config.data.augmult=1", "--config.train.batch_size=8",
                "--config.train.physical_batch_size=8", "--config.train.microbatch_size=8",
                "--config.eval.batch_size=16"]
TINY_DIGITS = ["--config.model.name=nfnet_nano", "--config.train.batch_size=16",
               "--config.train.physical_batch_size=16", "--config.train.microbatch_size=16"]
TINY_EVALUATE = ["--bootstrap", "20"]
LOG_ENV = "DPFT_README_TEST_LOG"  # where the stubs record their arguments (one file per command)


def tiny_train(config: str) -> list[str]:
    return TINY_TRAIN + (TINY_DIGITS if "digits" in os.path.basename(config) else TINY_MEDICAL)
#: README commands this test does not run, each with the reason (a regex on the command).
NOT_RUN = [
    (r"^DPFT_COORDINATOR_ADDRESS=\S+ DPFT_NUM_PROCESSES=\d+ DPFT_PROCESS_ID=\d+ dpft train ",
     "a multi-host start: one such command on each of several hosts, each waiting for the others. "
     "tests/test_multihost_train.py runs `dpft train` and `dpft evaluate` with these DPFT_* variables "
     "as 2 processes on 127.0.0.1 (two more cold compiles would double this test's time)"),
]
#: sbatch options the README may use (a typo fails here instead of on a cluster).
SBATCH_OPTIONS = {"--account", "--partition", "--qos", "--constraint", "--nodes", "--ntasks", "--ntasks-per-node",
                  "--gpus", "--gpus-per-node", "--gpus-per-task", "--gres", "--cpus-per-task", "--mem", "--time",
                  "--job-name", "--output", "--signal", "--requeue", "--dependency", "--array", "--exclusive"}


# ----------------------------------------------------------------------------- reading the README


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the fence, lines) of every fenced shell block, dedented to the fence."""
    blocks, lines = [], text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```|~~~)\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if lang in SHELL_LANGS:
            blocks.append((i + 1, [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]))
        i = j + 1
    return blocks


def readme_commands(text: str | None = None) -> list[tuple[int, str]]:
    """(line number, command) for every command of the README's fenced shell blocks."""
    text = open(README, encoding="utf-8").read() if text is None else text
    commands = []
    for start, block in shell_blocks(text):
        pending, first = "", None
        for k, raw in enumerate(block):
            line = _strip_comment(raw)
            if not line.strip() and not pending:
                continue
            first = first or start + 1 + k
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            commands.append((first, (pending + line.strip()).strip()))
            pending, first = "", None
        assert not pending, f"README.md:{start}: a command ends with a line continuation"
    return commands


#: A command that only sets a shell variable, e.g. V=$(python -c "...").
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\$\(.*\)|\S+)$")


def program(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, the words after them) of a simple command."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def kind(command: str) -> str:
    """Which handler runs `command` ('' if none does)."""
    if any(re.search(p, command) for p, _ in NOT_RUN):
        return "not-run"
    if ASSIGNMENT.match(command):
        return "assignment"
    env, words = program(command)
    if not words:
        return ""
    first = words[0]
    if first == "dpft":
        return "dpft"
    if first == "make":
        return "make"
    if first == "source" and words[1:] == [".venv/bin/activate"]:
        return "activate"
    if first == "sbatch":
        return "sbatch"
    if first in ("launch/tpu_vm.sh", "launch/local.sh"):
        return "launch"
    if os.path.basename(first) in ("pip", "pip3") and words[1:2] == ["install"]:
        return "pip"
    if os.path.basename(first) in ("python", "python3"):
        if words[1:2] == ["-c"]:
            return "python-c"
        if words[1:2] == ["launch/sweep.py"]:
            return "sweep"
    return ""


# ----------------------------------------------------------------------------- cheap checks


def test_readme_is_short_and_keeps_the_two_quickstart_commands():
    text = open(README, encoding="utf-8").read()
    assert len(text.split("\n")) - 1 <= MAX_README_LINES
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (start, block), *_ = shell_blocks(quick)
    assert [_strip_comment(b) for b in block if b.strip()] == ["make demo", "make test"]


def test_every_readme_command_is_run_or_listed():
    commands = readme_commands()
    assert len(commands) >= 10
    unknown = [f"README.md:{n}: {c}" for n, c in commands if not kind(c)]
    assert not unknown, "README commands this test neither runs nor lists in NOT_RUN:\n" + "\n".join(unknown)
    for pattern, reason in NOT_RUN:  # no stale entry
        assert any(re.search(pattern, c) for _, c in commands), f"NOT_RUN entry matches no README command: {pattern}"
    # A command in an indented block or loose in the text would escape this test.
    text = open(README, encoding="utf-8").read().split("\n")
    inside = {n for start, block in shell_blocks("\n".join(text)) for n in range(start, start + len(block) + 2)}
    loose = [f"README.md:{i + 1}: {ln.strip()}" for i, ln in enumerate(text)
             if i + 1 not in inside and re.match(LOOSE_COMMAND, ln)]
    assert not loose, "commands outside fenced shell blocks:\n" + "\n".join(loose)


LOOSE_COMMAND = re.compile(r"^\s*(\$ )?(dpft (train|evaluate|prepare|accountant|audit|demo)\b|make [a-z]|sbatch |"
                           r"launch/\S+ |python3? \S|\S*pip3? install |\.venv/bin/)")


def _links(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # not inside code
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", ["README.md", "launch/README.md", "benchmarks/README.md",
                                 *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))])
def test_relative_links_point_to_existing_files(doc):
    path = os.path.join(REPO, doc)
    bad = []
    for link in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a URL or an anchor in the same file
        target = os.path.normpath(os.path.join(os.path.dirname(path), link.split("#", 1)[0]))
        if not os.path.exists(target):
            bad.append(link)
    assert not bad, f"{doc}: links to missing files: {bad}"


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup.py run with a fake setup)."""
    import setuptools

    seen = {}
    real, cwd = setuptools.setup, os.getcwd()
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        os.chdir(REPO)
        exec(compile(open("setup.py", encoding="utf-8").read(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    return seen


def test_setup_long_description_is_the_readme():
    kw = _setup_kwargs()
    assert kw["long_description"] == open(README, encoding="utf-8").read()
    assert kw["long_description_content_type"] == "text/markdown"


def _check_requirement(spec: str, variables: dict[str, str]) -> None:
    """A `pip install` argument: its extras exist; a pinned version is the installed one."""
    from packaging.requirements import Requirement

    for key, value in variables.items():
        spec = spec.replace(f"${key}", value).replace(f"${{{key}}}", value)
    if spec.startswith(".["):  # this checkout
        spec = "dpft" + spec[1:]
    req = Requirement(spec)
    if req.name == "dpft":
        extras = set(_setup_kwargs()["extras_require"])
    else:
        dist = importlib.metadata.distribution(req.name)
        extras = set(dist.metadata.get_all("Provides-Extra") or [])
        if req.specifier:
            assert req.specifier.contains(dist.version, prereleases=True), (spec, dist.version)
    assert req.extras <= extras, f"{spec}: no extra {sorted(req.extras - extras)} (has {sorted(extras)})"


def test_extras_named_in_the_readme_exist():
    """`.[extra]` / `dpft[extra]` anywhere in the README, also outside the commands."""
    text = open(README, encoding="utf-8").read()
    named = re.findall(r"(?<![\w\]])(?:\.|dpft)\[([\w,-]+)\]", text)
    assert named, "the README names no extra (the Haiku one used to be there)"
    extras = set(_setup_kwargs()["extras_require"])
    for group in named:
        assert set(group.split(",")) <= extras, group


def test_commands_table_names_real_subcommands_and_flags():
    from dpft import cli

    text = open(README, encoding="utf-8").read()
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `dpft (\w+)([^`]*)` \|", table, flags=re.M)
    assert {name for name, _ in rows} == set(cli.COMMANDS), "the table lists every command once or more"
    import argparse
    import importlib

    for name, rest in rows:
        parser = argparse.ArgumentParser(add_help=False)
        importlib.import_module(cli.COMMANDS[name][0]).add_arguments(parser)
        flags = set(parser._option_string_actions)
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            if flag.startswith("--config."):
                continue
            assert flag in flags, f"dpft {name}: the README's Commands table names {flag}, which it does not take"


# ----------------------------------------------------------------------------- running every command


def _write(path, text: str, mode: int = 0o755) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _recorder(bindir: str, name: str) -> None:
    """An executable `name` that appends its arguments (one JSON list per line) to $LOG_ENV."""
    _write(os.path.join(bindir, name),
           f"#!{sys.executable}\nimport json, os, sys\n"
           f"open(os.environ[{LOG_ENV!r}], 'a').write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')\n")


def _records(log: str) -> list[list[str]]:
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


class Runner:
    """Runs README commands in a scratch directory with fake data and stubs (see the module doc)."""

    def __init__(self, root: str):
        from dpft import models
        from dpft.data import fake
        from dpft.models import checkpoints

        self.root = root
        self.work = os.path.join(root, "work")
        os.makedirs(self.work)
        for name in ("configs", "launch"):
            os.symlink(os.path.join(REPO, name), os.path.join(self.work, name))
        os.symlink(sys.prefix, os.path.join(self.work, ".venv"))
        data = os.path.join(root, "data")
        fake.write_fake_chexpert(os.path.join(data, "chexpert"), n_patients=24, n_valid_patients=6, demo="xlsx")
        fake.write_fake_mimic_cxr(os.path.join(data, "mimic-cxr-jpg", "2.0.0"), n_subjects=24,
                                  iv_root=os.path.join(data, "mimiciv", "2.2"), iv_layout="hosp")
        os.makedirs(os.path.join(root, "ckpt"))
        # DeepMind's F0_haiku.npz format (a Haiku pickle with an ImageNet head), of a tiny NFNet.
        checkpoints.save_model(models.create("nfnet_nano", 1000, seed=3), os.path.join(root, "ckpt", "F0_haiku.npz"))

        self.stubs = os.path.join(root, "stubs")  # first on PATH for every command
        os.makedirs(self.stubs)
        for name in ("srun", "scontrol", "gcloud"):
            _recorder(self.stubs, name)
        _write(os.path.join(self.stubs, "sbatch"), f"""#!{sys.executable}
import os, sys
known = {sorted(SBATCH_OPTIONS)!r}
args = sys.argv[1:]
while args and args[0].startswith("-"):
    opt = args.pop(0)
    name = opt.split("=", 1)[0]
    if name not in known:
        sys.exit(f"sbatch (README test stub): unknown option {{opt}}")
    if "=" not in opt and name not in ("--requeue", "--exclusive"):
        sys.exit(f"sbatch (README test stub): write {{name}}=VALUE")
if not args:
    sys.exit("sbatch (README test stub): no script")
env = dict(os.environ, SLURM_ARRAY_TASK_ID="0")
for opt in sys.argv[1:len(sys.argv) - len(args)]:
    if opt.startswith("--cpus-per-task="):
        env["SLURM_CPUS_PER_TASK"] = opt.split("=", 1)[1]
os.execvpe("bash", ["bash", *args], env)
""")
        self.fake_dpft = os.path.join(root, "fake-dpft")  # `dpft` inside a (stub) SLURM job
        os.makedirs(self.fake_dpft)
        _recorder(self.fake_dpft, "dpft")
        self.sweep_dpft = os.path.join(root, "sweep-dpft")  # `dpft` for `sweep.py --run`
        os.makedirs(self.sweep_dpft)
        bindir = os.path.dirname(sys.executable)
        real = os.path.join(bindir, "dpft")
        if not os.path.exists(real):  # no console script next to this Python: the same entry point
            real = os.path.join(self.stubs, "dpft")
            _write(real, f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dpft.cli "$@"\n')
        _write(os.path.join(self.sweep_dpft, "dpft"), f"""#!{sys.executable}
# README test: run a sweep's first non-private job (train, then evaluate) for real; record the others.
import json, os, sys
args = sys.argv[1:]
open(os.environ[{LOG_ENV!r}], "a").write(json.dumps(["sweep-dpft"] + args) + "\\n")
workdir = args[args.index("--workdir") + 1]
first = os.environ[{LOG_ENV!r}] + ".real"
if args[0] == "train" and "non-private" in os.path.basename(workdir):
    try:  # the first such job claims the marker atomically (sweep.py --jobs N runs jobs at once)
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, workdir.encode())
        os.close(fd)
    except FileExistsError:
        pass
if os.path.exists(first) and open(first).read() == workdir:
    os.execv({real!r}, [{real!r}, *args])
if args[0] == "train" and os.path.isdir(workdir) and set(os.listdir(workdir)) <= {{"sweep.log"}}:
    for name in os.listdir(workdir):  # sweep.py made it (and, with --jobs, the job's log): a job that
        os.unlink(os.path.join(workdir, name))  # did not run leaves nothing behind
    os.rmdir(workdir)
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DPFT_", "SLURM_", "SRUN_", "TPU_"))}
        env.update(PATH=os.pathsep.join([self.stubs, bindir, env.get("PATH", "")]), PYTHONPATH=REPO,
                   JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_env.xla_flags(1), PYTHONUNBUFFERED="1")
        self.env = env
        self.variables: dict[str, str] = {}  # shell variables set by earlier README commands (V=...)
        self.workdirs: dict[str, str] = {}  # workdir -> config of the README's trainings
        self.timings: list[tuple[float, str]] = []
        self.logs = 0

    def placeholders(self, command: str) -> str:
        """/data/... and /ckpt/... (README placeholders) -> the fake data and checkpoint."""
        return re.sub(r"(?<=[\s=])/(data|ckpt)/", lambda m: f"{self.root}/{m.group(1)}/", command)

    def bash(self, command: str, *, cwd: str | None = None, path_first: str | None = None,
             extra_env: dict | None = None, timeout: int = 900) -> tuple[str, list[list[str]]]:
        """(stdout + stderr, the stubs' calls) of `command`, which must exit 0."""
        self.logs += 1
        log = os.path.join(self.root, f"calls-{self.logs}.jsonl")
        env = dict(self.env, **(extra_env or {}), **{LOG_ENV: log})
        if path_first:
            env["PATH"] = path_first + os.pathsep + env["PATH"]
        prefix = "".join(f"{k}={shlex.quote(v)}; " for k, v in self.variables.items())
        start = time.monotonic()
        r = subprocess.run(["bash", "-c", prefix + command], cwd=cwd or self.work, env=env, capture_output=True,
                           text=True, timeout=timeout)
        self.timings.append((time.monotonic() - start, command[:90]))
        assert r.returncode == 0, f"exit {r.returncode}: {command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr, _records(log)

    # -------------------------------------------------------------------------- handlers

    def run(self, command: str) -> None:
        getattr(self, "do_" + kind(command).replace("-", "_"))(command)

    def do_not_run(self, command: str) -> None:
        pass

    def do_assignment(self, command: str) -> None:
        key = ASSIGNMENT.match(command).group(1)
        out, _ = self.bash(f'{command}; echo "{key}=${key}"')
        value = out.strip().splitlines()[-1].partition("=")[2]
        assert value, f"{command}: ${key} is empty"
        self.variables[key] = value

    def do_activate(self, command: str) -> None:
        if sys.prefix != sys.base_prefix:  # a virtual environment, like the one `make` builds
            assert "python" in self.bash(command + " && command -v python")[0]

    def do_make(self, command: str) -> None:
        _, words = program(command)
        (target,) = words[1:]
        assert re.search(rf"^{re.escape(target)}:", open(os.path.join(REPO, "Makefile")).read(), flags=re.M), target
        out, _ = self.bash(f"make -n {shlex.quote(target)}", cwd=REPO)
        assert {"demo": "dpft demo", "test": "pytest"}.get(target, "") in out, out

    def do_pip(self, command: str) -> None:
        _, words = program(command)
        for spec in words[2:]:
            assert not spec.startswith("-"), f"{command}: this test knows no pip flags"
            _check_requirement(spec, self.variables)

    def do_python_c(self, command: str) -> None:
        out, _ = self.bash(command)
        if "default_backend" in command:
            assert out.split()[0] in ("cpu", "gpu", "tpu"), out

    def do_dpft(self, command: str) -> None:
        _, words = program(command)
        command = self.placeholders(command)
        sub = words[1]
        extra: list[str] = []
        if sub == "train":
            config = words[words.index("--config") + 1].split(":", 1)[0]
            extra = tiny_train(config)
            self.workdirs[words[words.index("--workdir") + 1]] = config
        elif sub == "evaluate" and "--workdir" in words:
            workdir = words[words.index("--workdir") + 1]
            assert workdir in self.workdirs, f"{command}: evaluates a workdir no README command trained"
            extra = TINY_EVALUATE
        elif sub == "prepare":
            extra = ["--no-progress"]
        elif sub == "audit":
            # A correct run fails an audit test with probability <= 1 - confidence (docs/privacy.md; the
            # Gaussian test's level is nearly exact): a fixed public secret keeps this test reproducible.
            extra = ["--insecure-fixed-noise-seed", "0"]
        out, _ = self.bash(" ".join([command, *extra]))
        if sub == "train":
            workdir = os.path.join(self.work, words[words.index("--workdir") + 1])
            assert os.path.isfile(os.path.join(workdir, "ledger.json")), out[-2000:]
        if sub == "evaluate" and "--workdir" in words:
            assert glob.glob(os.path.join(self.work, words[words.index("--workdir") + 1], "eval", "*", "report.md"))
        if sub == "evaluate" and "--compare" in words:
            assert os.path.isfile(os.path.join(self.work, words[words.index("--out") + 1], "compare.md")), out[-2000:]
        if sub == "accountant":
            assert re.search(r"(epsilon|noise_multiplier|sigma)\s*=", out), out

    def _checkpoint_paths(self, command: str) -> str:
        """RUN/checkpoints/N/params of a README run: N must be that run's last update (its config),
        and becomes the tiny run's (TINY_TRAIN's 2)."""
        from dpft.config.base import load_config

        def swap(m):
            run, step = m.group(1), int(m.group(2))
            assert run in self.workdirs, f"{m.group(0)}: no README command trained {run}"
            cfg = load_config(os.path.join(self.work, self.workdirs[run]))
            assert cfg.train.num_updates == step, (m.group(0), cfg.train.num_updates)
            return f"{run}/checkpoints/2/params"

        return re.sub(r"(?<=[=\s])([^\s=]+)/checkpoints/(\d+)/params", swap, command)

    def do_sweep(self, command: str) -> None:
        _, words = program(command)
        command = self._checkpoint_paths(self.placeholders(command))
        if "--run" in words:
            config = words[words.index("--config") + 1]
            extra = " ".join(f"--set {o[len('--config.'):]}" for o in tiny_train(config))
            out, calls = self.bash(f"{command} {extra}", path_first=self.sweep_dpft)
            trains = [c[c.index("--workdir") + 1] for c in calls if c[1] == "train"]
            assert len(trains) >= 2 and len(set(trains)) == len(trains), out[-2000:]
            real = [w for w in trains if os.path.isfile(os.path.join(self.work, w, "ledger.json"))]
            assert len(real) == 1 and "non-private" in real[0], (real, out[-2000:])
            evaluated = [c[c.index("--workdir") + 1] for c in calls if c[1] == "evaluate"]
            # with --jobs N, jobs (train, then evaluate) interleave: every trained job is evaluated once
            assert sorted(evaluated) == sorted(trains) if "--evaluate" in words else not evaluated, evaluated
            for workdir in trains:
                self.workdirs[workdir] = config
        else:
            out, _ = self.bash(command)
            if "--slurm" in words:
                assert os.path.isfile(os.path.join(self.work, words[words.index("--slurm") + 1])), out

    def do_sbatch(self, command: str) -> None:
        out, calls = self.bash(self.placeholders(command), path_first=self.fake_dpft)
        sruns = [c for c in calls if c[0] == "srun"]
        assert sruns and "train" in sruns[0], (out, calls)
        argv = sruns[0][sruns[0].index("train") - 1:]
        assert os.path.basename(argv[0]) == "dpft" and "--config" in argv and "--workdir" in argv, argv

    def do_launch(self, command: str) -> None:
        out, calls = self.bash(self.placeholders(command), cwd=REPO, extra_env={"DPFT_DRY_RUN": "1"})
        assert not calls, f"{command}: ran {calls}, not a dry run"
        _, words = program(command)
        if words[0] == "launch/tpu_vm.sh":
            lines = [shlex.split(ln) for ln in out.splitlines() if ln.startswith("gcloud ")]
            assert lines and all(ln[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for ln in lines), out
            if words[1] not in ("install", "logs"):
                assert "DPFT_CLUSTER=tpu" in lines[-1][lines[-1].index("--command") + 1], out


def blocks_with_dependencies() -> list[tuple[list[tuple[int, str]], set[int]]]:
    """[(commands of one fenced block, indices of the earlier blocks it needs)]. A block needs an
    earlier one that trains (`dpft train`, `sweep.py`) a workdir whose path it names."""
    text = open(README, encoding="utf-8").read()
    result, made = [], []
    for start, block in shell_blocks(text):
        commands = readme_commands("```sh\n" + "\n".join(block) + "\n```\n")
        commands = [(start + line - 1, c) for line, c in commands]
        words = {w.split("=", 1)[-1] for _, c in commands for w in shlex.split(c)}
        needs = {i for i, workdirs in enumerate(made)
                 if any(w == d or w.startswith(d.rstrip("/") + "/") for w in words for d in workdirs)}
        produced = set()
        for _, c in commands:
            env, argv = program(c) if kind(c) in ("dpft", "sweep") else ({}, [])
            if ("train" in argv[:2] or "launch/sweep.py" in argv[:2]) and "--workdir" in argv:
                produced.add(argv[argv.index("--workdir") + 1])
        result.append((commands, needs))
        made.append(produced)
    return result


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    """Each fenced block's commands in order; two blocks at a time, trainings first, a block after
    the blocks it needs."""
    import threading

    start = time.monotonic()
    runner = Runner(str(tmp_path))
    blocks = blocks_with_dependencies()
    assert sum(len(c) for c, _ in blocks) == len(readme_commands())
    weight = [sum(" train " in c or "--run" in c for _, c in commands) for commands, _ in blocks]
    order = sorted(range(len(blocks)), key=lambda i: -weight[i])  # stable: README order among equals
    done, started, failures, ran = set(), set(), [], []
    cond = threading.Condition()

    def worker():
        while True:
            with cond:
                while True:
                    if failures or len(started) == len(blocks):
                        return
                    ready = [i for i in order if i not in started and blocks[i][1] <= done]
                    if ready:
                        i = ready[0]
                        started.add(i)
                        break
                    cond.wait()
            try:
                for line, command in blocks[i][0]:
                    try:
                        runner.run(command)
                    except AssertionError as e:
                        raise AssertionError(f"README.md:{line}: {command}\n{e}") from None
                    ran.append(kind(command))
            except BaseException as e:  # noqa: BLE001 - reported below
                with cond:
                    failures.append(e)
                    cond.notify_all()
                return
            with cond:
                done.add(i)
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    assert len(ran) == len(readme_commands())
    assert {"dpft", "make", "sbatch", "launch", "sweep", "pip"} <= set(ran), ran
    slowest = sorted(runner.timings, reverse=True)[:5]
    print(f"README commands: {len(ran)} in {time.monotonic() - start:.0f} s; slowest: "
          + "; ".join(f"{t:.0f} s {c}" for t, c in slowest))
