"""The wiring of one training run: every collaborator the loop needs, built from the config.

`build_run(config, workdir)` starts jax.distributed (before any backend is used), loads the data
tables (attribute coverage printed and checked), builds the model and its loss, the privacy plan
with the run's secret (drawn on process 0 and broadcast), the optimizer, the replicated state, the
compiled accumulate/apply functions, the data iterator, the `Predictor` and the individual-
accounting hook -> `RunParts`. The loop (`dpft.train.loop.Trainer`, a `RunParts`) only runs them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import ml_collections
import optax

from dpft import distributed, paths
from dpft.config import build, optim, run_plan
from dpft.config.validation import validate
from dpft.data import pipeline
from dpft.data.augment import AugmentConfig
from dpft.data.base import ExampleTable
from dpft.errors import UsageError
from dpft.inference.predictor import Predictor, model_forward
from dpft.models import registry, trainable
from dpft.privacy import adapters, keys
from dpft.privacy.plan import PrivacyPlan, num_scalars
from dpft.train import privacy_setup
from dpft.train import step as step_lib


@dataclasses.dataclass(eq=False, repr=False)
class RunParts:
    """The collaborators of one run (`build_run`); the training loop's attributes of the same names."""

    config: ml_collections.ConfigDict
    workdir: str  # absolute (or a URL)
    print: Callable[..., None]  # prints on process 0, nothing on the others
    mesh: jax.sharding.Mesh
    tables: dict[str, ExampleTable]
    coverage: dict[str, Any]  # attribute coverage (WORKDIR/attribute_coverage.json)
    train_split: str
    train_table: ExampleTable
    augment: AugmentConfig
    merge: Callable[[Any], Any]  # params -> the NNX module
    plan: PrivacyPlan
    noise_key: Any  # plan.noise_base_key(): derived once, an argument of every apply
    step_cfg: step_lib.StepConfig
    optimizer: optax.GradientTransformation
    state: dict[str, Any]  # params, opt_state, update (, ema, polyak): replicated over the mesh
    accumulate: Callable  # (params, acc, batch, key) -> (acc, stats): clipped per-example gradient sums
    apply: Callable  # (state, acc, noise_key) -> (state, info): noise once, optax, EMA
    iterator: pipeline.TrainIterator  # this host's share of every update's Poisson-sampled batches
    predictor: Predictor
    gather: Callable[[Any], Any]  # host values of every process, stacked
    individual: Any  # the individual-accounting hook (dpft.privacy.individual.hook), or None


def build_run(config: ml_collections.ConfigDict, workdir: str, *, print_fn: Callable[..., None] = print
              ) -> RunParts:
    """Every collaborator of the run of `config` in `workdir` (see the module docstring)."""
    distributed.initialize_distributed()  # before any jax call that starts a backend
    say = print_fn if jax.process_index() == 0 else (lambda *a, **k: None)
    mesh = distributed.make_data_mesh()
    tables = build.load_tables(config)
    coverage = build.attribute_report(config, tables, say)  # printed, checked
    split = train_split(config, tables)
    unknown = [s for s in config.eval.splits if s not in tables]
    if unknown:  # a typo would silently evaluate nothing on it
        raise UsageError(f"config.eval.splits={list(config.eval.splits)}: {unknown} not among the splits of data set "
                         f"{config.data.name!r}: {sorted(tables)}")
    table = tables[split]
    units = build.unit_index(config, table)  # None: every row is a privacy unit
    num_units = len(table) if units is None else units.num_units
    validate(config, num_examples=num_units, num_devices=jax.local_device_count())
    augment = build.augment_config(config)
    model = build.build_model(config, table.num_classes)
    loss_fn, params, merge = adapters.nnx_loss_fn(model, privacy_setup.per_view_loss(table.task))
    partition = trainable.partition(str(config.train.trainable), model, params,
                                    registry.lookup(str(config.model.name)).head, seed=int(config.seed))
    trained = step_lib.trained_tree(params, partition)  # what is clipped and noised
    plan = run_plan.privacy_plan(config, num_units, trained, privacy_setup.shared_run_secret(config, say),
                                 patient_ids=build.patient_ids(config, table), unit_index=units)
    plan = dataclasses.replace(plan, trainable=str(config.train.trainable), model_size=num_scalars(params))
    plan = privacy_setup.shared_strategy(plan)  # BandMF: process 0's coefficients on every process
    step_cfg = step_lib.StepConfig(plan=plan, microbatch_size=int(config.train.microbatch_size),
                                   ema_decay=float(config.train.ema_decay), polyak=bool(config.train.polyak),
                                   partition=partition)
    optimizer = optim.make_optimizer(config.train)
    return RunParts(
        config=config, workdir=paths.absolute(workdir), print=say, mesh=mesh, tables=tables, coverage=coverage,
        train_split=split, train_table=table, augment=augment, merge=merge, plan=plan,
        noise_key=plan.noise_base_key(), step_cfg=step_cfg, optimizer=optimizer,
        state=distributed.replicate(step_lib.init_state(params, optimizer, step_cfg), mesh),
        accumulate=step_lib.make_accumulate_fn(loss_fn, step_cfg, mesh),
        apply=step_lib.make_apply_fn(optimizer, step_cfg, mesh),
        iterator=train_iterator(config, table, plan, augment, units),
        predictor=Predictor(config, tables, model_forward(merge), augment, mesh),
        # Host values of every process, stacked (first call of each shape waits for all: distributed.together).
        gather=distributed.together(lambda x: multihost_utils.process_allgather(x, tiled=True), "gather"),
        individual=individual_hook(config, plan, num_units),
    )


def train_split(config: ml_collections.ConfigDict, tables: dict[str, ExampleTable]) -> str:
    """`config.data.train_split`, which the data set must have."""
    split = build.train_split_name(config)
    if split not in tables:
        raise UsageError(f"config.data.train_split={split!r}: data set {config.data.name!r} "
                         f"has splits {sorted(tables)}")
    return split


def train_iterator(config: ml_collections.ConfigDict, table: ExampleTable, plan: PrivacyPlan,
                   augment: AugmentConfig, units: Any = None) -> pipeline.TrainIterator:
    """This host's share of the physical batches of every update's Poisson selection (`plan`) over the
    privacy units (`units`, a `dpft.privacy.units.UnitIndex`; None: every row is a unit)."""
    return pipeline.TrainIterator(
        table,
        pipeline.TrainConfig(
            sampling_rate=plan.sampling_rate,
            physical_batch_size=int(config.train.physical_batch_size),
            seed=int(config.seed),
            selection_seed=plan.selection_seed(),
            num_workers=int(config.data.num_workers),
            worker_processes=int(config.data.worker_processes),
            num_shards=jax.process_count(),
            shard_index=jax.process_index(),
            on_bad_image=build.bad_image_policy(config),
            bands=plan.bands,  # BandMF: cyclic Poisson over the plan's groups (the plan's `selection`)
        ),
        augment,
        units=units,
    )


def individual_hook(config: ml_collections.ConfigDict, plan: PrivacyPlan, num_examples: int) -> Any:
    """The individual-accounting hook (`config.individual`, private runs only), or None."""
    if not (config.individual.enabled and plan.enabled):
        return None
    from dpft.privacy.individual import hook as individual_hook_lib
    return individual_hook_lib.IndividualHook.create(
        num_examples, grid_width=float(config.individual.norm_grid), every=int(config.individual.every),
        min_group_size=int(config.individual.min_group_size))


def use_strategy(parts: RunParts, coefs: Any) -> None:
    """Continue `parts` with BandMF strategy coefficients `coefs` (a resumed run's, as its checkpoint's plan
    records them: the noise state was made with them): the plan, the step config and the compiled apply."""
    parts.plan = dataclasses.replace(parts.plan, strategy=parts.plan.strategy.with_coefs(coefs, parts.plan.num_updates))
    parts.step_cfg = dataclasses.replace(parts.step_cfg, plan=parts.plan)
    parts.apply = step_lib.make_apply_fn(parts.optimizer, parts.step_cfg, parts.mesh)


def use_secret(parts: RunParts, secret: keys.RunSecret) -> None:
    """Continue `parts` with `secret` (a resumed run's): the plan, the noise key, the step config and
    the batch selection."""
    parts.plan = parts.plan.with_secret(secret)
    parts.noise_key = parts.plan.noise_base_key()
    parts.step_cfg = dataclasses.replace(parts.step_cfg, plan=parts.plan)
    parts.iterator.config = dataclasses.replace(parts.iterator.config, selection_seed=parts.plan.selection_seed())
