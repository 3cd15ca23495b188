"""dpft.xla_cpu: the XLA flag that restricts YNNPACK to dot fusions on CPU. What the flag value
becomes for each environment and jaxlib version; that `dpft.cli` sets it before importing JAX, on
CPU only; that XLA:CPU reads it (fewer YNNPACK fusions in the compiled book-keeping step) and that
the book-keeping clipped sum and norms agree with and without it (the same arithmetic, other
kernels)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpft import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = "--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("env, jaxlib, flags, says", [
    ({"XLA_FLAGS": DEVICES}, "0.10.2", f"{DEVICES} {xla_cpu.FLAG}", "YNNPACK for dot fusions only"),
    ({}, "0.11.2", xla_cpu.FLAG, "DPFT_XLA_CPU=default to turn off"),
    ({"XLA_FLAGS": f"{xla_cpu.FLAG_NAME}= {DEVICES}"}, "0.10.2", None, "already sets"),  # the user's own setting
    ({"DPFT_XLA_CPU": "default"}, "0.10.2", None, "XLA's default kernels (DPFT_XLA_CPU=default)"),
    ({"DPFT_XLA_CPU": " Tuned "}, "0.10.2", xla_cpu.FLAG, "YNNPACK"),
    ({}, "0.12.0", None, "jaxlib 0.12.0"),  # not measured there: XLA might not know the flag
    ({}, "0.9.2", None, "only set for jaxlib 0.10, 0.11"),
    ({}, None, None, "jaxlib None"),
])
def test_the_flag_for_each_environment_and_jaxlib(env, jaxlib, flags, says):
    got, line = xla_cpu.cpu_dot_flags(env, jaxlib)
    assert got == flags
    assert line.startswith("XLA:CPU dots: ") and says in line, line


def test_a_bad_setting_is_an_error_naming_it():
    with pytest.raises(ValueError, match="DPFT_XLA_CPU='fast': choose 'tuned'"):
        xla_cpu.cpu_dot_flags({"DPFT_XLA_CPU": "fast"}, "0.10.2")


def test_tune_cpu_dots_writes_the_given_environment():
    env = {"XLA_FLAGS": DEVICES}
    line = xla_cpu.tune_cpu_dots(env)
    import importlib.metadata
    if xla_cpu._major_minor(importlib.metadata.version("jaxlib")) in xla_cpu.MEASURED_JAXLIB:
        assert env["XLA_FLAGS"] == f"{DEVICES} {xla_cpu.FLAG}" and "YNNPACK" in line
    else:
        assert env["XLA_FLAGS"] == DEVICES and "default kernels" in line


CLI_PROBE = r"""
import os, sys
from dpft import cli, xla_cpu
real, seen = xla_cpu.tune_cpu_dots, []
xla_cpu.tune_cpu_dots = lambda: seen.append("jax" in sys.modules) or real()
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("calls", seen, "flags", os.environ.get("XLA_FLAGS", ""))
"""


@pytest.mark.parametrize("platforms,command,calls,pre", [
    ("cpu", "train", "[False]", ""), ("cpu", "demo", "[False]", ""), ("cpu", "accountant", "[]", ""),
    ("cuda", "train", "[]", ""), ("cpu", "train", "[]", "import jax\n")])  # last: JAX already in the process
def test_the_cli_sets_it_before_importing_jax_on_cpu_only(platforms, command, calls, pre):
    env = {k: v for k, v in os.environ.items() if k != xla_cpu.OPT_OUT_ENV}
    env.update(JAX_PLATFORMS=platforms, PYTHONPATH=REPO, XLA_FLAGS=DEVICES)
    p = subprocess.run([sys.executable, "-c", pre + CLI_PROBE, command, "--help"], env=env, capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert f"calls {calls}" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert (xla_cpu.FLAG in p.stdout) == (calls == "[False]"), p.stdout[-2000:]


def test_a_bad_setting_stops_the_cli_with_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, xla_cpu.OPT_OUT_ENV: "fast"}
    p = subprocess.run([sys.executable, "-m", "dpft.cli", "evaluate", "--workdir", str(tmp_path / "run")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("dpft evaluate: error: DPFT_XLA_CPU='fast': choose")
    assert "Traceback" not in p.stderr


PROBE = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
import dpft.models
from dpft.privacy import adapters, bookkeeping, engine
model = dpft.models.create("vit_micro", 10, seed=0, head_init="normal")
loss_fn, params, _ = adapters.nnx_loss_fn(model, adapters.softmax_cross_entropy_loss)
rs = np.random.RandomState(0)
b = 8
batch = {"image": jnp.asarray(rs.randn(b, 1, 32, 32, 3), jnp.float32),
         "label": jnp.asarray(rs.randint(0, 10, (b, 1)), jnp.int32),
         "mask": jnp.ones((b,), jnp.float32), "example_id": jnp.arange(b, dtype=jnp.int32)}
f = jax.jit(lambda p: bookkeeping.bk_clipped_grad_sum(loss_fn, p, batch, jax.random.key(0),
            clipping=engine.ClippingConfig(mode="flat", clip_norm=0.1), microbatch_size=b))
compiled = f.lower(params).compile()
grad_sum, stats = compiled(params)
flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(grad_sum)])
print(json.dumps({"ynn": len(re.findall("ynn", compiled.as_text())), "sum": flat.tolist(),
                  "norms": np.asarray(stats["norms"], np.float64).tolist()}))
"""


def _probe(xla_flags: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags}
    p = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_xla_reads_the_flag_and_book_keeping_agrees_with_and_without_it():
    import importlib.metadata
    if xla_cpu._major_minor(importlib.metadata.version("jaxlib")) not in xla_cpu.MEASURED_JAXLIB:
        pytest.skip("the flag is only set for the measured jaxlib versions")
    default, tuned = _probe(DEVICES), _probe(f"{DEVICES} {xla_cpu.FLAG}")
    assert tuned["ynn"] < default["ynn"], (tuned["ynn"], default["ynn"])  # the flag reached XLA:CPU
    np.testing.assert_allclose(tuned["norms"], default["norms"], rtol=1e-5)
    assert min(default["norms"]) > 0.1  # every example clipped: the sum mixes all of them
    s_t, s_d = np.asarray(tuned["sum"]), np.asarray(default["sum"])
    assert np.linalg.norm(s_t - s_d) <= 1e-5 * np.linalg.norm(s_d), np.abs(s_t - s_d).max()
