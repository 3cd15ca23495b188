"""Checkpoints of a training run (orbax) and a SIGTERM/SIGINT preemption flag.

Layout: `WORKDIR/checkpoints/<step>/<item>/` with one orbax item per pytree
(`params`, `opt_state`, `ema`, `polyak`, `rng`, ... via `StandardSave`) and per JSON
document (`step`, `data_state`, `ledger`, `config`, ... via `JsonSave`), plus a
`manifest` item listing which is which.

Atomicity (orbax 0.12.8, verified in tests/test_checkpointing.py): a save is written to
`checkpoints/<step>.orbax-checkpoint-tmp/` and renamed to `checkpoints/<step>/` only after
every item has been committed, so a crash mid-save never touches the last good checkpoint;
leftover tmp directories are deleted by a `Checkpointer` opened later (orbax does this in
the background and waits for it before its first save). Saves are
synchronous by default (`async_save=True` overlaps the write with training; call `wait()`).

Typed PRNG keys (`jax.random.key`) are stored as their raw key data (uint32) and wrapped
again on restore when the target holds a typed key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import types
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

PyTree = Any
MANIFEST = "manifest"
_WRAP = "__value__"  # orbax StandardSave refuses a bare array: store {"__value__": x}


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`WORKDIR/checkpoints` (absolute)."""
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def _options(keep: int | None, async_save: bool, read_only: bool = False) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in `WORKDIR/checkpoints`, or None if there is none."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory, options=_options(None, False, read_only=True))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree: PyTree) -> PyTree:
    tree = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
    if tree is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
        return {_WRAP: tree}
    return tree


def _abstract(target: PyTree) -> PyTree:
    def leaf(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        return ocp.utils.to_shape_dtype_struct(x)

    return _storable(jax.tree.map(leaf, target))


def _unwrap(restored: PyTree, target: PyTree | None) -> PyTree:
    if isinstance(restored, dict) and set(restored) == {_WRAP}:
        restored = restored[_WRAP]
    if target is None:
        return restored

    def leaf(r, t):
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r

    return jax.tree.map(leaf, restored, target)


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns: the step, the pytrees and the JSON documents."""

    step: int
    pytrees: dict[str, PyTree]
    json_items: dict[str, Any]


class Checkpointer:
    """Saves/restores train state under `WORKDIR/checkpoints`, keeping the last `keep` steps.

    Usage:
        with Checkpointer(workdir, keep=3) as ckpt:
            ckpt.save(step, pytrees={"params": p, "opt_state": o, "ema": e, "rng": key},
                      json_items={"step": {"step": step}, "data_state": d, "ledger": l})
            r = ckpt.restore(targets={"params": p, "opt_state": o, "ema": e, "rng": key})
    With `targets`, each restored pytree has the target's structure, shapes, dtypes and
    shardings (bit-exact values); without, orbax's generic dicts/lists.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = False):
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep!r}: must keep at least one checkpoint")
        self.directory = checkpoint_dir(workdir)
        self._keep = keep
        self._async = async_save
        self._manager = self._open()

    def _open(self, cleanup: bool = True) -> ocp.CheckpointManager:
        options = _options(self._keep, self._async)
        options.cleanup_tmp_directories = cleanup
        return ocp.CheckpointManager(self.directory, options=options)

    # -- queries
    def all_steps(self) -> list[int]:
        """Complete checkpoint steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    # -- save
    def save(self, step: int, *, pytrees: Mapping[str, PyTree], json_items: Mapping[str, Any] = ()) -> None:
        """Write checkpoint `step` atomically; drops the oldest beyond `keep`.

        Args:
          step: the update index the state belongs to (the directory name).
          pytrees: name -> pytree of arrays (jax or numpy, any dtype, sharded or not).
          json_items: name -> JSON-serialisable value (dict, list, number, str).
        Raises:
          ValueError for a name clash, TypeError for a non-JSON-serialisable item (before
          anything is written); anything raised mid-write propagates and leaves the
          previous checkpoints intact.
        """
        json_items = dict(json_items or {})
        names = list(pytrees) + list(json_items)
        if MANIFEST in names or len(set(names)) != len(names):
            raise ValueError(f"checkpoint item names must be unique and not {MANIFEST!r}: {names}")
        for name, value in json_items.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"checkpoint JSON item {name!r} is not JSON-serialisable: {e}") from None
        manifest = {"format": 1, "pytrees": sorted(pytrees), "json": sorted(json_items)}
        args: dict[str, Any] = {MANIFEST: ocp.args.JsonSave(manifest)}
        for name, tree in pytrees.items():
            args[name] = ocp.args.StandardSave(_storable(tree))
        for name, value in json_items.items():
            args[name] = ocp.args.JsonSave(value)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)
        except BaseException:
            # Reopen: the manager's state after a failed save is not to be trusted. The
            # partial `<step>.orbax-checkpoint-tmp` stays (threads of the failed save may
            # still touch it); orbax replaces it when that step is saved again, and a
            # Checkpointer opened later (e.g. after a restart) deletes it before its first save.
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - already failing; keep the original error
                pass
            self._manager = self._open(cleanup=False)
            raise

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    # -- restore
    def restore(self, step: int | None = None, *, targets: Mapping[str, PyTree] | None = None) -> Restored:
        """Read checkpoint `step` (default: the latest).

        `targets` maps pytree item names to example trees (arrays or ShapeDtypeStructs);
        listed items come back with exactly that structure/dtype/sharding, others generic.
        Raises FileNotFoundError when there is no such checkpoint.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        targets = dict(targets or {})
        manifest = self._manager.restore(step, args=ocp.args.Composite(**{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST]
        unknown = set(targets) - set(manifest["pytrees"])
        if unknown:
            raise KeyError(f"checkpoint step {step} has no pytree item(s) {sorted(unknown)}; has {manifest['pytrees']}")
        args: dict[str, Any] = {}
        for name in manifest["pytrees"]:
            target = targets.get(name)
            args[name] = ocp.args.StandardRestore(_abstract(target) if target is not None else None)
        for name in manifest["json"]:
            args[name] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**args))
        pytrees = {name: _unwrap(out[name], targets.get(name)) for name in manifest["pytrees"]}
        json_items = {name: out[name] for name in manifest["json"]}
        return Restored(step=int(step), pytrees=pytrees, json_items=json_items)

    # -- lifetime
    def close(self) -> None:
        """Finish pending writes and release orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PreemptionFlag:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

        with PreemptionFlag() as flag:
            for step in ...:
                ...
                if flag.requested:
                    save a checkpoint; break

    The first signal sets `requested` (and `signal_name`); a second SIGINT raises
    KeyboardInterrupt so Ctrl-C twice still stops a stuck run. Previous handlers are
    restored on exit. Signal handlers can only be installed from the main thread; from
    another thread the flag is inert (never set by signals) but `request()` still works.
    Multi-host: each host sees its own signal; agree before acting (e.g. with
    `jax.experimental.multihost_utils.process_allgather` of the flag).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: tuple[int, ...] | None = None):
        self._signals = tuple(signals) if signals is not None else self.SIGNALS
        self._previous: dict[int, Any] = {}
        self.requested = False
        self.signal_name: str | None = None

    def request(self, name: str = "manual") -> None:
        """Set the flag as a signal would."""
        self.requested = True
        self.signal_name = name

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
