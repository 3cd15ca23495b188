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

Integrity: every save also writes a `checksums` JSON item (in the same atomic orbax save)
with the SHA-256 of every array leaf (dtype, shape and bytes) and of every JSON item (its
canonical JSON text, `json_digest`: the secret, the data position, the plan, the ledger, the
config, the individual-accounting state); `restore` recomputes them on what it read, and so does
`read_json_item`, which reads one JSON item alone (the config, before any array is read; checkpoints
written before the JSON digests existed have their JSON items unchecked). A checksum mismatch, an unreadable item (orbax DATA_LOSS, a missing
item, truncated JSON) makes `restore` raise `CorruptCheckpoint` (a `dpft.errors.CheckpointError`)
naming the step and what failed; the training loop then falls back to the newest intact
checkpoint (`dpft.train.loop.Trainer.restore`) and moves the corrupt one aside with
`quarantine`. A replicated array of a multi-process run is hashed from this process's copy (all
of it is here); arrays sharded across processes cannot be hashed here: they are listed under
`unchecked` in the item and counted in `Restored.unchecked`.

Readers: `Checkpointer(workdir, read_only=True)` never creates, deletes or cleans anything
(`dpft evaluate` uses it on a workdir that may be training); `pinned(workdir, step)` gives a
read-only Checkpointer on a hard-linked snapshot of one step, so that keep-N cleanup of a
live run cannot delete the files being read.

Remote workdirs (`gs://...`): orbax writes there natively (its own commit protocol for object
stores, where a rename is not atomic: a step counts only once its commit marker exists); the
checksums are verified on restore as locally. A bucket has no hard links, so `pinned` copies the
step (only the items the reader asks for) into a private local temporary directory and checks,
after the copy, that the step is still a complete checkpoint with the very same objects (names
and sizes) as before it; otherwise (a keep-N cleanup deleted it meanwhile) the copy is thrown
away and the then-latest step copied instead (an explicit step fails). `quarantine` moves a
corrupt step by copy-and-delete.

Replicated arrays: orbax's default `ArrayHandler` on CPU splits every replicated array into one
slice per replica ("replica-parallel" saving), each slice an eager `jax.lax.slice` dispatch. With 8
devices a small model's ~100 leaves become ~800 dispatches per save (a 6-update nfnet_micro run on 8
CPU devices spent 4.1 of its 22 s there). `Checkpointer` registers orbax's `ArrayHandler` with
`min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES` (orbax's public
`type_handlers.register_type_handler`; process-wide, as orbax's registry is): arrays whose slices
would be smaller are written whole by replica 0; big arrays still spread over replicas, and on GPU
orbax's default (no replica-parallel) is kept. The bytes on disk are the same either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpft import atomic_io, paths, remote_files
from dpft.errors import CheckpointError, FilesystemError, describe_oserror, filesystem_cause

PyTree = Any
T = TypeVar("T")
MANIFEST = "manifest"
CHECKSUMS = "checksums"
RESERVED = (MANIFEST, CHECKSUMS)
CHECKSUM_FORMAT = "dpft.checksums/1"
QUARANTINE_DIR = "corrupt_checkpoints"
PIN_DIR = ".pins"
_WRAP = "__value__"  # orbax StandardSave refuses a bare array: store {"__value__": x}
REPLICA_PARALLEL_MIN_BYTES = 1 << 20  # bytes per replica slice below which a replicated array is written whole


class CorruptCheckpoint(CheckpointError):
    """Checkpoint `step` cannot be read back as written (`reason` says what failed)."""

    def __init__(self, step: int, directory: str, reason: str):
        self.step, self.directory, self.reason = int(step), directory, reason
        super().__init__(f"checkpoint {directory}/{step} is corrupt: {reason}")


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`WORKDIR/checkpoints` (absolute; a URL for a remote workdir)."""
    return paths.join(paths.absolute(workdir), "checkpoints")


def _options(keep: int | None, async_save: bool, read_only: bool = False) -> ocp.CheckpointManagerOptions:
    """Writers run on every process of a job together (orbax synchronises them: the primary host
    writes metadata, each process its shards). A reader (`read_only`) is this process's own: in a
    multi-process job each process opens and reads on its own, with no barrier the others must join
    (process 0 alone may look up the latest step; `dpft evaluate` pins a snapshot per process)."""
    extra = {}
    if read_only:
        import jax

        if jax.process_count() > 1:
            me = jax.process_index()
            extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"dpft-reader-{me}-{uuid.uuid4().hex}")
    return ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        **extra,
    )


def _use_whole_small_arrays() -> None:
    """Registers orbax's ArrayHandler with a minimum replica-slice size (module docstring). Keeps
    orbax's own default for whether to split at all (off on GPU, on elsewhere)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
        override=True)


def _path_part(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_name(path: tuple) -> str:
    """A container-neutral leaf name ('opt_state/0/mu/w'): tuple/list and dict/namedtuple agree."""
    return "/".join(_path_part(k) for k in path)


def _digest(x: Any) -> str | None:
    """SHA-256 of dtype, shape and bytes of an array leaf; None if its whole value is not here (a
    replicated array of a multi-process run is: every process holds all of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            return None
        x = x.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON item's canonical text (sorted keys, no spaces): the same for the value saved and
    the value JSON-restored (tuples become lists either way)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tree_checksums(tree: PyTree) -> tuple[dict[str, str], list[str]]:
    """({leaf name: sha256}, [leaf names not fully addressable here]) of a storable pytree."""
    sums, unchecked = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _leaf_name(path)
        d = _digest(leaf)
        if d is None:
            unchecked.append(name)
        else:
            sums[name] = d
    return sums, unchecked


_STORAGE_MARKERS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded",
                    "Read-only file system", "Permission denied", "File too large")


def storage_failure(e: BaseException) -> str | None:
    """A one-line description when `e` (or its cause chain) is the filesystem refusing a write.

    orbax/tensorstore report a full disk as `ValueError: RESOURCE_EXHAUSTED: ...`, not as OSError.
    """
    cause = filesystem_cause(e)
    if cause is not None:
        return describe_oserror(cause)
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        text = str(node)
        for marker in _STORAGE_MARKERS:
            if marker in text:
                return marker if marker != "RESOURCE_EXHAUSTED" else "RESOURCE_EXHAUSTED (disk full?)"
        node = node.__cause__ or node.__context__
    return None


def _settle(threads_before: set[threading.Thread], timeout: float = 30.0) -> None:
    """Join the threads started since `threads_before` (orbax's writers of a failed save), then
    collect garbage, so that their own error logs come before dpft's one-line error."""
    import gc

    deadline = time.time() + timeout
    for t in set(threading.enumerate()) - threads_before:
        if t is not threading.current_thread():
            try:
                t.join(max(0.0, deadline - time.time()))
            except Exception:  # noqa: BLE001 - orbax's writer threads re-raise their failure on join;
                pass  # the save's own exception (being handled) reports it
    gc.collect()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def json_item_problem(checksums: Mapping[str, Any], name: str, value: Any) -> str | None:
    """Why JSON item `name` (read back as `value`) does not match its digest in the checksum record
    `checksums` (a step's `checksums` item), or None when it matches or the record predates JSON
    digests (no "json" entry: an older checkpoint, unchecked)."""
    saved = checksums.get("json")
    if saved is None:
        return None
    if not isinstance(saved, dict) or name not in saved:
        return f"no checksum for JSON item {name!r}"
    if json_digest(value) != saved[name]:
        return f"item {name!r}: checksum mismatch (its JSON was edited or damaged)"
    return None


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in `WORKDIR/checkpoints`, or None if there is none."""
    directory = checkpoint_dir(workdir)
    if not paths.isdir(directory):
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
    verified: int = 0  # array leaves whose checksum matched
    unchecked: int = 0  # array leaves (or files a JSON item points to) without a checksum: an old checkpoint


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

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = False,
                 read_only: bool = False):
        """`read_only=True`: never create, clean up or delete anything (readers of a live workdir);
        raises CheckpointError when `WORKDIR/checkpoints` does not exist."""
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep!r}: must keep at least one checkpoint")
        self.workdir = paths.absolute(workdir)
        self.directory = checkpoint_dir(workdir)
        self.read_only = read_only
        self._keep = None if read_only else keep
        self._async = async_save
        if read_only and not paths.isdir(self.directory):
            raise CheckpointError(f"{self.workdir}: no checkpoints directory ({self.directory} does not exist)")
        if not read_only:
            # Owner-only from before the first save: a checkpoint holds the run's secret (the noise),
            # and the files orbax writes in it get the umask's modes (0644 under umask 022).
            atomic_io.make_dir(self.directory, private=True)
            _use_whole_small_arrays()
        self._manager = self._open()

    def _open(self, cleanup: bool = True) -> ocp.CheckpointManager:
        options = _options(self._keep, self._async, read_only=self.read_only)
        options.cleanup_tmp_directories = cleanup and not self.read_only
        try:
            return ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            cause = filesystem_cause(e)
            if cause is None:
                raise
            raise FilesystemError(cause.errno, f"cannot open checkpoints in {self.directory} "
                                  f"({describe_oserror(cause)})", self.directory) from e

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
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save step {step}")
        json_items = dict(json_items or {})
        names = list(pytrees) + list(json_items)
        if set(RESERVED) & set(names) or len(set(names)) != len(names):
            raise ValueError(f"checkpoint item names must be unique and not {RESERVED}: {names}")
        for name, value in json_items.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"checkpoint JSON item {name!r} is not JSON-serialisable: {e}") from None
        manifest = {"format": 2, "pytrees": sorted(pytrees), "json": sorted(json_items), "checksums": True}
        args: dict[str, Any] = {MANIFEST: ocp.args.JsonSave(manifest)}
        checksums: dict[str, Any] = {"format": CHECKSUM_FORMAT, "algorithm": "sha256", "items": {}, "unchecked": {}}
        for name, tree in pytrees.items():
            storable = _storable(tree)
            checksums["items"][name], checksums["unchecked"][name] = tree_checksums(storable)
            args[name] = ocp.args.StandardSave(storable)
        checksums["json"] = {name: json_digest(value) for name, value in json_items.items()}
        args[CHECKSUMS] = ocp.args.JsonSave(checksums)
        for name, value in json_items.items():
            args[name] = ocp.args.JsonSave(value)
        threads_before = set(threading.enumerate())
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)
        except BaseException as e:
            # Reopen: the manager's state after a failed save is not to be trusted. The
            # partial `<step>.orbax-checkpoint-tmp` stays (threads of the failed save may
            # still touch it); orbax replaces it when that step is saved again, and a
            # Checkpointer opened later (e.g. after a restart) deletes it before its first save.
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - already failing; keep the original error
                pass
            self._manager = self._open(cleanup=False)
            _settle(threads_before)  # let orbax's failing writer threads finish (and log) first
            failure = storage_failure(e) if isinstance(e, Exception) else None
            if failure is not None:
                cause = filesystem_cause(e)
                raise FilesystemError(cause.errno if cause else 0, f"cannot save checkpoint {step} in "
                                      f"{self.directory}: {failure}; the previous checkpoints are intact",
                                      self.directory) from e
            raise

    def wait(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    # -- restore
    def restore(self, step: int | None = None, *, targets: Mapping[str, PyTree] | None = None,
                items: Any = None) -> Restored:
        """Read checkpoint `step` (default: the latest) and verify its checksums.

        `targets` maps pytree item names to example trees (arrays or ShapeDtypeStructs);
        listed items come back with exactly that structure/dtype/sharding, others generic.
        `items` (optional): read only these pytree/JSON items (plus every target; names the
        checkpoint does not hold are skipped), e.g. evaluation needs no optimizer state.
        Raises FileNotFoundError when there is no such checkpoint, KeyError for a target
        the checkpoint does not hold, and CorruptCheckpoint when an item cannot be read or
        an array's checksum does not match.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        targets = dict(targets or {})
        try:
            manifest = self._manager.restore(
                step, args=ocp.args.Composite(**{MANIFEST: ocp.args.JsonRestore()}))[MANIFEST]
            if not isinstance(manifest, dict) or not {"pytrees", "json"} <= set(manifest):
                raise ValueError(f"manifest is not a dpft manifest: {manifest!r}"[:300])
        except Exception as e:  # noqa: BLE001 - any failure to read is corruption of this step
            raise CorruptCheckpoint(step, self.directory, f"item {MANIFEST!r}: {_first_line(e)}") from e
        unknown = set(targets) - set(manifest["pytrees"])
        if unknown:
            raise KeyError(f"checkpoint step {step} has no pytree item(s) {sorted(unknown)}; has {manifest['pytrees']}")
        has_sums = bool(manifest.get("checksums"))
        out: dict[str, Any] = {}
        if items is not None:
            wanted = set(items) | set(targets)
            manifest = {**manifest, "pytrees": [n for n in manifest["pytrees"] if n in wanted],
                        "json": [n for n in manifest["json"] if n in wanted]}
        names = list(manifest["pytrees"]) + list(manifest["json"]) + ([CHECKSUMS] if has_sums else [])
        for name in names:  # item by item, so that the message names the unreadable one
            if name in manifest["pytrees"]:
                target = targets.get(name)
                arg = ocp.args.StandardRestore(_abstract(target) if target is not None else None)
            else:
                arg = ocp.args.JsonRestore()
            try:
                out[name] = self._manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
            except Exception as e:  # noqa: BLE001 - DATA_LOSS, missing item, truncated JSON, ...
                raise CorruptCheckpoint(step, self.directory, f"item {name!r}: {_first_line(e)}") from e
        verified, unchecked = 0, 0
        if has_sums:
            verified, unchecked = self._verify(step, out[CHECKSUMS], {n: out[n] for n in manifest["pytrees"]})
            self._verify_json(step, out[CHECKSUMS], {n: out[n] for n in manifest["json"]})
        else:
            unchecked = sum(len(jax.tree.leaves(out[n])) for n in manifest["pytrees"])
        pytrees = {name: _unwrap(out[name], targets.get(name)) for name in manifest["pytrees"]}
        json_items = {name: out[name] for name in manifest["json"]}
        return Restored(step=int(step), pytrees=pytrees, json_items=json_items,
                        verified=verified, unchecked=unchecked)

    def _verify(self, step: int, checksums: Any, trees: Mapping[str, PyTree]) -> tuple[int, int]:
        """Compare restored (storable) trees with the saved checksums -> (verified, unchecked)."""
        if not isinstance(checksums, dict) or checksums.get("format") != CHECKSUM_FORMAT:
            raise CorruptCheckpoint(step, self.directory, f"item {CHECKSUMS!r} is not a dpft checksum record")
        verified, unchecked = 0, 0
        for name, tree in trees.items():
            saved = checksums.get("items", {}).get(name)
            skipped = set(checksums.get("unchecked", {}).get(name, []))
            if not isinstance(saved, dict):
                raise CorruptCheckpoint(step, self.directory, f"no checksums for item {name!r}")
            now, not_here = tree_checksums(tree)
            if set(now) | set(not_here) != set(saved) | skipped:
                missing = sorted((set(saved) | skipped) ^ (set(now) | set(not_here)))
                raise CorruptCheckpoint(step, self.directory,
                                        f"item {name!r}: leaves differ from the saved ones ({missing[:3]})")
            bad = sorted(k for k in now if k in saved and now[k] != saved[k])
            if bad:
                raise CorruptCheckpoint(step, self.directory, f"item {name!r}: checksum mismatch in "
                                        f"{len(bad)} array(s) ({', '.join(bad[:3])})")
            verified += sum(1 for k in now if k in saved)
            unchecked += len(not_here) + sum(1 for k in now if k not in saved)
        return verified, unchecked

    def _verify_json(self, step: int, checksums: Mapping[str, Any], items: Mapping[str, Any]) -> None:
        """Compare restored JSON items with their saved digests (a record without "json": an older
        checkpoint, unchecked); CorruptCheckpoint naming the first edited or unlisted item."""
        for name, value in items.items():
            problem = json_item_problem(checksums, name, value)
            if problem is not None:
                raise CorruptCheckpoint(step, self.directory, problem)

    def refresh(self) -> None:
        """Reopen the orbax manager (after another process moved a step aside)."""
        self.wait()
        self._manager.close()
        self._manager = self._open(cleanup=False)

    def quarantine(self, step: int, reason: str) -> str:
        """Move corrupt checkpoint `step` to `WORKDIR/corrupt_checkpoints/<step>-<time>/` (with a
        REASON.txt) so that the run can save that step again; returns the new path."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot move step {step} aside")
        self.wait()
        src = paths.join(self.directory, str(int(step)))
        dest_root = paths.join(self.workdir, QUARANTINE_DIR)
        atomic_io.make_dir(dest_root, private=True)  # a corrupt checkpoint still holds the secret
        dest = paths.join(dest_root, f"{int(step)}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}")
        if paths.is_remote(src):
            paths.as_path(src).rename(dest)  # copy + delete on an object store
        else:
            os.replace(src, dest)
        atomic_io.write_text(paths.join(dest, "REASON.txt"), reason + "\n")
        self._manager.close()
        self._manager = self._open(cleanup=False)
        return dest

    def prune(self) -> list[int]:
        """Delete the oldest complete steps beyond `keep` (a run killed between orbax's save and its
        clean-up leaves more); returns the deleted steps. Call it only once the newest step was
        restored (verified): steps a restore passed over must be quarantined first."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot delete checkpoints")
        steps = self.all_steps()
        surplus = steps[:-self._keep] if self._keep is not None and len(steps) > self._keep else []
        for s in surplus:
            self._manager.delete(s)
        return surplus

    # -- lifetime
    def close(self) -> None:
        """Finish pending writes and release orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def newest_intact(ckpt: Checkpointer, read: Callable[[int], T], step: int | None = None, *,
                  report: Callable[[str], Any] = print) -> tuple[T | None, list[tuple[int, str]]]:
    """`read(step)` of the newest checkpoint that is not corrupt -> (result, [(skipped step, reason)]).

    `read` raises CorruptCheckpoint for a damaged step; each one is reported and passed over.
    With an explicit `step`, only that one is read (no fallback). Returns (None, []) when the
    directory holds no checkpoint at all; raises CheckpointError when it holds checkpoints but
    none is intact, or step directories orbax does not recognise (never start from scratch there).
    """
    if step is not None:
        return read(step), []
    steps = sorted(ckpt.all_steps(), reverse=True)
    skipped: list[tuple[int, str]] = []
    for s in steps:
        try:
            return read(s), skipped
        except CorruptCheckpoint as e:
            skipped.append((s, e.reason))
            report(f"WARNING: {e}; trying the previous checkpoint")
    if skipped:
        raise CheckpointError(
            f"{ckpt.directory}: no intact checkpoint ("
            + "; ".join(f"step {s}: {r}" for s, r in skipped)
            + f"); refusing to start from scratch over them: move {ckpt.directory} away to start over")
    strays = sorted(n for n in paths.listdir(ckpt.directory) if n.isdigit()) if paths.isdir(ckpt.directory) else []
    if strays:
        raise CheckpointError(f"{ckpt.directory}: step directories {strays} are not complete checkpoints; "
                              f"refusing to start from scratch over them: move {ckpt.directory} away to start over")
    return None, []


def _link_tree(src: str, dest: str) -> int:
    """Hard-link every file under `src` into `dest` (copy where links are refused); -> files copied."""
    copied = 0
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for name in files:
            a, b = os.path.join(root, name), os.path.join(dest, rel, name)
            try:
                os.link(a, b)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copy2(a, b)
                copied += 1
    return copied


def _copy_remote_step(src_root: str, step: int, dest: str, items: Any) -> tuple[int, int]:
    """Copy `src_root/<step>` (the step-level files, the manifest, the checksums and the items in
    `items`; all with None) into local `dest`, then check that the step still holds exactly the
    objects it held before the copy -> (files, bytes). FileNotFoundError when it changed or vanished."""
    src = paths.join(src_root, str(step))
    keep = None if items is None else set(items) | set(RESERVED)
    before = remote_files.list_files(src)
    if not before:
        raise FileNotFoundError(src)
    copied = remote_files.download_tree(src, dest, only=None if keep is None else (
        lambda rel: "/" not in rel or rel.split("/", 1)[0] in keep))
    if remote_files.list_files(src) != before:  # a cleanup deleted (part of) it meanwhile
        raise FileNotFoundError(src)
    return len(copied), sum(copied.values())


def _snapshot_step(workdir: str, step: int | None, steps: list[int], take: Callable[[int], T],
                   dest_root: str) -> tuple[int, T]:
    """Snapshot step `step` (None: the latest of `steps`) with `take(step)`, which writes it under
    `dest_root/<step>` and raises FileNotFoundError when the step vanished or changed meanwhile
    (a training run's keep-N cleanup); the partial snapshot is then removed and the then-latest step
    taken instead, up to 10 times (an explicit `step` fails at once) -> (step taken, take's result)."""
    for _ in range(10):
        chosen = step if step is not None else steps[-1]
        try:
            return chosen, take(chosen)
        except FileNotFoundError:
            shutil.rmtree(os.path.join(dest_root, str(chosen)), ignore_errors=True)
            with Checkpointer(workdir, read_only=True) as live:
                steps = live.all_steps()
            if step is not None or not steps:
                raise CheckpointError(f"{workdir}: checkpoint {chosen} was deleted while it was being "
                                      f"read (have {steps})") from None
    raise CheckpointError(f"{workdir}: checkpoints keep changing; could not snapshot one in 10 tries")


@contextlib.contextmanager
def _pinned_remote(workdir: str, step: int | None, steps: list[int], items: Any,
                   print_fn: Any) -> Iterator[tuple["Checkpointer", int]]:
    """`pinned` for a workdir on an object store: a verified local copy of the step (see module doc)."""
    src_root = checkpoint_dir(workdir)
    tmp = tempfile.mkdtemp(prefix="dpft-pin-")  # 0700: a checkpoint is private
    try:
        def take(chosen: int) -> tuple[int, int]:
            counts = _copy_remote_step(src_root, chosen, os.path.join(tmp, "checkpoints", str(chosen)), items)
            with Checkpointer(workdir, read_only=True) as live:
                if chosen not in live.all_steps():  # no longer a complete checkpoint
                    raise FileNotFoundError(chosen)
            return counts

        chosen, (n_files, n_bytes) = _snapshot_step(workdir, step, steps, take, os.path.join(tmp, "checkpoints"))
        print_fn(f"note: {workdir} is on an object store: reading checkpoint {chosen} from a verified local "
                 f"copy ({n_files} files, {n_bytes / 2**20:.1f} MiB)")
        with Checkpointer(tmp, read_only=True) as ckpt:
            yield ckpt, chosen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def pinned(workdir: str | os.PathLike, step: int | None = None, *, items: Any = None,
           print_fn: Any = print) -> Iterator[tuple["Checkpointer", int]]:
    """A read-only Checkpointer on a snapshot of step `step` (None: the latest) -> (ckpt, step).

    The snapshot is hard links under `WORKDIR/.pins/<unique>/checkpoints/<step>` (same
    filesystem, no data copied), so a training run's keep-N cleanup may delete the step
    meanwhile without touching what is read; removed on exit. If the step vanishes while it
    is linked, the latest step is taken again (an explicit `step` then fails). Where the
    workdir cannot be written (no live run can be writing it), the checkpoint is read in place.
    On an object store (`gs://...`, no hard links) the snapshot is a verified copy in a private
    local temporary directory holding only `items` (None: every item) of the step; see the
    module doc. Nothing is written to a remote workdir.
    """
    workdir = paths.absolute(workdir)
    src_root = checkpoint_dir(workdir)
    with Checkpointer(workdir, read_only=True) as live:
        steps = live.all_steps()
    if not steps:
        raise CheckpointError(f"{workdir}: no checkpoint found under {src_root}")
    if step is not None and step not in steps:
        raise CheckpointError(f"{workdir}: no checkpoint for update {step}; have {steps}")
    if paths.is_remote(workdir):
        with _pinned_remote(workdir, step, steps, items, print_fn) as pin:
            yield pin
        return
    pin = os.path.join(workdir, PIN_DIR, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        atomic_io.make_dir(os.path.join(workdir, PIN_DIR), private=True)  # hard links to the secret's files
        os.makedirs(os.path.join(pin, "checkpoints"))
    except OSError as e:
        print_fn(f"note: cannot pin a snapshot in {workdir} ({describe_oserror(e)}); reading in place")
        with Checkpointer(workdir, read_only=True) as ckpt:
            yield ckpt, step if step is not None else steps[-1]
        return
    try:
        def take(chosen: int) -> int:
            copied = _link_tree(os.path.join(src_root, str(chosen)), os.path.join(pin, "checkpoints", str(chosen)))
            if not os.path.isdir(os.path.join(src_root, str(chosen))):
                raise FileNotFoundError(chosen)
            return copied

        chosen, copied = _snapshot_step(workdir, step, steps, take, os.path.join(pin, "checkpoints"))
        if copied:
            print_fn(f"note: {copied} file(s) of checkpoint {chosen} copied (hard links refused)")
        with Checkpointer(pin, read_only=True) as ckpt:
            yield ckpt, chosen
    finally:
        shutil.rmtree(pin, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(workdir, PIN_DIR))  # only when no other reader pins


def read_json_item(checkpoint_directory: str, step: int, item: str) -> Any:
    """One JSON item (e.g. "config", "plan", "ledger") of checkpoint `step`, without reading arrays,
    checked as `Checkpointer.restore` checks it: its digest must equal the one in the step's checksum
    record. Raises CorruptCheckpoint naming the item when the manifest, the record or the item is
    unreadable, or the item was edited (a checkpoint without JSON digests: unchecked)."""
    def read(name: str) -> Any:
        try:
            with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
                return reader.restore(os.path.join(checkpoint_directory, str(step), name),
                                      args=ocp.args.JsonRestore())
        except Exception as e:  # noqa: BLE001 - missing item, truncated JSON, ...: this step is corrupt
            raise CorruptCheckpoint(step, checkpoint_directory, f"item {name!r}: {_first_line(e)}") from e

    manifest = read(MANIFEST)
    if not isinstance(manifest, dict) or not {"pytrees", "json"} <= set(manifest):
        raise CorruptCheckpoint(step, checkpoint_directory, f"item {MANIFEST!r}: not a dpft manifest")
    value = read(item)
    if manifest.get("checksums"):
        checksums = read(CHECKSUMS)
        if not isinstance(checksums, dict) or checksums.get("format") != CHECKSUM_FORMAT:
            raise CorruptCheckpoint(step, checkpoint_directory, f"item {CHECKSUMS!r} is not a dpft checksum record")
        problem = json_item_problem(checksums, item, value)
        if problem is not None:
            raise CorruptCheckpoint(step, checkpoint_directory, problem)
    return value
