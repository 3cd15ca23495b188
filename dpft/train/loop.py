"""The `dpft train` loop: Poisson-sampled DP-SGD updates, EMA, ledger, checkpoints, evaluation.

One update u:
  selection = Poisson(seed, u)        dpft.privacy.sampling via dpft.data.pipeline
  for each physical batch j:          fixed shapes, padded; this host's share only
      acc += clipped per-example grads (dpft.train.step.accumulate, on every device)
  state = apply(state, acc)           psum, noise once, optax, EMA (dpft.train.step.apply)
  ledger.record(q, sigma)             the accountant event that ran
Checkpoints (orbax) hold params, opt state, EMA, update index, data-iterator state, ledger
and config; a run on a workdir with a checkpoint resumes from it and ends with the same
parameters as an uninterrupted run. SIGTERM/SIGINT/SIGUSR1 are polled between physical
batches: a stop in the middle of an update discards its partial accumulator (no noise yet,
not accounted), saves the last completed update and returns with `preempted=True` (the CLI
then exits with `dpft.errors.STOPPED_EARLY_EXIT_CODE`, 75).

Faults: a run holds an exclusive lock on its workdir (`dpft.train.workdir_lock`); a corrupt
latest checkpoint (unreadable item or checksum mismatch) is reported, moved to
`WORKDIR/corrupt_checkpoints/` and the newest intact one is used; if none is intact the run
refuses to start (never from scratch over existing checkpoints). The restored ledger must
match the update counter and the plan (`dpft.train.ledger_check`); `ledger.json` is rewritten
from the restored checkpoint at every start. A non-finite loss, gradient or parameter stops
the run before a checkpoint of it is saved.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dpft import atomic_io, paths
from dpft.errors import UsageError
from dpft.data import pipeline
from dpft.config import build
from dpft.inference import predictor as predictor_lib
from dpft.privacy import accounting, keys
from dpft.privacy import plan as plan_lib
from dpft import distributed
from dpft.train import ledger_check, logging_utils, optim, preemption, step as step_lib
from dpft.workdir import checkpointing, contract
from dpft.train import workdir_lock
from dpft.train import privacy_setup
from dpft.config.base import config_from_json, config_to_json, flatten
from dpft.config.validation import check_finite_trees, check_finite_update, same_value, validate

log = logging.getLogger(__name__)

# Signals that stop a run cleanly (SLURM: `--signal=B:USR1@<lead>` before the time limit, TERM on preemption).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# Fields that may change between a run and its resume (they do not affect what is trained).
RESUMABLE_CHANGES = ("train.eval_every", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "data.num_workers", "eval.batch_size", "eval.splits",
                     "eval.params")


@dataclasses.dataclass
class RunResult:
    """What `train` returns: the final update index, plan and paths written."""

    workdir: str
    updates_done: int
    plan: plan_lib.PrivacyPlan
    epsilon_spent: float
    preempted: bool
    predictions: dict[str, str]


def check_resume_config(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse to resume with a config that changes what is trained (and so the guarantee)."""
    a = flatten(json.loads(config_to_json(old)))
    b = flatten(json.loads(config_to_json(new)))
    # data.options keys a checkpoint written before they were listed lacks: equal when at their default.
    from dpft.data import option_defaults
    defaults = {f"data.options.{k}": v for k, v in json.loads(json.dumps(option_defaults(str(new.data.name)))).items()}
    changed = sorted(k for k in set(a) | set(b)
                     if not same_value(a.get(k), b.get(k)) and not k.startswith(RESUMABLE_CHANGES)
                     and not (k not in a and k in defaults and same_value(b.get(k), defaults[k])))
    if changed:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise UsageError(f"{workdir} holds a checkpoint of a different config ({details}); "
                         f"use a new --workdir, or the same config to resume")


def _device_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("image", "label", "label_mask", "mask", "example_id")}


class Trainer:
    """Holds the compiled functions and state of one run; `run()` trains to the end."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
                 print_fn=print):
        distributed.initialize_distributed()  # before any jax call that starts a backend
        self.config = config
        self.workdir = paths.absolute(workdir)
        self.print = print_fn if jax.process_index() == 0 else (lambda *a, **k: None)
        self.mesh = distributed.make_data_mesh()
        self.tables = build.load_tables(config)
        self.coverage = build.attribute_report(config, self.tables, self.print)  # printed, checked
        split = build.train_split_name(config)
        if split not in self.tables:
            raise UsageError(f"config.data.train_split={split!r}: data set {config.data.name!r} "
                             f"has splits {sorted(self.tables)}")
        self.train_split = split
        self.train_table = self.tables[split]
        validate(config, num_examples=len(self.train_table), num_devices=jax.local_device_count())
        self.augment = build.augment_config(config)
        model = build.build_model(config, self.train_table.num_classes)
        loss_fn, params, self.merge = self._loss(model)
        self.plan = privacy_setup.privacy_plan(config, len(self.train_table), params, self._new_secret())
        self.noise_key = self.plan.noise_base_key()  # derived once; an argument of every apply
        self.step_cfg = step_lib.StepConfig(
            plan=self.plan,
            microbatch_size=int(config.train.microbatch_size),
            ema_decay=float(config.train.ema_decay),
            polyak=bool(config.train.polyak),
        )
        self.optimizer = optim.make_optimizer(config.train)
        self.state = distributed.replicate(step_lib.init_state(params, self.optimizer, self.step_cfg), self.mesh)
        self.accumulate = step_lib.make_accumulate_fn(loss_fn, self.step_cfg, self.mesh)
        self.apply = step_lib.make_apply_fn(self.optimizer, self.step_cfg, self.mesh)
        self.ledger = accounting.Ledger()
        self.iterator = pipeline.TrainIterator(
            self.train_table,
            pipeline.TrainConfig(
                sampling_rate=self.plan.sampling_rate,
                physical_batch_size=int(config.train.physical_batch_size),
                seed=int(config.seed),
                selection_seed=self.plan.selection_seed(),
                num_workers=int(config.data.num_workers),
                worker_processes=int(config.data.worker_processes),
                num_shards=jax.process_count(),
                shard_index=jax.process_index(),
                on_bad_image=str(config.data.options.get("on_bad_image", "error")),
            ),
            self.augment,
        )
        self.predictor = predictor_lib.Predictor(config, self.tables, predictor_lib.model_forward(self.merge),
                                                 self.augment, self.mesh)
        # Host values of every process, stacked (first call of each shape waits for all: distributed.together).
        self.gather = distributed.together(lambda x: multihost_utils.process_allgather(x, tiled=True), "gather")
        self.individual = None  # the individual-accounting hook (dpft.privacy.individual.hook)
        if config.individual.enabled and self.plan.enabled:
            from dpft.privacy.individual import groups as individual_groups
            from dpft.privacy.individual import hook as individual_hook
            self.individual = individual_hook.IndividualHook.create(
                len(self.train_table), grid_width=float(config.individual.norm_grid),
                every=int(config.individual.every),
                min_group_size=int(config.individual.get("min_group_size", individual_groups.MIN_GROUP_SIZE)))

    def _loss(self, model):
        from dpft.privacy import adapters
        return adapters.nnx_loss_fn(model, privacy_setup.per_view_loss(self.train_table.task))

    # ------------------------------------------------------------------ the run's secret
    def _new_secret(self) -> keys.RunSecret:
        """A fresh CSPRNG secret drawn on process 0 and broadcast (or the insecure fixed one)."""
        secret = privacy_setup.run_secret(self.config)
        if jax.process_count() > 1 and secret.is_secure:
            words = distributed.together(multihost_utils.broadcast_one_to_all, "secret")(secret.to_words())
            secret = keys.RunSecret.from_words(np.asarray(words), secret.source)
        if not secret.is_secure:
            self.print("WARNING: config.privacy.insecure_fixed_noise_seed is set: the noise and the batch "
                       "selection are a public function of it; this run has NO privacy guarantee")
        return secret

    def _use_secret(self, secret: keys.RunSecret) -> None:
        """Continue with `secret` (a resumed run's): the plan, the selection and the noise key."""
        self.plan = self.plan.with_secret(secret)
        self.noise_key = self.plan.noise_base_key()
        self.step_cfg = dataclasses.replace(self.step_cfg, plan=self.plan)
        self.iterator.config = dataclasses.replace(self.iterator.config, selection_seed=self.plan.selection_seed())

    # ------------------------------------------------------------------ checkpoints
    def _pytrees(self) -> dict:
        s = self.state
        names = (contract.PARAMS, contract.OPT_STATE, contract.UPDATE) + tuple(
            contract.PARAMS_ITEMS[a] for a in contract.averages_kept(self.config))
        return {name: s[name] for name in names}

    def save(self, ckpt: checkpointing.Checkpointer) -> None:
        u = int(self.state["update"])
        check_finite_trees(self._pytrees(), u)  # never save a NaN checkpoint
        json_items = {
            contract.DATA_STATE: self.iterator.get_state(),
            contract.LEDGER: self.ledger.to_dict(),
            contract.CONFIG: json.loads(config_to_json(self.config)),
            contract.PLAN: self.plan.to_dict(),
            contract.SECRET: self.plan.secret.to_json(),  # only ever stored inside checkpoints
        }
        if self.individual is not None:
            json_items[contract.INDIVIDUAL] = self.individual.checkpoint_item(self.workdir, u,
                                                                       write=jax.process_index() == 0)
        ckpt.save(u, pytrees=self._pytrees(), json_items=json_items)
        if jax.process_index() == 0:
            contract.write_ledger(self.workdir, self.ledger)

    def restore(self, ckpt: checkpointing.Checkpointer, step: int | None = None) -> bool:
        """Restores checkpoint `step`, or (default) the newest intact one; False when there is none.

        With `step=None`, corrupt checkpoints (unreadable item, checksum mismatch) are reported,
        listed in `self.skipped_checkpoints` and passed over; when none is intact a
        CheckpointError says so. A given `step` must be intact (CorruptCheckpoint otherwise).
        A changed config raises UsageError; a ledger that does not match the update counter and
        the plan raises CheckpointError (no fallback: the checkpoint was edited, not damaged).
        """
        def read(s: int) -> checkpointing.Restored:
            # compare configs BEFORE restoring arrays: a changed model would fail inside orbax
            check_resume_config(contract.checkpoint_config(ckpt.directory, s), self.config, self.workdir)
            r = ckpt.restore(s, targets=self._pytrees())
            ledger = contract.checkpoint_ledger(r, ckpt.directory)
            ledger_check.check_ledger(
                ledger, updates=int(np.asarray(r.pytrees["update"])), sampling_rate=self.plan.sampling_rate,
                noise_multiplier=self.plan.noise_multiplier, private=self.plan.enabled,
                data_state=r.json_items.get("data_state"), where=f"checkpoint {ckpt.directory}/{s}")
            r.json_items["ledger"] = ledger
            return r

        restored, self.skipped_checkpoints = checkpointing.newest_intact(ckpt, read, step, report=self.print)
        if restored is None:
            return False
        self.state = dict(self.state, **restored.pytrees)
        self.iterator.set_state(restored.json_items["data_state"])
        self.ledger = restored.json_items["ledger"]
        if "secret" in restored.json_items:
            self._use_secret(keys.RunSecret.from_json(restored.json_items["secret"]))
        else:
            self.print(f"WARNING: the checkpoint at update {int(self.state['update'])} holds no run secret (written "
                       "before secret noise); the remaining updates use this start's fresh secret")
        if self.individual is not None and "individual" in restored.json_items:
            self.individual.restore(self.workdir, restored.json_items["individual"])
        checked = f"{restored.verified} arrays verified" + (f", {restored.unchecked} without checksum"
                                                             if restored.unchecked else "")
        self.print(f"resumed from {ckpt.directory}/{restored.step}: update {int(self.state['update'])}, "
                   f"epsilon spent {self.epsilon_spent():.4g} ({checked})")
        return True

    # ------------------------------------------------------------------ several processes
    def agree(self, flag: bool) -> bool:
        """True when any process's `flag` is True (a signal may reach the hosts at different times);
        with several processes a tiny allgather, so every host stops at the same physical batch."""
        if jax.process_count() > 1:
            return bool(np.any(self.gather(np.asarray(flag))))
        return bool(flag)

    # ------------------------------------------------------------------ accounting
    def epsilon_spent(self) -> float:
        return contract.epsilon_spent(self.ledger, self.plan.to_dict())

    # ------------------------------------------------------------------ one update
    def train_update(self, stop: Callable[[], bool] | None = None) -> dict | None:
        """Runs the next update; returns host-side statistics of it.

        `stop` is polled before every physical batch: when it returns True the update is
        abandoned — its partial accumulator (no noise yet, examples not yet accounted) is
        discarded and the data iterator rewound to the update's start — and None is returned;
        the state stays that of the last completed update.
        """
        u = int(self.state["update"])
        if self.iterator.state["update_index"] != u:
            raise RuntimeError(f"data iterator at update {self.iterator.state} but state at {u}")
        acc = step_lib.zeros_accumulator(self.state["params"], self.mesh)
        stats_list = []
        batches = self.iterator.update_batches()
        key = keys.dropout_key(int(self.config.seed), u)  # each example folds in its id (engine.example_key_ids)
        for batch in batches:
            if stop is not None and stop():
                batches.close()
                self.iterator.set_state({"update_index": u, "physical_batch_index": 0})
                return None
            device_batch = distributed.shard_batch(_device_batch(batch), self.mesh)
            acc, stats = self.accumulate(self.state["params"], acc, device_batch, key)
            stats_list.append(stats)
        self.state, info = self.apply(self.state, acc, self.noise_key)
        if self.plan.enabled:
            self.ledger.record(self.plan.sampling_rate, self.plan.noise_multiplier)
        # Four sums per physical batch, dispatched asynchronously; one transfer to the host.
        clip = self.plan.clip_norm if self.plan.enabled else np.inf
        totals = sum((jnp.stack([jnp.sum(s["mask"]), jnp.sum(s["loss"]), jnp.sum(s.get("accuracy", 0.0)),
                                 jnp.sum((s["norms"] > clip) * s["mask"])]) for s in stats_list),
                     jnp.zeros(4))
        n, loss, acc_sum, clipped = (float(x) for x in jax.device_get(totals))
        return {"examples": n, "loss_sum": loss, "accuracy_sum": acc_sum, "clipped": clipped,
                "grad_norm": float(info["grad_norm"])}

    # ------------------------------------------------------------------ evaluation
    def eval_params(self, which: str | None = None):
        item, name = contract.eval_params(self.config, which)
        return self.state[item], name

    def quick_eval(self, split: str) -> dict[str, float]:
        """The headline metric of `split` at the eval params (`Predictor.quick_eval`)."""
        return self.predictor.quick_eval(split, self.eval_params()[0])

    def columns(self, split: str) -> dict[str, np.ndarray]:
        return self.predictor.columns(split)

    def write_predictions(self) -> dict[str, str]:
        """`predictions/<update>/<split>.npz` for every eval split (and validation, for thresholds)."""
        params, which = self.eval_params()
        return self.predictor.write_predictions(self.workdir, int(self.state["update"]), params, which,
                                                ledger=self.ledger, plan=self.plan.to_dict())

    # ------------------------------------------------------------------ individual accounting
    def example_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(norms, losses) float [N]: per-example gradient norm and loss of ALL training examples
        at the current params, in table order.

        The norm is the one training clips: of the gradient averaged over the example's K
        augmented views, drawn as update u would draw them (`pipeline.train_view_batches`), with
        the current parameters and no noise. Each host computes its shard; the norms are gathered.
        """
        u = int(self.state["update"])
        bs = int(self.config.train.physical_batch_size)
        chunks, loss_chunks = [], []
        key = keys.dropout_key(int(self.config.seed), u)  # the keys update u draws
        acc = step_lib.zeros_accumulator(self.state["params"], self.mesh)  # reused: only the stats matter
        for batch in pipeline.train_view_batches(
                self.train_table, batch_size=bs, augment=self.augment, seed=int(self.config.seed), update_index=u,
                num_workers=int(self.config.data.num_workers), num_shards=jax.process_count(),
                shard_index=jax.process_index(), on_bad_image=self.iterator.config.on_bad_image):
            acc, stats = self.accumulate(self.state["params"], acc,
                                         distributed.shard_batch(_device_batch(batch), self.mesh), key)
            norms, losses = stats["norms"], stats["loss"]
            if jax.process_count() > 1:
                norms, losses = self.gather((norms, losses))
            chunks.append(np.asarray(norms, np.float64))
            loss_chunks.append(np.asarray(losses, np.float64))
        n = len(self.train_table)
        return np.concatenate(chunks)[:n], np.concatenate(loss_chunks)[:n]

    # ------------------------------------------------------------------ the run
    def run(self, *, max_updates_this_call: int | None = None) -> RunResult:
        cfg = self.config
        workdir_lock.prepare_workdir(self.workdir)  # a file or an uncreatable path: one-line error
        preempted = False
        distributed.barrier("start")  # orbax's first collective comes next: start it together
        with workdir_lock.WorkdirLock(self.workdir, enabled=jax.process_index() == 0), \
                checkpointing.Checkpointer(self.workdir, keep=int(cfg.train.keep_checkpoints)) as ckpt, \
                preemption.PreemptionFlag(STOP_SIGNALS) as flag, \
                logging_utils.MetricWriter(self.workdir) as writer, \
                logging_utils.PrivateStatsWriter(self.workdir) as private_writer:
            for line in distributed.device_report(str(cfg.model.name)):
                self.print(line)
            resumed = self.restore(ckpt)
            for s, reason in self.skipped_checkpoints:  # save these steps afresh; keep the evidence
                if jax.process_index() == 0:
                    self.print(f"moved corrupt checkpoint {s} to {ckpt.quarantine(s, reason)}")
            if self.skipped_checkpoints and jax.process_count() > 1:
                distributed.barrier("quarantine")  # process 0 moved them: every process sees the same steps
                ckpt.refresh()
            if jax.process_index() == 0:  # derived from the restored checkpoint: never stale
                contract.write_run_files(self.workdir, config=cfg, ledger=self.ledger, coverage=self.coverage,
                                         plan=self.plan.to_dict())
            start = int(self.state["update"])
            total = self.plan.num_updates
            if not resumed:
                self._announce()
            progress = logging_utils.Progress(total, start_step=start, print_fn=self.print)
            window = {"examples": 0.0, "loss_sum": 0.0, "accuracy_sum": 0.0, "clipped": 0.0}
            done_this_call = 0
            while int(self.state["update"]) < total:
                if self.individual is not None and self.individual.due(int(self.state["update"])):
                    self.individual.record(int(self.state["update"]), *self.example_norms())
                info = self.train_update(stop=lambda: self.agree(flag.requested))
                if info is None:  # stopped between physical batches: keep the last completed update
                    preempted = True
                    u = int(self.state["update"])
                    if ckpt.latest_step() != u:
                        self.save(ckpt)
                    self.print(f"stopping at update {u} (signal {flag.signal_name} in the middle of update {u + 1}, "
                               f"whose partial accumulation is discarded); checkpoint of update {u} saved; "
                               f"run the same command again to resume")
                    break
                done_this_call += 1
                u = int(self.state["update"])
                check_finite_update(info, u, ckpt.latest_step())  # stop before a NaN is saved
                for k in window:
                    window[k] += info[k]
                if u % int(cfg.train.log_every) == 0 or u == total:
                    self._log_window(u, window, info, progress, writer, private_writer)
                    window = dict.fromkeys(window, 0.0)
                if cfg.train.eval_every and u % int(cfg.train.eval_every) == 0 and u < total \
                        and "validation" in self.tables:
                    writer.write(u, self.quick_eval("validation"))
                    progress.restart(u)
                stop_now = self.agree(flag.requested or (max_updates_this_call is not None
                                                     and done_this_call >= max_updates_this_call))
                if u % int(cfg.train.checkpoint_every) == 0 or u == total or stop_now:
                    self.save(ckpt)
                if stop_now:
                    preempted = True
                    self.print(f"stopping at update {u} ({'signal' if flag.requested else 'limit'}); "
                               f"checkpoint saved; run the same command again to resume")
                    break
            if not preempted and int(self.state["update"]) >= total:
                if ckpt.latest_step() != int(self.state["update"]):
                    self.save(ckpt)
                final = {}
                for split in ("validation", "test"):
                    if split in self.tables:
                        final.update(self.quick_eval(split))
                writer.write(int(self.state["update"]), final)
                preds = self.write_predictions()
                if self.individual is not None:
                    self.individual.finish(self.workdir, self.plan, int(self.state["update"]), self.epsilon_spent(),
                                           self.columns(self.train_split), task=self.train_table.task,
                                           class_names=self.train_table.class_names)
                self.print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
                           + (f", epsilon {self.epsilon_spent():.4g} (delta {self.plan.delta:.3g})"
                              if self.plan.enabled else ", non-private"))
            else:
                preds = {}
        return RunResult(self.workdir, int(self.state["update"]), self.plan,
                         self.epsilon_spent(), preempted, preds)

    def _log_window(self, u: int, window: dict, info: dict, progress, writer, private_writer) -> None:
        """Logs the updates since the last call. Per-update statistics of private batches (realised
        batch size, training loss/accuracy, clipped fraction) are not covered by the DP guarantee:
        in a private run they go only to the owner-only WORKDIR/private/update_stats.jsonl; the
        public outputs (metrics files, TensorBoard, progress line) carry what the guarantee covers
        (the noisy gradient's norm, epsilon) and rates at the expected batch size."""
        n = max(window["examples"], 1.0)
        stats = {"loss": window["loss_sum"] / n, "train_accuracy": window["accuracy_sum"] / n,
                 "clipped_fraction": window["clipped"] / n, "examples": window["examples"]}
        public = {"grad_norm": info["grad_norm"]}
        if self.plan.enabled:
            eps = self.epsilon_spent()
            public["epsilon"] = eps
            private_writer.write(u, stats)
            updates = u - progress.last_step
            progress.log(u, examples=updates * self.plan.expected_batch_size, epsilon=eps, expected=True)
        else:
            public.update(stats)
            progress.log(u, examples=window["examples"], loss=stats["loss"])
        writer.write(u, public)

    def _announce(self) -> None:
        p = self.plan
        if p.enabled:
            self.print(f"DP-SGD: N={p.num_examples}, expected batch {p.expected_batch_size:g} (q={p.sampling_rate:.4g}), "
                       f"{p.num_updates} updates, sigma={p.noise_multiplier:.4f}, C={p.clip_norm:g} "
                       f"({p.clipping.mode}, sensitivity {p.sensitivity:g}), engine {p.grad_method}, "
                       f"delta={p.delta:.3g}, target epsilon={p.target_epsilon} ({p.accountant}); "
                       f"epsilon at the end {p.epsilon_after(p.num_updates):.4g}")
        else:
            self.print(f"non-private: N={p.num_examples}, expected batch {p.expected_batch_size:g}, "
                       f"{p.num_updates} updates (same code path, no clipping, no noise)")
        self.print(f"devices: {jax.device_count()} ({jax.process_count()} process(es)), "
                   f"physical batch {self.config.train.physical_batch_size} per host, "
                   f"microbatch {self.config.train.microbatch_size}, augmult {self.config.data.augmult}")






def train(config: ml_collections.ConfigDict, workdir: str, **kwargs: Any) -> RunResult:
    """Trains (or resumes) the run of `config` in `workdir`; see the module docstring."""
    max_updates = kwargs.pop("max_updates_this_call", None)
    return Trainer(config, workdir, **kwargs).run(max_updates_this_call=max_updates)
