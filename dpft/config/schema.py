"""The run config's schema: one `Field` record per field, and `base_config()` generated from it.

`FIELDS` maps each dotted field name to its default, kind, range or choices, one-line doc, whether
it may change when a run resumes, and when it was added (older saved configs get its default from
`dpft.config.upgrade`). Validation (`dpft.config.validation`), the command-line overrides
(`dpft.config.overrides`), the resume check (`resumable_fields`) and the field reference
docs/config.md (`dpft.config.docs`) all read it. Choices come from where the thing is implemented:
the model, data set and clipping-mode registries, the accountants, the engines, `dpft.config.optim`,
`dpft.data.augment`; they are looked up when checked, so this module loads nothing heavy.

`data.options` is a group whose fields are the data set's loader options (its `DatasetSpec`'s
options class, `dpft.data.option_defaults`), so they are not listed here.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from dpft.config.fields import (BOOL, FLOAT, GROUP, INT, NAMES, PATH, SPLIT, SPLITS, STR, Field, Kind, Range,
                                kind_of)
from dpft.privacy import limits
from dpft.privacy.hyper_params import HYPER_PARAMS
from dpft.privacy.individual.groups import MIN_GROUP_SIZE

ConfigDict = ml_collections.ConfigDict

#: The parameter sets a run can evaluate (`dpft.workdir.contract.PARAMS_ITEMS` maps them to checkpoint items).
EVAL_PARAMS = ("ema", "raw", "polyak")

_OPEN_UNIT = Range(0.0, 1.0, high_open=True)  # [0, 1)
_POSITIVE = Range(0.0, low_open=True)  # > 0


# Choices, looked up in their registries when a config is checked.
def _models() -> tuple[str, ...]:
    from dpft.models import registry

    return registry.names()


def _datasets() -> tuple[str, ...]:
    from dpft.data import DATASETS

    return DATASETS.names()


def _dtypes() -> tuple[str, ...]:
    from dpft.config.build import COMPUTE_DTYPES

    return tuple(COMPUTE_DTYPES)


def _crops() -> tuple[str, ...]:
    from dpft.data.augment import CROPS

    return ("auto",) + CROPS


def _clipping_modes() -> tuple[str, ...]:
    from dpft.privacy import clipping

    return clipping.names(private=True)  # "none" is privacy.enabled=False


def _units() -> tuple[str, ...]:
    from dpft.privacy.units import UNITS

    return UNITS


def _accountants() -> tuple[str, ...]:
    from dpft.privacy.accounting import ACCOUNTANTS

    return ACCOUNTANTS


def _mechanisms() -> tuple[str, ...]:
    from dpft.privacy.bandmf import MECHANISMS

    return MECHANISMS


def _grad_methods() -> tuple[str, ...]:
    from dpft.privacy.plan import GRAD_METHOD_CHOICES

    return GRAD_METHOD_CHOICES


def _optimizers() -> tuple[str, ...]:
    from dpft.config.optim import OPTIMIZERS

    return tuple(OPTIMIZERS)


def _schedules() -> tuple[str, ...]:
    from dpft.config.optim import SCHEDULES

    return tuple(SCHEDULES)


def _hyper(name: str, **spec: Any) -> Field:
    """`config.privacy.<name>`: a clipping hyper-parameter of `dpft.privacy.hyper_params` (its range is
    checked by the modes that read it: `dpft.config.validation`)."""
    param = HYPER_PARAMS[name]
    return Field(param.default, FLOAT, f"{param.doc} (its range is checked where the clipping mode reads it)", **spec)


_LEGACY = "2026-11-29"  # the run options that configs before this date kept in data.options

FIELDS: dict[str, Field] = {
    "seed": Field(0, INT, "root of the PUBLIC random streams (init, augmentation, dropout); the noise and "
                  "the Poisson selection come from a CSPRNG secret kept in the checkpoints",
                  range=Range(0, limits.MAX_SEED)),
    # -- model
    "model.name": Field("nfnet_f0", STR, "the model (nfnet_f0..nfnet_f7, nfnet_tiny, wrn_16_4, vit_b16, ...)",
                        choices=_models, choices_doc="a name of `dpft.models.registry.names()`",
                        problem_text="is not a known model ({choices})"),
    "model.checkpoint": Field("", PATH, '"" = from scratch, else the pre-trained checkpoint (DeepMind NFNet, '
                              "big_vision ViT, or dpft's own)"),
    "model.dtype": Field("float32", STR, "compute dtype (params stay float32)", choices=_dtypes),
    # -- data
    "data.name": Field("digits", STR, "the data set (chexpert, mimic_cxr, imagenet, places365, digits, ...)",
                       choices=_datasets,
                       choices_doc="a name of `dpft.data.DATASETS`"),
    "data.root": Field("", PATH, 'data directory ("" for embedded data such as digits)'),
    "data.image_size": Field(32, INT, "training resolution [pixels]", range=Range(1)),
    "data.eval_image_size": Field(32, INT, "evaluation resolution [pixels]", range=Range(1)),
    "data.augmult": Field(1, INT, "K augmented views per example", range=Range(1)),
    "data.random_crop": Field(True, BOOL, "random crops of the training views (data.crop says which)"),
    "data.random_flip": Field(True, BOOL, "random horizontal flips of the training views"),
    "data.num_workers": Field(0, INT, "host data-loading threads", range=Range(0), resumable=True),
    "data.worker_processes": Field(0, INT, "> 0: decode training batches in that many spawned processes",
                                   range=Range(0), added=_LEGACY, was="data.options.worker_processes"),
    "data.train_split": Field("train", SPLIT, 'the split trained on (the demo\'s public pre-training: "public")',
                              added=_LEGACY, was="data.options.train_split"),
    "data.crop": Field("auto", STR, "training crop when data.random_crop: auto = random_resized at >= 64 px, "
                       "else pad_crop", choices=_crops, added=_LEGACY, was="data.options.crop"),
    "data.eval_crop_fraction": Field(0.0, FLOAT, "centre-crop fraction at evaluation (0 = 0.875 with random_resized "
                                     "crops, else 1)", range=Range(0.0, 1.0), added=_LEGACY,
                                     was="data.options.eval_crop_fraction",
                                     problem_text="must be in (0, 1], or 0 for the default"),
    "data.attributes": Field(None, NAMES, "fairness attributes the run asks for (None = the data set's "
                             "`required_attributes`)", added=_LEGACY, was="data.options.attributes"),
    "data.imbalance.attribute": Field("", STR, "imbalance studies: the attribute of the subgroup kept at "
                                      "data.imbalance.fraction", added=_LEGACY, was="data.options.imbalance_attribute"),
    "data.imbalance.group": Field("", STR, "the subgroup (a value of data.imbalance.attribute)", added=_LEGACY,
                                  was="data.options.imbalance_group"),
    "data.imbalance.fraction": Field(0.0, FLOAT, "the subgroup's fraction of the training split", range=_OPEN_UNIT,
                                     note="0 = off", added=_LEGACY, was="data.options.imbalance_fraction"),
    "data.imbalance.seed": Field(-1, INT, "seed of the subsampling (-1 = config.seed)", range=Range(-1),
                                 added=_LEGACY, was="data.options.imbalance_seed"),
    "data.options": Field({}, GROUP, "the data set loader's options: every field of its options class "
                          "(`dpft.data.option_defaults`); `load_config` adds those a config file leaves out, so "
                          "each is settable as --config.data.options.KEY=VALUE"),
    # -- privacy
    "privacy.enabled": Field(True, BOOL, "False = the non-private baseline on the same code path"),
    "privacy.epsilon": Field(8.0, FLOAT, "target epsilon (used when privacy.noise_multiplier is 0)", nullable=True),
    "privacy.delta": Field(0.0, FLOAT, "delta (0 = 1/N at run time)", range=_OPEN_UNIT, note="0 means 1/N"),
    "privacy.noise_multiplier": Field(0.0, FLOAT, "sigma (0 = calibrate from privacy.epsilon)", range=Range(0.0),
                                      nullable=True, note="0 = calibrate from privacy.epsilon"),
    "privacy.clip_norm": _hyper("clip_norm"),
    "privacy.clipping": Field("flat", STR, "the clipping mode (its record says which hyper-parameters it reads)",
                              choices=_clipping_modes,
                              choices_doc="a private mode of `dpft.privacy.clipping.MODES` (flat, per_layer, ...)"),
    "privacy.gamma": _hyper("gamma", added="2026-12-06"),
    "privacy.accountant": Field("pld", STR, "the accountant of every epsilon of the run", choices=_accountants),
    "privacy.unit": Field("example", STR, "who (epsilon, delta) protects: example (one image) or patient (all the "
                          "images of a patient: the data set must give patient ids); `dpft.privacy.units`",
                          choices=_units, added="2026-12-07"),
    "privacy.unit_cap": Field(0, INT, "privacy.unit=patient: the most images of one patient in an update (0 = from "
                              "the data: the smallest cap that keeps 95% of the images)", range=Range(0),
                              added="2026-12-07"),
    "privacy.mechanism": Field("dpsgd", STR, "the noise mechanism: dpsgd (independent noise per update, Poisson "
                               "sampling) or bandmf (noise correlated by a banded Toeplitz strategy, cyclic Poisson "
                               "sampling over privacy.bandmf.bands groups); `dpft.privacy.bandmf`",
                               choices=_mechanisms, only_if="privacy.enabled", added="2026-12-08"),
    "privacy.bandmf.bands": Field(1, INT, "privacy.mechanism=bandmf: bands b of the strategy = groups of the cyclic "
                                  "Poisson sampling (each sampled every b-th update at rate b*q); 1 = DP-SGD's noise",
                                  range=Range(1), only_if="privacy.enabled", added="2026-12-08"),
    "privacy.bandmf.strategy": Field("optimized", STR, "privacy.mechanism=bandmf: 'optimized' (jax_privacy's banded "
                                     "Toeplitz optimum for train.num_updates) or a .npy file of the b coefficients",
                                     only_if="privacy.enabled", added="2026-12-08"),
    "privacy.insecure_fixed_noise_seed": Field(
        -1, INT, "-1 = off (the secret comes from the OS CSPRNG); >= 0 fixes the noise and the selection for "
        "tests: NO privacy guarantee", range=Range(-1), only_if="privacy.enabled", added=_LEGACY,
        problem_text="must be -1 (off, secret noise) or an int >= 0"),
    # -- train
    "train.batch_size": Field(256, INT, "expected batch size B = q N per update [privacy units: examples or "
                              "patients]", range=Range(1)),
    "train.physical_batch_size": Field(64, INT, "privacy units per step on each host (a multiple of "
                                       "train.microbatch_size; a patient unit holds privacy.unit_cap images)",
                                       range=Range(1)),
    "train.microbatch_size": Field(16, INT, "privacy units (examples or patients) per chunk of the per-unit "
                                  "computation", range=Range(1)),
    "train.grad_method": Field("auto", STR, "how clipped per-example gradients are summed (same result); auto = "
                               "bookkeeping where the clipping mode allows it, else vmap", choices=_grad_methods,
                               added="2026-11-26"),
    "train.trainable": Field("all", STR, "what is trained (clipped, noised, updated): all, head, norms_and_head, "
                             "regex:<pattern> (re.search on '/'-joined parameter paths) or lora:<rank> "
                             "(`dpft.models.trainable`)", added="2026-12-08"),
    "train.num_updates": Field(100, INT, "optimizer updates", range=Range(1, limits.MAX_STEPS)),
    "train.optimizer.name": Field("sgd", STR, "the optimizer (`dpft.config.optim.OPTIMIZERS`)", choices=_optimizers),
    "train.optimizer.learning_rate": Field(1.0, FLOAT, "peak learning rate", range=_POSITIVE),
    "train.optimizer.momentum": Field(0.0, FLOAT, "heavy-ball momentum (optimizer momentum)", range=_OPEN_UNIT),
    "train.optimizer.weight_decay": Field(0.0, FLOAT, "weight decay (after privatisation)", range=Range(0.0)),
    "train.lr_schedule.name": Field("constant", STR, "the learning-rate schedule (`dpft.config.optim.SCHEDULES`)",
                                    choices=_schedules),
    "train.lr_schedule.warmup_steps": Field(0, INT, "linear warm-up [updates]", range=Range(0)),
    "train.ema_decay": Field(0.999, FLOAT, "decay of the EMA of the parameters", range=_OPEN_UNIT, note="0 = off"),
    "train.polyak": Field(False, BOOL, "also keep a uniform average of the iterates"),
    "train.eval_every": Field(100, INT, "quick validation every that many updates (0 = never)", range=Range(0),
                              resumable=True),
    "train.checkpoint_every": Field(100, INT, "a checkpoint every that many updates (and at the last)",
                                    range=Range(1), resumable=True),
    "train.log_every": Field(10, INT, "a log line every that many updates", range=Range(1), resumable=True),
    "train.keep_checkpoints": Field(3, INT, "checkpoints kept", range=Range(1), resumable=True),
    # -- eval
    "eval.batch_size": Field(256, INT, "evaluation batch size", range=Range(1), resumable=True),
    "eval.params": Field("ema", STR, "the parameters evaluated (polyak needs train.polyak)", choices=EVAL_PARAMS,
                         resumable=True),
    "eval.splits": Field(("test",), SPLITS, "the splits predicted at the end (and validation)", resumable=True),
    # -- individual accounting
    "individual.enabled": Field(False, BOOL, "individual (per-example) privacy accounting (private runs)"),
    "individual.every": Field(100, INT, "record the norms every that many updates", range=Range(1),
                              only_if="individual.enabled"),
    "individual.norm_grid": Field(0.1, FLOAT, "width of the norm grid", range=_POSITIVE,
                                  only_if="individual.enabled"),
    "individual.min_group_size": Field(MIN_GROUP_SIZE, INT, "groups smaller than this get no statistics in "
                                       "summaries", range=Range(1), only_if="individual.enabled", added=_LEGACY),
}


def base_config(*, locked: bool = True) -> ConfigDict:
    """Every run-config field at its default (`FIELDS`: a small private fine-tuning run).

    Returns a locked ConfigDict unless `locked=False` (experiment files unlock to add
    dataset-specific `data.options` keys, then call `finalize`).
    """
    c = ConfigDict()
    for path, field in FIELDS.items():
        *parents, leaf = path.split(".")
        node = c
        for part in parents:
            if part not in node:
                node[part] = ConfigDict()
            node = node[part]
        node[leaf] = ConfigDict() if field.kind is GROUP else field.default
    if locked:
        c.lock()
    return c


def kind_at(path: str, current: Any) -> Kind | None:
    """The kind of field `path`: its schema record's, or for a loader option (not in the schema) the
    kind of its `current` value."""
    return FIELDS[path].kind if path in FIELDS else kind_of(current)


def resumable_fields() -> tuple[str, ...]:
    """The fields that may change between a run and its resume (they do not change what is trained)."""
    return tuple(path for path, field in FIELDS.items() if field.resumable)


MISSING = object()  # what `lookup` returns for a field a config lacks


def lookup(config: Any, path: str) -> Any:
    """The value of field `path` ("a.b") of a config (a ConfigDict or a dict), or MISSING."""
    node = config
    for part in path.split("."):
        if not isinstance(node, (ConfigDict, dict)) or part not in node:
            return MISSING
        node = node[part]
    return node
