"""The workdir contract: the names `dpft train` writes and `dpft evaluate` reads (docs/interfaces.md).

One place for what both sides would otherwise spell: the files of a workdir, the items of a
checkpoint, which parameters are evaluated, and the epsilon a run's ledger states. Training
writes through these names and evaluation reads through them; neither spells them itself.
The predictions format is `dpft.workdir.predictions`, the checkpoint format
`dpft.workdir.checkpointing`.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Mapping

import ml_collections

from dpft import atomic_io, paths, remote_files
from dpft.config.base import config_from_json, config_to_json
from dpft.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # imported where used: the names and paths above load without jax or dp-accounting
    from dpft.privacy.accounting import Ledger
    from dpft.workdir.checkpointing import Restored

# ---------------------------------------------------------------- files of a workdir
CONFIG_FILE = "config.json"  # the resolved config
LEDGER_FILE = "ledger.json"  # accountant events that ran (also inside each checkpoint)
PLAN_FILE = "privacy_plan.json"  # the plan's public dict (PrivacyPlan.to_dict: no secret)
COVERAGE_FILE = "attribute_coverage.json"  # fairness attributes per split (dpft.data.coverage)
EXPORT_FILE = "EXPORT.json"  # marks a release made by `dpft export` (no secret, no optimizer state)
PREDICTIONS_DIR = "predictions"  # predictions/<step>/[<params>/]<split>.npz (+ .json)
EVAL_DIR = "eval"  # eval/<step>/[<params>/]metrics.json, report.md, *.png
VALIDATION = "validation"  # the split where decision thresholds are chosen

# ---------------------------------------------------------------- items of a checkpoint
PARAMS, OPT_STATE, UPDATE, EMA, POLYAK = "params", "opt_state", "update", "ema", "polyak"  # pytrees
#: BandMF's noise state (the last b-1 correlated noise vectors, `dpft.train.step.NOISE_STATE`): derived from the
#: secret noise, so private like it: never in EVAL_ITEMS or an export.
NOISE_STATE = "noise_state"
DATA_STATE, LEDGER, CONFIG, PLAN, SECRET, INDIVIDUAL = (  # JSON documents
    "data_state", "ledger", "config", "plan", "secret", "individual")
#: train.trainable="lora:<r>" only: the LoRA factors and the pre-trained kernels they adapt
#: (`dpft.nn.lora`), for resuming; "params" holds the merged model, so evaluation never reads it.
LORA = "lora"
#: The items evaluation reads (copied from a remote workdir): never opt_state or the run's secret.
EVAL_ITEMS = (PARAMS, EMA, POLYAK, UPDATE, CONFIG, PLAN, LEDGER)
#: Which parameters made predictions (predictions' `params`) -> the checkpoint item holding them.
PARAMS_ITEMS = {"ema": EMA, "raw": PARAMS, "polyak": POLYAK}


# ---------------------------------------------------------------- paths
def workdir_file(workdir: str, name: str) -> str:
    """`WORKDIR/<name>` (a URL for a remote workdir)."""
    return paths.join(workdir, name)


def predictions_dir(workdir: str, step: int | None = None) -> str:
    """`WORKDIR/predictions`, or `WORKDIR/predictions/<step>`."""
    root = paths.join(workdir, PREDICTIONS_DIR)
    return root if step is None else paths.join(root, str(step))


def predictions_path(workdir: str, step: int, split: str, params: str | None = None) -> str:
    """`WORKDIR/predictions/<step>/<split>.npz`: the predictions of the run's own parameter choice (its
    `eval.params`, what training writes); `params` another choice ("ema", "raw", "polyak"): its own
    `WORKDIR/predictions/<step>/<params>/<split>.npz`, so one choice never overwrites another's."""
    where = predictions_dir(workdir, step)
    return paths.join(where if params is None else paths.join(where, params), f"{split}.npz")


def own_params(config: ml_collections.ConfigDict, which: str) -> str | None:
    """None where `which` is the run's own parameter choice (`eval_params(config)`), else `which`: the
    `params` of `predictions_path` and `eval_dir`."""
    return None if which == eval_params(config)[1] else which


def eval_dir(workdir: str, step: int, params: str | None = None) -> str:
    """`WORKDIR/eval/<step>`: the report of the predictions of update `step` (`params`: of another
    parameter choice than the run's own, `WORKDIR/eval/<step>/<params>`, as `predictions_path`)."""
    where = paths.join(workdir, EVAL_DIR, str(step))
    return where if params is None else paths.join(where, params)


def prediction_splits(config: ml_collections.ConfigDict) -> list[str]:
    """The splits predictions are written for: `eval.splits` plus validation (where thresholds are chosen)."""
    return list(dict.fromkeys(list(config.eval.splits) + [VALIDATION]))


# ---------------------------------------------------------------- which parameters
def averages_kept(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parameter averages a run keeps besides its raw params: "ema" (train.ema_decay > 0), "polyak"."""
    kept = ("ema",) if float(config.train.ema_decay) > 0 else ()
    return kept + (("polyak",) if bool(config.train.polyak) else ())


def eval_params(config: ml_collections.ConfigDict, requested: str | None = None) -> tuple[str, str]:
    """(checkpoint item, params name) of the parameters to evaluate: `requested` (`--params`), else the
    run's `eval.params`; an average the run did not keep falls back to the raw params ("params", "raw")."""
    which = requested or str(config.eval.params)
    if which in averages_kept(config):
        return PARAMS_ITEMS[which], which
    return PARAMS, "raw"


# ---------------------------------------------------------------- epsilon from a ledger
def epsilon_spent(ledger: Ledger, plan: Mapping[str, Any]) -> float:
    """Epsilon of the updates in `ledger` at the run's delta and accountant (`plan`: the plan's public
    dict, as in privacy_plan.json and the checkpoint's plan item): inf for a non-private run, 0 before
    the first update."""
    if not plan.get("enabled"):
        return math.inf
    if ledger.total_steps == 0:
        return 0.0
    return ledger.epsilon(float(plan["delta"]), str(plan.get("accountant", "pld")))


def predictions_privacy(ledger: Ledger, plan: Mapping[str, Any]) -> tuple[float | None, float | None, bool | None]:
    """(epsilon, delta, guarantee_valid) that predictions metadata states; (None, None, None) for a
    non-private run. guarantee_valid False: epsilon is nominal (the noise was public, see the plan)."""
    if not plan.get("enabled"):
        return None, None, None
    return epsilon_spent(ledger, plan), float(plan["delta"]), plan.get("guarantee_valid") is not False


# ---------------------------------------------------------------- epsilon without a guarantee
#: What every output that shows a run's epsilon adds where its plan's `guarantee_valid` is false: the
#: noise was public (an insecure fixed noise seed, or updates before a resume from a checkpoint without
#: a secret), so the epsilon is nominal. One spelling for the progress, start and resume lines, the
#: comparison's cells, axes and runs (`mark_epsilon`) and TensorBoard's tag (`EPSILON_TAG_NO_GUARANTEE`).
NO_GUARANTEE = "NO GUARANTEE: public noise"
#: TensorBoard tag of epsilon in a run without a guarantee (tags allow [-/\w.] only); "epsilon" otherwise.
EPSILON_TAG_NO_GUARANTEE = "epsilon/" + NO_GUARANTEE.replace(": ", "_").replace(" ", "_")


def mark_epsilon(text: str, guarantee_valid: bool | None) -> str:
    """`text` (an epsilon as shown, e.g. "eps 2.00") followed by " (NO GUARANTEE: public noise)" where
    `guarantee_valid` is False; unchanged where it is True or None (non-private, or not recorded)."""
    return f"{text} ({NO_GUARANTEE})" if guarantee_valid is False else text


# ---------------------------------------------------------------- a checkpoint's privacy record, checked
#: The plan fields that decide epsilon: a checkpoint's recorded plan must agree with its config on each.
EPSILON_FIELDS = ("enabled", "unit", "num_examples", "sampling_rate", "noise_multiplier", "delta", "accountant",
                  "num_updates", "mechanism", "bands")
#: Values of EPSILON_FIELDS that plans recorded before the field existed mean (every run was per example, DP-SGD).
RECORDED_DEFAULTS = {"unit": "example", "mechanism": "dpsgd", "bands": 1}


def verified_plan(config: ml_collections.ConfigDict, *, num_examples: int, params: Any,
                  recorded_plan: Mapping[str, Any], ledger: Ledger, updates: int, where: str) -> dict[str, Any]:
    """The public plan dict to state epsilon with, once a checkpoint's `recorded_plan` and `ledger` are
    checked against the plan its `config` gives for `num_examples` training examples
    (`dpft.config.run_plan.privacy_plan`, as `dpft train` computed it): every field in EPSILON_FIELDS
    agrees, and the ledger composes exactly `updates` (the checkpoint's checksummed update counter)
    events of that (q, sigma) (`dpft.workdir.ledger_check`). Otherwise CheckpointError (exit 3)
    naming the field: an edited ledger or plan never yields a different epsilon."""
    from dpft.config import run_plan
    from dpft.privacy import keys
    from dpft.workdir import ledger_check

    try:  # any secret: q, sigma and delta do not depend on it
        expected = run_plan.privacy_plan(config, num_examples, params, keys.RunSecret.insecure_fixed(0)).to_dict()
    except UsageError as e:
        raise CheckpointError(f"{where}: its config gives no valid privacy plan ({e}); refusing to report an "
                              f"epsilon") from None
    for field in EPSILON_FIELDS:
        got, want = recorded_plan.get(field, RECORDED_DEFAULTS.get(field)), expected[field]
        same = (got == want if isinstance(want, (bool, str)) or want is None
                else isinstance(got, (int, float)) and not isinstance(got, bool)
                and math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=0.0))
        if not same:
            raise CheckpointError(f"{where}: the recorded privacy plan has {field}={got!r} but the run's config "
                                  f"and data give {want!r}: the plan or ledger was edited, or the data changed; "
                                  f"refusing to report an epsilon")
    ledger_check.check_ledger(ledger, updates=updates, sampling_rate=expected["sampling_rate"],
                              bands=expected["bands"] if expected["mechanism"] == "bandmf" else None,
                              noise_multiplier=expected["noise_multiplier"], private=bool(expected["enabled"]),
                              where=where, action="report an epsilon")
    return {**dict(recorded_plan), **{f: expected[f] for f in EPSILON_FIELDS}}


def refuse_export_as_run(workdir: str) -> None:
    """UsageError when `workdir` is a release of `dpft export`: it has no secret, optimizer state or
    data position, so training cannot continue in it."""
    if paths.isfile(workdir_file(workdir, EXPORT_FILE)):
        raise UsageError(f"--workdir {workdir} is a release made by `dpft export` (no secret, no optimizer state): "
                         f"it can be evaluated, not trained; train in a new --workdir")


# ---------------------------------------------------------------- reading
def read_config(workdir: str) -> ml_collections.ConfigDict:
    """`WORKDIR/config.json`; UsageError when it is not a `dpft train` workdir."""
    path = workdir_file(workdir, CONFIG_FILE)
    if not paths.isfile(path):
        raise UsageError(f"{workdir}: no config.json (is this a `dpft train` workdir?)")
    return config_from_json(remote_files.read_text(path))


def checkpoint_config(directory: str, step: int) -> ml_collections.ConfigDict:
    """The config checkpoint `step` was trained with, read without its arrays and checked against the
    step's checksum record (`checkpointing.read_json_item`); an unreadable or edited item makes the
    step corrupt (`checkpointing.CorruptCheckpoint`), so that a resumed run falls back to the newest
    intact checkpoint instead of refusing a config nobody ran."""
    from dpft.workdir import checkpointing

    try:
        return config_from_json(json.dumps(checkpointing.read_json_item(directory, step, CONFIG)))
    except checkpointing.CorruptCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable config item: this step is corrupt
        raise checkpointing.CorruptCheckpoint(step, directory, f"item 'config': {type(e).__name__}: "
                                              f"{str(e).strip()[:300]}") from e


def checkpoint_ledger(restored: Restored, directory: str) -> Ledger:
    """The ledger item of a restored checkpoint; a malformed one makes the step corrupt."""
    from dpft.privacy.accounting import Ledger
    from dpft.workdir import checkpointing

    try:
        return Ledger.from_dict(restored.json_items[LEDGER])
    except (KeyError, ValueError) as e:
        raise checkpointing.CorruptCheckpoint(restored.step, directory, f"item 'ledger': {e}") from e


# ---------------------------------------------------------------- writing (process 0 of a run)
def write_ledger(workdir: str, ledger: Ledger) -> None:
    """`WORKDIR/ledger.json` (atomic)."""
    atomic_io.write_text(workdir_file(workdir, LEDGER_FILE), ledger.to_json())


def write_run_files(workdir: str, *, config: ml_collections.ConfigDict, ledger: Ledger,
                    coverage: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
    """The files a run (re)writes when it starts: ledger, config, attribute coverage and privacy plan."""
    write_ledger(workdir, ledger)
    atomic_io.write_text(workdir_file(workdir, CONFIG_FILE), config_to_json(config))
    atomic_io.write_text(workdir_file(workdir, COVERAGE_FILE), json.dumps(coverage, indent=2, sort_keys=True))
    atomic_io.write_text(workdir_file(workdir, PLAN_FILE), json.dumps(plan, indent=2))
