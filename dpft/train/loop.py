"""The `dpft train` loop: Poisson-sampled DP-SGD updates, EMA, ledger, checkpoints, evaluation.

One update u (`Trainer.train_update`), then the run's bookkeeping (`Trainer.run`):
  sample       selection = Poisson(secret, u): this host's physical batches (dpft.data.pipeline)
  accumulate   acc += clipped per-example grads, batch by batch (dpft.train.step.accumulate)
  privatize    psum, noise once (dpft.train.step.apply -> dpft.privacy.noise.privatize)
  update       optax, EMA/Polyak (dpft.train.step.apply)
  account      ledger.record(q, sigma): the accountant event that ran
  checkpoint   every train.checkpoint_every updates, at the end and when stopped
The collaborators (tables, model and loss, plan and secret, optimizer, state, compiled functions,
data iterator, Predictor, individual-accounting hook) are wired by `dpft.train.wiring.build_run`;
a `Trainer` is those parts plus this algorithm.

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
match the update counter and the plan (`dpft.train.resume`, `dpft.workdir.ledger_check`);
`ledger.json` is rewritten from the restored checkpoint at every start. A non-finite loss,
gradient or parameter stops the run before a checkpoint of it is saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import signal
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from dpft import distributed
from dpft.config.base import config_to_json
from dpft.config.validation import check_finite_trees, check_finite_update
from dpft.data import pipeline
from dpft.privacy import accounting, keys
from dpft.privacy import plan as plan_lib
from dpft.train import logging_utils, preemption, resume, run_log, wiring, workdir_lock
from dpft.train import step as step_lib
from dpft.workdir import checkpointing, contract

log = logging.getLogger(__name__)

# Signals that stop a run cleanly (SLURM: `--signal=B:USR1@<lead>` before the time limit, TERM on preemption).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclasses.dataclass
class RunResult:
    """What `train` returns: the final update index, plan and paths written."""

    workdir: str
    updates_done: int
    plan: plan_lib.PrivacyPlan
    epsilon_spent: float
    preempted: bool
    predictions: dict[str, str]


@dataclasses.dataclass
class Session:
    """What one `Trainer.run` call holds open: checkpoints, the stop flag, the metric files."""

    ckpt: checkpointing.Checkpointer
    flag: preemption.PreemptionFlag
    writer: logging_utils.MetricWriter
    private_writer: logging_utils.PrivateStatsWriter
    progress: logging_utils.Progress | None = None  # from the update the run starts at
    window: dict[str, float] = dataclasses.field(default_factory=run_log.empty_window)


@contextlib.contextmanager
def open_session(workdir: str, keep: int) -> Iterator[Session]:
    """The workdir lock (process 0), the checkpointer, the stop flag and the writers of one run call."""
    with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
            checkpointing.Checkpointer(workdir, keep=keep) as ckpt, \
            preemption.PreemptionFlag(STOP_SIGNALS) as flag, \
            logging_utils.MetricWriter(workdir) as writer, \
            logging_utils.PrivateStatsWriter(workdir) as private_writer:
        yield Session(ckpt, flag, writer, private_writer)


def _device_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("image", "label", "label_mask", "view_weight", "mask", "example_id")}


class Trainer(wiring.RunParts):
    """One run: the parts `wiring.build_run` wires (attributes of the same names), its ledger, and the
    algorithm over them; `run()` trains to the end."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, print_fn=print):
        super().__init__(**vars(wiring.build_run(config, workdir, print_fn=print_fn)))
        self.ledger = self.plan.new_ledger()  # DP-SGD's, or BandMF's (its bands)
        self.skipped_checkpoints: list[tuple[int, str]] = []

    @property
    def updates_done(self) -> int:
        """The index of the next update = the number of completed updates."""
        return int(self.state[contract.UPDATE])

    # ------------------------------------------------------------------ the run
    def run(self, *, max_updates_this_call: int | None = None) -> RunResult:
        """Trains (or resumes) to the plan's last update; stops early, checkpointed, on a signal or after
        `max_updates_this_call` updates (`RunResult.preempted`)."""
        workdir_lock.prepare_workdir(self.workdir)  # a file or an uncreatable path: one-line error
        distributed.barrier("start")  # orbax's first collective comes next: start it together
        with open_session(self.workdir, keep=int(self.config.train.keep_checkpoints)) as session:
            self._start(session)
            preempted = self._train(session, max_updates_this_call)
            done = not preempted and self.updates_done >= self.plan.num_updates
            predictions = self._finish(session) if done else {}
        return RunResult(self.workdir, self.updates_done, self.plan, self.epsilon_spent(), preempted, predictions)

    def _train(self, session: Session, max_updates: int | None) -> bool:
        """Updates to the plan's last; True when stopped early (a signal, or `max_updates` done)."""
        done_this_call = 0
        while self.updates_done < self.plan.num_updates:
            self._record_individual_norms()
            summary = self.train_update(stop=lambda: self.agree(session.flag.requested))
            if summary is None:  # stopped between physical batches: keep the last completed update
                self._stop_mid_update(session)
                return True
            done_this_call += 1
            u = self.updates_done
            check_finite_update(summary, u, session.ckpt.latest_step())  # stop before a NaN is saved
            self._log(session, u, summary)
            self._quick_eval(session, u)
            stop_now = self.agree(session.flag.requested or (max_updates is not None
                                                             and done_this_call >= max_updates))
            if self._checkpoint_due(u) or stop_now:
                self.save(session.ckpt)
            if stop_now:
                self.print(f"stopping at update {u} ({'signal' if session.flag.requested else 'limit'}); "
                           f"checkpoint saved; run the same command again to resume")
                return True
        return False

    # ------------------------------------------------------------------ one update
    def train_update(self, stop: Callable[[], bool] | None = None) -> dict | None:
        """Runs the next update; returns host-side statistics of it (`run_log.update_summary`).

        `stop` is polled before every physical batch: when it returns True the update is
        abandoned — its partial accumulator (no noise yet, examples not yet accounted) is
        discarded and the data iterator rewound to the update's start — and None is returned;
        the state stays that of the last completed update.
        """
        accumulated = self._sample_and_accumulate(stop)
        if accumulated is None:
            return None
        acc, stats = accumulated
        self.state, info = self.apply(self.state, acc, self.noise_key)  # privatize (noise once), update
        self._account()
        return run_log.update_summary(stats, info, self.plan)

    def _sample_and_accumulate(self, stop: Callable[[], bool] | None) -> tuple[Any, list[dict]] | None:
        """The sum of clipped per-example gradients over the physical batches of the next update's
        Poisson selection, and their statistics; None when `stop` fired (update abandoned, iterator rewound)."""
        u = self.updates_done
        if self.iterator.state["update_index"] != u:
            raise RuntimeError(f"data iterator at update {self.iterator.state} but state at {u}")
        acc = step_lib.zeros_accumulator(step_lib.trainable_part(self.state, self.step_cfg), self.mesh)
        stats = []
        batches = self.iterator.update_batches()
        key = keys.dropout_key(int(self.config.seed), u)  # each example folds in its id (engine.example_key_ids)
        for batch in batches:
            if stop is not None and stop():
                batches.close()
                self.iterator.set_state({"update_index": u, "physical_batch_index": 0})
                return None
            device_batch = distributed.shard_batch(_device_batch(batch), self.mesh)
            acc, batch_stats = self.accumulate(step_lib.step_input(self.state, self.step_cfg), acc, device_batch, key)
            stats.append(batch_stats)
        return acc, stats

    def _account(self) -> None:
        """Records the accountant event of the update that ran (none in a non-private run)."""
        if self.plan.enabled:
            self.ledger.record(self.plan.sampling_rate, self.plan.noise_multiplier)

    def epsilon_spent(self) -> float:
        return contract.epsilon_spent(self.ledger, self.plan.to_dict())

    # ------------------------------------------------------------------ start, stop, end
    def _start(self, session: Session) -> None:
        """Device report, resume (quarantining corrupt checkpoints), the run's files, the announcement."""
        for line in distributed.device_report(str(self.config.model.name)):
            self.print(line)
        resumed = self.restore(session.ckpt)
        self._quarantine_skipped(session.ckpt)
        self._prune(session.ckpt)
        if jax.process_index() == 0:  # derived from the restored checkpoint: never stale
            contract.write_run_files(self.workdir, config=self.config, ledger=self.ledger, coverage=self.coverage,
                                     plan=self.plan.to_dict())
        if not resumed:
            for line in run_log.announcement(self.plan, self.config):
                self.print(line)
        session.progress = logging_utils.Progress(self.plan.num_updates, start_step=self.updates_done,
                                                  print_fn=self.print,
                                                  unit="ex" if self.plan.unit == "example" else f"{self.plan.unit}s")

    def _quarantine_skipped(self, ckpt: checkpointing.Checkpointer) -> None:
        """Moves the corrupt checkpoints `restore` passed over aside (process 0): their steps are saved afresh."""
        for s, reason in self.skipped_checkpoints:  # keep the evidence
            if jax.process_index() == 0:
                self.print(f"moved corrupt checkpoint {s} to {ckpt.quarantine(s, reason)}")
        if self.skipped_checkpoints and jax.process_count() > 1:
            distributed.barrier("quarantine")  # process 0 moved them: every process sees the same steps
            ckpt.refresh()

    def _prune(self, ckpt: checkpointing.Checkpointer) -> None:
        """Process 0 deletes checkpoints beyond `train.keep_checkpoints` that a killed run left behind."""
        gone = ckpt.prune() if jax.process_index() == 0 else []
        if gone:
            self.print(f"deleted checkpoint(s) {', '.join(map(str, gone))}: more than train.keep_checkpoints="
                       f"{int(self.config.train.keep_checkpoints)} were left by an interrupted run")
        if jax.process_count() > 1:
            distributed.barrier("prune")  # every process sees the same steps
            ckpt.refresh()

    def _stop_mid_update(self, session: Session) -> None:
        """A signal arrived inside an update: save the last completed one (if not yet) and say so."""
        u = self.updates_done
        if session.ckpt.latest_step() != u:
            self.save(session.ckpt)
        self.print(f"stopping at update {u} (signal {session.flag.signal_name} in the middle of update {u + 1}, "
                   f"whose partial accumulation is discarded); checkpoint of update {u} saved; "
                   f"run the same command again to resume")

    def _finish(self, session: Session) -> dict[str, str]:
        """The end of a complete run: last checkpoint, final metrics, predictions, individual epsilons."""
        u = self.updates_done
        if session.ckpt.latest_step() != u:
            self.save(session.ckpt)
        final = {}
        for split in (contract.VALIDATION, "test"):
            if split in self.tables:
                final.update(self.quick_eval(split))
        session.writer.write(u, final)
        predictions = self.write_predictions()
        if self.individual is not None:
            columns = self.columns(self.train_split)
            if self.iterator.units is not None:  # one epsilon per patient
                columns = self.iterator.units.unit_columns(columns)
            self.individual.finish(self.workdir, self.plan, u, self.epsilon_spent(), columns,
                                   task=self.train_table.task,
                                   class_names=self.train_table.class_names)
        self.print(run_log.final_line(final, self.plan, self.epsilon_spent()))
        return predictions

    def _checkpoint_due(self, u: int) -> bool:
        return u % int(self.config.train.checkpoint_every) == 0 or u == self.plan.num_updates

    # ------------------------------------------------------------------ logging and quick evaluation
    def _log(self, session: Session, u: int, summary: dict) -> None:
        """Adds update `u` to the logging window; logs and empties it every train.log_every updates."""
        run_log.add_to_window(session.window, summary)
        if u % int(self.config.train.log_every) == 0 or u == self.plan.num_updates:
            run_log.log_window(u, session.window, summary, plan=self.plan, epsilon_spent=self.epsilon_spent,
                               progress=session.progress, writer=session.writer,
                               private_writer=session.private_writer)
            session.window = run_log.empty_window()

    def _quick_eval(self, session: Session, u: int) -> None:
        """The validation headline metric every train.eval_every updates (not at the last: `_finish`)."""
        every = self.config.train.eval_every
        if every and u % int(every) == 0 and u < self.plan.num_updates and contract.VALIDATION in self.tables:
            session.writer.write(u, self.quick_eval(contract.VALIDATION))
            session.progress.restart(u)

    # ------------------------------------------------------------------ checkpoints
    def _pytrees(self) -> dict:
        names = (contract.PARAMS, contract.OPT_STATE, contract.UPDATE) + tuple(
            contract.PARAMS_ITEMS[a] for a in contract.averages_kept(self.config)) + (
            (contract.NOISE_STATE,) if self.plan.correlated else ())  # BandMF: private, checkpoints only
        names += (contract.LORA,) if contract.LORA in self.state else ()  # train.trainable="lora:<r>"
        return {name: self.state[name] for name in names}

    def save(self, ckpt: checkpointing.Checkpointer) -> None:
        u = self.updates_done
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
        the plan raises CheckpointError (`resume.read_checkpoint`).
        """
        read = functools.partial(resume.read_checkpoint, ckpt, config=self.config, workdir=self.workdir,
                                 targets=self._pytrees(), plan=self.plan, individual=self.individual)
        restored, self.skipped_checkpoints = checkpointing.newest_intact(ckpt, read, step, report=self.print)
        if restored is None:
            return False
        items = restored.json_items
        self.state = dict(self.state, **restored.pytrees)
        self.iterator.set_state(items[contract.DATA_STATE])
        self.ledger = items[contract.LEDGER]
        if contract.SECRET in items:
            wiring.use_secret(self, keys.RunSecret.from_json(items[contract.SECRET]))
        else:
            fresh = self.plan.secret
            if fresh.is_secure:  # the updates so far used public noise: no guarantee for this run
                wiring.use_secret(self, keys.RunSecret(fresh.value, "csprng_after_public_noise"))
            self.print(f"WARNING: the checkpoint at update {self.updates_done} holds no run secret (written "
                       "before secret noise): its updates used public noise, so this run has NO privacy "
                       "guarantee; the remaining updates use this start's fresh secret")
        if self.individual is not None and contract.INDIVIDUAL in items:
            self.individual.recorder = items[contract.INDIVIDUAL]  # read and checked by `read`
        self._continue_strategy(items.get(contract.PLAN) or {})
        checked = f"{restored.verified} arrays verified" + (f", {restored.unchecked} without checksum"
                                                             if restored.unchecked else "")
        spent = contract.mark_epsilon(f"epsilon spent {self.epsilon_spent():.4g}", self.plan.guarantee_valid)
        self.print(f"resumed from {ckpt.directory}/{restored.step}: update {self.updates_done}, {spent} ({checked})")
        return True

    def _continue_strategy(self, recorded_plan: dict) -> None:
        """BandMF: continue with the strategy the checkpoint's noise state was made with (its plan's
        coefficients), should today's optimisation give other bits (another machine), and say so."""
        recorded = (recorded_plan.get("bandmf") or {}).get("coefs")
        if self.plan.mechanism != "bandmf" or recorded is None or tuple(recorded) == self.plan.strategy.coefs:
            return
        wiring.use_strategy(self, recorded)
        self.print(f"note: continuing with the checkpoint's BandMF strategy {list(recorded)} (optimised again, it "
                   f"differs in the last bits); its sensitivity {self.plan.strategy.sensitivity:.9g}")

    # ------------------------------------------------------------------ several processes
    def agree(self, flag: bool) -> bool:
        """True when any process's `flag` is True (a signal may reach the hosts at different times);
        with several processes a tiny allgather, so every host stops at the same physical batch."""
        if jax.process_count() > 1:
            return bool(np.any(self.gather(np.asarray(flag))))
        return bool(flag)

    # ------------------------------------------------------------------ evaluation
    def eval_params(self, which: str | None = None):
        """(params, name) to evaluate (`contract.eval_params`): `which`, else the run's eval.params."""
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
        return self.predictor.write_predictions(self.workdir, self.updates_done, params, which,
                                                ledger=self.ledger, plan=self.plan.to_dict())

    # ------------------------------------------------------------------ individual accounting
    def _record_individual_norms(self) -> None:
        """Every individual.every updates (before the update), all examples' gradient norms."""
        if self.individual is not None and self.individual.due(self.updates_done):
            self.individual.record(self.updates_done, *self.example_norms())

    def example_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(norms, losses) float [N]: per-example gradient norm and loss of ALL training examples
        at the current params, in table order (per patient, in unit order, for privacy.unit="patient").

        The norm is the one training clips: of the gradient averaged over the example's K
        augmented views, drawn as update u would draw them (`pipeline.train_view_batches`), with
        the current parameters and no noise. Each host computes its shard; the norms are gathered.
        """
        u = self.updates_done
        bs = int(self.config.train.physical_batch_size)
        chunks, loss_chunks = [], []
        key = keys.dropout_key(int(self.config.seed), u)  # the keys update u draws
        # reused: only the stats matter
        acc = step_lib.zeros_accumulator(step_lib.trainable_part(self.state, self.step_cfg), self.mesh)
        for batch in pipeline.train_view_batches(
                self.train_table, batch_size=bs, augment=self.augment, seed=int(self.config.seed), update_index=u,
                num_workers=int(self.config.data.num_workers), num_shards=jax.process_count(),
                shard_index=jax.process_index(), on_bad_image=self.iterator.config.on_bad_image,
                units=self.iterator.units, selection_seed=self.iterator.config.selection_seed):
            acc, stats = self.accumulate(step_lib.step_input(self.state, self.step_cfg), acc,
                                         distributed.shard_batch(_device_batch(batch), self.mesh), key)
            norms, losses = stats["norms"], stats["loss"]
            if jax.process_count() > 1:
                norms, losses = self.gather((norms, losses))
            chunks.append(np.asarray(norms, np.float64))
            loss_chunks.append(np.asarray(losses, np.float64))
        n = self.iterator.num_units
        return np.concatenate(chunks)[:n], np.concatenate(loss_chunks)[:n]


def train(config: ml_collections.ConfigDict, workdir: str, **kwargs: Any) -> RunResult:
    """Trains (or resumes) the run of `config` in `workdir`; see the module docstring."""
    max_updates = kwargs.pop("max_updates_this_call", None)
    return Trainer(config, workdir, **kwargs).run(max_updates_this_call=max_updates)
