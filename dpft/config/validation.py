"""Check a run config before anything is compiled or loaded.

`validate(config, num_examples=..., num_devices=...)` collects every problem and raises one
`dpft.errors.ConfigError` whose message names each offending field and its value, e.g.
"config.train.physical_batch_size=100 is not a multiple of config.train.microbatch_size=16".
Every number must be finite (NaN and inf are refused wherever they appear, loader options included:
`nan < 0` is false, so range checks alone would let NaN through); each field is checked against its
schema record (`dpft.config.schema.FIELDS`: kind, range, choices); then `RULES`, one small function
per rule between fields or about the run (paths, devices, N). Warnings (allowed but weakening) are
issued with `warnings.warn` and also returned.
Also here: `same_value` (config comparison for resuming, NaN-safe) and the guards that stop a
run whose loss, gradient or parameters became non-finite (`check_finite_update`,
`check_finite_trees`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, Mapping

import ml_collections

from dpft import paths
from dpft.config.fields import Range, is_int, is_number
from dpft.config.schema import FIELDS, MISSING, lookup
from dpft.errors import ConfigError, NonFiniteError, UsageError


@dataclasses.dataclass
class Checked:
    """What the rules read and write: the fields that passed their own checks (`value`), the facts
    of the run, and the errors and notes found so far."""

    valid: dict[str, Any]
    num_examples: int | None
    num_devices: int
    check_paths: bool
    errors: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def value(self, path: str) -> Any:
        """The value of field `path` if it passed its own check, else MISSING."""
        return self.valid[path] if path in self.valid else MISSING

    def add(self, path: str, value: Any, problem: str) -> None:
        self.errors.append(f"config.{path}={value!r} {problem}")

    @property
    def private(self) -> bool:
        return self.value("privacy.enabled") is True


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_examples: int | None = None,
    num_devices: int = 1,
    check_paths: bool = True,
) -> list[str]:
    """Raise ConfigError (a UsageError) listing every invalid field/combination of `config`.

    Args:
      config: the run config (fields: dpft/config/schema.py, docs/config.md).
      num_examples: N, the training-set size, when known (checks batch_size <= N).
      num_devices: local devices of this host that share the physical batch.
      check_paths: also require that model.checkpoint (if set) and data.root (all data sets
        that needs one) exist; False checks a config file on a machine without the data.
    Returns:
      the warnings issued (strings); empty when there are none.
    """
    if not is_int(num_devices) or num_devices < 1:
        raise UsageError(f"number of devices {num_devices!r} must be a positive integer")
    c = Checked({}, num_examples, num_devices, check_paths)
    for path, v in _numbers(config):
        if not math.isfinite(v):
            c.add(path, v, "must be a finite number")
    for path, field in FIELDS.items():
        value = lookup(config, path)
        if value is MISSING:
            c.errors.append(f"config.{path} is missing")
        elif isinstance(value, float) and not math.isfinite(value):
            continue  # reported above
        elif field.only_if is None or lookup(config, field.only_if) is True:
            problem = field.problem(value)
            if problem:
                c.add(path, value, problem)
            else:
                c.valid[path] = value
    for rule in RULES:
        rule(c)
    if c.errors:
        raise ConfigError("invalid config: " + "; ".join(c.errors))
    for note in c.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return c.notes


# --------------------------------------------------------------------------- rules between fields


def _checkpoint_exists(c: Checked) -> None:
    ckpt = c.value("model.checkpoint")
    if c.check_paths and ckpt not in (MISSING, "") and not paths.exists(ckpt):
        c.add("model.checkpoint", ckpt, "does not exist")


def _data_root_exists(c: Checked) -> None:
    from dpft.data import dataset

    name, root = c.value("data.name"), c.value("data.root")
    if not c.check_paths or MISSING in (name, root) or not dataset(name).needs_root:
        return
    if not root:
        c.add("data.root", root, f"must name the {name} data directory")
    elif not paths.isdir(root):
        c.add("data.root", root, "is not a directory")


def _imbalance_names_its_subgroup(c: Checked) -> None:
    fraction = c.value("data.imbalance.fraction")
    for key in ("attribute", "group"):
        v = c.value(f"data.imbalance.{key}")
        if fraction is not MISSING and fraction > 0 and v == "":
            c.add(f"data.imbalance.{key}", v, f"must be set when data.imbalance.fraction={fraction}")


def _noise_multiplier_in_accountant_range(c: Checked) -> None:
    from dpft.privacy.accounting import SIGMA_RANGE

    sigma, allowed = c.value("privacy.noise_multiplier"), Range(*SIGMA_RANGE)
    if c.private and is_number(sigma) and sigma > 0 and not allowed.contains(sigma):
        c.add("privacy.noise_multiplier", sigma, f"must be 0 (calibrate from privacy.epsilon) or {allowed.text()} "
              "(below: no meaningful privacy; above: the noise overflows)")


def _epsilon_when_calibrating(c: Checked) -> None:
    sigma, eps = c.value("privacy.noise_multiplier"), c.value("privacy.epsilon")
    if c.private and (sigma is None or sigma == 0) and eps is not MISSING and not (eps is not None and eps > 0):
        c.add("privacy.epsilon", eps, "must be > 0 when privacy.enabled and privacy.noise_multiplier is unset (0)")


def _clipping_hyper_parameters(c: Checked) -> None:
    """A run-config hyper-parameter `config.privacy.<name>` (`HYPER_PARAMS`) that the clipping mode reads
    must be in its range; one it does not read and that differs from its default gets a warning."""
    from dpft.privacy import clipping

    mode = c.value("privacy.clipping")
    if not c.private or mode is MISSING:
        return
    record = clipping.get(mode)
    for name, param in clipping.HYPER_PARAMS.items():
        path, value = f"privacy.{name}", c.value(f"privacy.{name}")
        if not param.run_config or value is MISSING:
            continue
        if name in record.hyper and param.check(value):
            c.add(path, value, f"{param.check(value)} (read by config.privacy.clipping={mode!r})")
        elif name not in record.hyper and value != param.default:
            c.notes.append(f"config.{path}={value!r} has no effect: config.privacy.clipping={mode!r} does not read "
                           f"it (read by {', '.join(clipping.readers(name))})")


def _engine_runs_the_clipping(c: Checked) -> None:
    from dpft.privacy import clipping

    mode, method = c.value("privacy.clipping"), c.value("train.grad_method")
    if c.private and mode is not MISSING and method in clipping.ENGINES and not clipping.get(mode).supports(method):
        use = " or ".join(repr(m) for m in ("auto",) + clipping.get(mode).engines)
        c.add("train.grad_method", method, f"does not support config.privacy.clipping={mode!r} (use {use})")


def _trainable_is_a_form(c: Checked) -> None:
    """`train.trainable` is one of its forms (`dpft.models.trainable.parse`: a regex must compile); LoRA
    factors are no parameters of a tapped layer, so "lora:<r>" refuses grad_method="bookkeeping"."""
    from dpft.errors import UsageError
    from dpft.models import trainable

    value, method = c.value("train.trainable"), c.value("train.grad_method")
    if value is MISSING:
        return
    try:
        form, _ = trainable.parse(value)
    except UsageError as e:
        c.add("train.trainable", value, str(e).split(": ", 1)[-1])
        return
    if form == "lora" and method == "bookkeeping" and c.private:
        c.add("train.grad_method", method, f"cannot train config.train.trainable={value!r} (LoRA factors are not "
              "parameters of a tapped layer); use 'vmap' or 'auto'")


def _delta_is_weak(c: Checked) -> None:
    n, delta = c.num_examples, c.value("privacy.delta")
    if c.private and is_int(n) and n > 0 and delta is not MISSING:
        effective = delta if delta > 0 else 1.0 / n
        if effective >= 1.0 / n:
            c.notes.append(
                f"config.privacy.delta={delta!r} means delta={effective:.3g} >= 1/N = {1.0 / n:.3g}: "
                "a weak guarantee (a mechanism that publishes one random example in full is (0, 1/N)-DP); "
                "set privacy.delta well below 1/N, e.g. 1/(10 N), for a meaningful claim")


def _fixed_noise_is_loud(c: Checked) -> None:
    fixed = c.value("privacy.insecure_fixed_noise_seed")
    if c.private and fixed is not MISSING and fixed >= 0:
        c.notes.append(
            f"config.privacy.insecure_fixed_noise_seed={fixed}: the noise and the batch selection are a public "
            "function of this number; the run has NO differential-privacy guarantee (tests/debugging only)")


def _batches_split_evenly(c: Checked) -> None:
    phys, micro, ndev = c.value("train.physical_batch_size"), c.value("train.microbatch_size"), c.num_devices
    if phys is not MISSING and micro is not MISSING and phys % micro:
        c.add("train.physical_batch_size", phys, f"is not a multiple of config.train.microbatch_size={micro}")
    if phys is not MISSING and phys % ndev:
        c.add("train.physical_batch_size", phys, f"is not divisible by the {ndev} local devices")
    elif phys is not MISSING and micro is not MISSING and not phys % micro and (phys // ndev) % micro:
        c.add("train.physical_batch_size", phys,
              f"gives {phys // ndev} examples per device, not a multiple of config.train.microbatch_size={micro}")


def _batch_fits_the_data(c: Checked) -> None:
    n, batch = c.num_examples, c.value("train.batch_size")
    if n is None:
        return
    if not is_int(n) or n < 1:
        c.errors.append(f"the training set has {n!r} examples; need at least 1")
    elif batch is not MISSING and batch > n:
        c.add("train.batch_size", batch, f"is larger than the training set (N={n})")


def _cap_needs_patient_unit(c: Checked) -> None:
    cap, unit = c.value("privacy.unit_cap"), c.value("privacy.unit")
    if cap not in (MISSING, 0) and unit == "example":
        c.add("privacy.unit_cap", cap, "caps the images of a patient: it needs config.privacy.unit='patient' "
              "(an example-level run has one image per unit)")


def _warmup_before_the_end(c: Checked) -> None:
    warm, updates = c.value("train.lr_schedule.warmup_steps"), c.value("train.num_updates")
    if c.value("train.lr_schedule.name") == "warmup_cosine" and MISSING not in (warm, updates) and warm >= updates:
        c.add("train.lr_schedule.warmup_steps", warm, f"must be < config.train.num_updates={updates}")


def _evaluated_average_is_kept(c: Checked) -> None:
    params = c.value("eval.params")
    if params == "ema" and c.value("train.ema_decay") == 0.0:
        c.add("eval.params", params, "needs an average: config.train.ema_decay=0 turns EMA off")
    if params == "polyak" and c.value("train.polyak") is False:
        c.add("eval.params", params, "needs the Polyak average: set config.train.polyak=True")


def _bandmf_is_covered(c: Checked) -> None:
    """privacy.mechanism=bandmf: bands within the run and the data, what the BandMF accountant covers (no
    individual accounting), a readable strategy file; bands or a strategy without bandmf have no effect."""
    mech, bands, strategy = (c.value(f"privacy.{k}") for k in ("mechanism", "bandmf.bands", "bandmf.strategy"))
    if not c.private or mech is MISSING:
        return
    if mech != "bandmf":
        for path, value, default in (("privacy.bandmf.bands", bands, 1), ("privacy.bandmf.strategy", strategy,
                                                                         "optimized")):
            if value not in (MISSING, default):
                c.add(path, value, f"needs config.privacy.mechanism='bandmf' (it is {mech!r})")
        return
    updates, batch, n = c.value("train.num_updates"), c.value("train.batch_size"), c.num_examples
    if bands is not MISSING and updates is not MISSING and bands > updates:
        c.add("privacy.bandmf.bands", bands, f"exceeds config.train.num_updates={updates}")
    if bands is not MISSING and batch is not MISSING and is_int(n) and n > 0 and bands * batch > n:
        c.add("privacy.bandmf.bands", bands, f"times config.train.batch_size={batch} exceeds N={n}: each of the "
              f"{bands} groups of about N/{bands} is sampled at rate bands*batch_size/N <= 1")
    if c.value("individual.enabled") is True:
        c.add("individual.enabled", True, "is not covered with config.privacy.mechanism='bandmf' (individual "
              "accounting is DP-SGD's)")
    if strategy not in (MISSING, "optimized"):
        if not str(strategy).endswith(".npy"):
            c.add("privacy.bandmf.strategy", strategy, "must be 'optimized' or a .npy file of the b coefficients")
        elif c.check_paths and not paths.isfile(strategy):
            c.add("privacy.bandmf.strategy", strategy, "does not exist")


#: The rules between fields (and about the run: paths, devices, N), in the order they report.
RULES: tuple[Callable[[Checked], None], ...] = (
    _checkpoint_exists, _data_root_exists, _imbalance_names_its_subgroup, _noise_multiplier_in_accountant_range,
    _epsilon_when_calibrating, _clipping_hyper_parameters, _delta_is_weak, _fixed_noise_is_loud,
    _engine_runs_the_clipping, _trainable_is_a_form, _batches_split_evenly, _batch_fits_the_data,
    _cap_needs_patient_unit, _warmup_before_the_end,
    _evaluated_average_is_kept, _bandmf_is_covered,
)


def _numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted path, value) of every float in a config (lists/tuples included)."""
    if isinstance(node, (ml_collections.ConfigDict, Mapping)):
        for k in node.keys():
            yield from _numbers(node[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(node, float):
        yield prefix, node


def same_value(a: Any, b: Any) -> bool:
    """Equality for config values where NaN equals NaN (lists/tuples compared element-wise)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def check_finite_update(info: Mapping[str, float], update: int, last_checkpoint: int | None) -> None:
    """Raise NonFiniteError when an update's loss or gradient norm is NaN/inf (before any save)."""
    bad = {k: info[k] for k in ("loss_sum", "grad_norm") if k in info and not math.isfinite(float(info[k]))}
    if bad:
        where = f"checkpoint {last_checkpoint}" if last_checkpoint is not None else "no checkpoint yet"
        raise NonFiniteError(
            f"update {update}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped without "
            f"saving (last saved: {where}); lower config.train.optimizer.learning_rate in a new --workdir "
            f"(a changed config cannot resume this one), or check the data")


def check_finite_trees(trees: Mapping[str, Any], update: int) -> None:
    """Raise NonFiniteError when any float array of `trees` holds NaN/inf (checked before a save)."""
    import jax
    import jax.numpy as jnp

    bad = []
    for name, tree in trees.items():
        leaves = [x for x in jax.tree.leaves(tree)
                  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
        if leaves and not bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))):
            bad.append(name)
    if bad:
        raise NonFiniteError(f"update {update}: non-finite values in {', '.join(bad)}; refusing to save a "
                             f"checkpoint of them (lower config.train.optimizer.learning_rate, in a new --workdir)")
