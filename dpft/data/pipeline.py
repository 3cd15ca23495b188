"""The grain input pipeline: Poisson-selected training batches and in-order eval batches.

Training (`TrainIterator`): for update u, `dpft.privacy.sampling.poisson_selection(selection_seed,
u, N, q)` picks table positions (`selection_seed` is the run's SECRET selection stream,
`PrivacyPlan.selection_seed()`; `seed` is the public augmentation seed);
`physical_batches(..., num_shards, shard_index)` cuts this host's
part into fixed-size chunks padded with -1; only those rows are read and decoded (grain
`MapDataset` over the positions, `ReadOptions(num_threads=num_workers)` decoding threads;
PIL releases the GIL while decoding). Each example gets K views from
`example_rng(seed, u, example_id)`, so batches are a pure function of (config, u, chunk).
The iterator state is `{"update_index": u, "physical_batch_index": j}` (the next chunk to
produce): checkpoint it and `set_state` resumes exactly.

Batch format: docs/interfaces.md ("The training batch"). Evaluation (`eval_batches`):
`image` [B, H, W, C], `label`, `label_mask` (multilabel), `mask` [B], `example_id` [B]
(-1 padding), and for the predictions file `patient_id` str [B] and `attr_<name>` str [B]
("" for padding).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any, Iterator

import grain
import numpy as np

from dpft.data.augment import AugmentConfig, decode_image, eval_view, example_rng, train_views
from dpft.errors import DataError
from dpft.data.base import ExampleTable
from dpft.privacy.units import UnitIndex, unit_rows

log = logging.getLogger(__name__)
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training-input options. `sampling_rate` q = expected batch size / N (Poisson)."""

    sampling_rate: float
    physical_batch_size: int
    seed: int = 0  # public: augmentation
    selection_seed: int | None = dataclasses.field(default=None, repr=False)  # SECRET: Poisson selection
    num_workers: int = 0  # decoding threads; 0 = decode in the calling thread
    worker_processes: int = 0  # > 0: decode in this many spawned processes instead (persistent pool)
    num_shards: int = 1  # hosts; each decodes only its part of the selection
    shard_index: int = 0
    on_bad_image: str = "error"  # "error" | "skip" (the row becomes padding, counted and logged)
    #: BandMF's groups: > 1 selects by cyclic Poisson sampling (`sampling.cyclic_poisson_selection`), 1 Poisson.
    bands: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bands, bool) or not isinstance(self.bands, int) or self.bands < 1:
            raise DataError(f"data: bands must be an int >= 1, got {self.bands!r}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise DataError(f"data.sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if self.physical_batch_size < 1 or self.num_workers < 0 or self.worker_processes < 0:
            raise DataError(f"data: physical_batch_size >= 1 and num_workers >= 0 required, got "
                            f"{self.physical_batch_size}, {self.num_workers}")
        if not 0 <= self.shard_index < self.num_shards:
            raise DataError(f"data: shard_index {self.shard_index} not in [0, {self.num_shards})")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")


class _SkipCounter:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, where: str, err: Exception) -> None:
        with self._lock:
            self.count += 1
        log.warning("skipping bad image (%s): %s", where, err)


def _read_options(num_workers: int, batch_size: int) -> grain.ReadOptions:
    if num_workers <= 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=max(2 * batch_size, num_workers))


def _label_arrays(table: ExampleTable, rec: dict | None) -> tuple[Any, np.ndarray | None]:
    """(label, label_mask) of one record; zeros for padding (rec is None)."""
    if table.task == "multilabel":
        L = table.num_classes
        if rec is None:
            return np.zeros(L, np.float32), np.zeros(L, np.float32)
        return np.asarray(rec["label"], np.float32), np.asarray(rec["label_mask"], np.float32)
    return (0 if rec is None else int(rec["label"])), None


def load_train_row(table: ExampleTable, augment: AugmentConfig, seed: int, on_bad_image: str,
                   update_index: int, pos: int) -> tuple[dict, tuple[str, Exception] | None]:
    """One training row (K views, label, mask, example id) of table position `pos` (-1 = padding).

    Pure function of its arguments, so threads and processes give identical rows. Returns the
    row and, when a bad image was skipped (on_bad_image="skip"), (where, error) for the count.
    """
    k, s, ch = augment.augmult, augment.image_size, augment.channels
    rec, skipped = None, None
    if pos >= 0:
        rec = table[pos]
        try:
            views = train_views(rec["image"], example_rng(seed, update_index, rec["example_id"]), augment)
        except DataError as e:
            if on_bad_image == "error":
                raise DataError(f"{table.meta.name}/{table.split} row {pos} "
                                f"(example_id {rec['example_id']}): {e}") from e
            skipped = (f"{table.meta.name}/{table.split} row {pos}", e)
            rec = None
    if rec is None:
        views = np.zeros((k, s, s, ch), np.float32)
    label, label_mask = _label_arrays(table, rec)
    out = {"image": views, "example_id": -1 if rec is None else int(rec["example_id"]),
           "mask": 0.0 if rec is None else 1.0}
    if label_mask is None:
        out["label"] = np.full((k,), label, np.int32)
    else:
        out["label"] = np.broadcast_to(label, (k, label.shape[0])).astype(np.float32)
        out["label_mask"] = np.broadcast_to(label_mask, (k, label_mask.shape[0])).astype(np.float32)
    return out, skipped


def load_unit_row(table: ExampleTable, augment: AugmentConfig, seed: int, on_bad_image: str,
                  update_index: int, unit: int, positions: np.ndarray) -> tuple[dict, list[tuple[str, Exception]]]:
    """One training row of a privacy unit (a patient): its images `positions` [cap] (-1 = empty slot),
    unit id `unit` (-1 = padding unit). The K views of every slot are stacked: "image" [cap*K, ...],
    "label" [cap*K, ...], and "view_weight" [cap*K] = 1/K on the views of a real image, 0 elsewhere, so
    the unit's loss is the sum over its images of their augmult-averaged losses
    (`dpft.privacy.adapters`). A bad image skipped under on_bad_image="skip" gets weight 0 (and is
    counted with the skipped images; a unit left without images still counts as sampled)."""
    rows, skips = [], []
    for pos in np.asarray(positions, np.int64).reshape(-1):
        row, skipped = load_train_row(table, augment, seed, on_bad_image, update_index, int(pos) if unit >= 0 else -1)
        if skipped is not None:
            skips.append(skipped)
        rows.append(row)
    k = augment.augmult
    out = {key: np.concatenate([r[key] for r in rows]) for key in rows[0] if key not in ("mask", "example_id")}
    out["view_weight"] = np.repeat(np.asarray([r["mask"] for r in rows], np.float32) / k, k)
    out["example_id"] = int(unit) if unit >= 0 else -1
    out["mask"] = 1.0 if unit >= 0 else 0.0
    return out, skips


def load_any_row(table: ExampleTable, augment: AugmentConfig, seed: int, on_bad_image: str,
                 args: tuple) -> tuple[dict, list[tuple[str, Exception]]]:
    """(row, skipped images) of loader arguments `args`: (update, position) for an example row,
    (update, unit, its positions) for a unit row (`TrainIterator._load_args`)."""
    if len(args) == 3:
        return load_unit_row(table, augment, seed, on_bad_image, *args)
    row, skipped = load_train_row(table, augment, seed, on_bad_image, *args)
    return row, [] if skipped is None else [skipped]


_WORKER_STATE: dict[str, Any] = {}  # per decoding process: set once by _init_worker


def _init_worker(table: ExampleTable, augment: AugmentConfig, seed: int, on_bad_image: str,
                 units: UnitIndex | None = None) -> None:
    _WORKER_STATE.update(table=table, augment=augment, seed=seed, on_bad_image=on_bad_image, units=units)


def _worker_load(args: tuple) -> tuple[dict, list[tuple[str, str]]]:
    w = _WORKER_STATE
    row, skips = load_any_row(w["table"], w["augment"], w["seed"], w["on_bad_image"], args)
    return row, [(where, DataError(str(err))) for where, err in skips]


class TrainIterator:
    """Training batches of one host, update after update. See the module doc.

    Use:  `for batch in it.update_batches(): ...` gives the (remaining) physical batches of
    the current update; afterwards `it.state == {"update_index": u + 1, "physical_batch_index": 0}`.
    Iterating `it` itself yields batches across updates forever (read `it.state`).
    """

    def __init__(self, table: ExampleTable, config: TrainConfig, augment: AugmentConfig | None = None,
                 state: dict | None = None, units: UnitIndex | None = None) -> None:
        if len(table) == 0:
            raise DataError(f"{table.meta.name}/{table.split}: cannot train on an empty split")
        if units is not None and int(units.sizes.sum()) != len(table):
            raise DataError(f"{table.meta.name}/{table.split}: the unit index covers {int(units.sizes.sum())} rows, "
                            f"the split has {len(table)}")
        self.table = table
        self.units = units  # None: every row is a unit (example-level batches, no view_weight)
        self.config = config
        self.augment = augment or AugmentConfig()
        self._skips = _SkipCounter()
        self._pool = None
        self._update = 0
        self._chunk = 0
        if state is not None:
            self.set_state(state)

    # ---- state ----
    @property
    def state(self) -> dict:
        return {"update_index": self._update, "physical_batch_index": self._chunk}

    def get_state(self) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        try:
            u, j = int(state["update_index"]), int(state["physical_batch_index"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data iterator state must have integer update_index and physical_batch_index, "
                            f"got {state!r}") from e
        if u < 0 or j < 0:
            raise DataError(f"data iterator state must be non-negative, got {state!r}")
        self._update, self._chunk = u, j

    @property
    def skipped_images(self) -> int:
        return self._skips.count

    @property
    def num_units(self) -> int:
        """N: rows (example-level) or units (patients) that Poisson sampling draws from."""
        return len(self.table) if self.units is None else self.units.num_units

    @property
    def expected_batch_size(self) -> float:
        """q * N: the public constant the noisy sum is divided by (over all shards)."""
        return self.config.sampling_rate * self.num_units

    # ---- selection ----
    def selection(self, update_index: int) -> np.ndarray:
        """Sorted table positions (example-level) or unit ids selected (all shards) for `update_index`
        (cyclic Poisson over `config.bands` groups when bands > 1)."""
        from dpft.privacy.sampling import cyclic_poisson_selection, poisson_selection

        if self.config.selection_seed is None:
            raise DataError("TrainConfig.selection_seed is unset: pass the run's secret selection seed "
                            "(dpft.privacy.plan.PrivacyPlan.selection_seed())")
        if self.config.bands > 1:
            return np.asarray(cyclic_poisson_selection(int(self.config.selection_seed), int(update_index),
                                                       self.num_units, float(self.config.sampling_rate),
                                                       int(self.config.bands)), dtype=np.int64)
        return np.asarray(poisson_selection(int(self.config.selection_seed), int(update_index), self.num_units,
                                            float(self.config.sampling_rate)), dtype=np.int64)

    def chunks(self, update_index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This shard's physical chunks of `update_index`: [(positions padded with -1, mask)]."""
        from dpft.privacy.sampling import physical_batches

        c = self.config
        return physical_batches(self.selection(update_index), int(c.physical_batch_size),
                                num_shards=int(c.num_shards), shard_index=int(c.shard_index))

    # ---- loading ----
    def _load_args(self, update_index: int, positions: np.ndarray) -> list[tuple]:
        """The arguments of each row's loader: (update, position) or, for units, (update, unit, its rows)."""
        if self.units is None:
            return [(update_index, int(p)) for p in positions]
        rows = unit_rows(self.units, positions, seed=int(self.config.selection_seed), update_index=update_index)
        return [(update_index, int(u), r) for u, r in zip(positions, rows)]

    def _load(self, args: tuple) -> dict:
        row, skips = load_any_row(self.table, self.augment, self.config.seed, self.config.on_bad_image, args)
        for skipped in skips:
            self._skips.add(*skipped)
        return row

    def _process_pool(self):
        """A persistent pool of decoding processes (spawned once; each holds the table)."""
        if self._pool is None:
            import concurrent.futures
            import multiprocessing
            import weakref

            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.config.worker_processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.table, self.augment, self.config.seed, self.config.on_bad_image, self.units))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def _rows_in_processes(self, update_index: int, positions: np.ndarray) -> list[dict]:
        pool = self._process_pool()
        n = self.config.worker_processes
        chunksize = max(1, len(positions) // (4 * n))
        out = []
        for row, skips in pool.map(_worker_load, self._load_args(update_index, positions), chunksize=chunksize):
            for skipped in skips:
                self._skips.add(*skipped)
            out.append(row)
        return out

    @staticmethod
    def _collate(rows: list[dict]) -> dict:
        batch = {key: np.stack([r[key] for r in rows]) for key in rows[0] if key not in ("mask", "example_id")}
        batch["mask"] = np.asarray([r["mask"] for r in rows], np.float32)
        batch["example_id"] = np.asarray([r["example_id"] for r in rows], np.int32)
        return batch

    def batches_for_update(self, update_index: int, start: int = 0) -> Iterator[dict]:
        """Physical batches `start`, `start + 1`, ... of `update_index` for this shard (stateless)."""
        chunks = self.chunks(update_index)[start:]
        if not chunks:
            return
        b = self.config.physical_batch_size
        positions = np.concatenate([np.asarray(p, np.int64) for p, _ in chunks])
        masks = np.concatenate([np.asarray(m, np.float32) for _, m in chunks])
        if positions.shape[0] != b * len(chunks):
            raise DataError(f"physical_batches returned chunks not of size {b}")
        if np.any((positions >= 0) != (masks > 0)):
            raise DataError("physical_batches: mask disagrees with the -1 padding")
        if self.config.worker_processes > 0:
            # One physical batch at a time, so that a resume mid-update skips whole batches.
            for j in range(len(chunks)):
                yield self._collate(self._rows_in_processes(update_index, positions[j * b:(j + 1) * b]))
            return
        ds = (grain.MapDataset.source(self._load_args(update_index, positions))
              .map(self._load)
              .batch(b, batch_fn=self._collate))
        yield from ds.to_iter_dataset(_read_options(self.config.num_workers, b))

    def update_batches(self) -> Iterator[dict]:
        """The remaining batches of the current update; advances the state per batch."""
        u, j = self._update, self._chunk
        n = len(self.chunks(u))
        for batch in self.batches_for_update(u, start=j):
            j += 1
            if j >= n:
                self._update, self._chunk = u + 1, 0
            else:
                self._chunk = j
            yield batch
        if j >= n:  # also covers an update with no chunks
            self._update, self._chunk = u + 1, 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self.update_batches()


# ---------------------------------------------------------------- evaluation

def num_eval_batches(num_examples: int, batch_size: int, num_shards: int = 1) -> int:
    """Batches per shard to cover `num_examples` in order (the last ones padded)."""
    return max(1, math.ceil(num_examples / (batch_size * num_shards)))


def _shard_positions(num_examples: int, batch_size: int, num_shards: int, shard_index: int) -> np.ndarray:
    """This shard's table positions (-1 = padding) for in-order passes over a split: global batch
    g covers positions [g*B*S, (g+1)*B*S); shard s takes the s-th block of B."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"eval: shard_index {shard_index} not in [0, {num_shards})")
    nb = num_eval_batches(num_examples, batch_size, num_shards)
    pos = np.arange(nb * batch_size * num_shards).reshape(nb, num_shards, batch_size)[:, shard_index].reshape(-1)
    return np.where(pos < num_examples, pos, -1)


def train_view_batches(table: ExampleTable, *, batch_size: int, augment: AugmentConfig, seed: int,
                       update_index: int, num_workers: int = 0, num_shards: int = 1, shard_index: int = 0,
                       on_bad_image: str = "error", units: UnitIndex | None = None,
                       selection_seed: int | None = None) -> Iterator[dict]:
    """The whole split in order, as TRAINING batches (K augmented views of update `update_index`,
    the views training would use), fixed `batch_size`, mask 0 on padding; sharded as
    `eval_batches`. For measuring the norm of the gradient that training clips.
    With `units` (patients): every unit in order, each row holding the images update `update_index`
    would use (`unit_rows` with the secret `selection_seed`)."""
    pos = _shard_positions(len(table) if units is None else units.num_units, batch_size, num_shards, shard_index)
    skips = _SkipCounter()

    def load(p: int) -> dict:
        args: tuple = (update_index, p)
        if units is not None:
            args += (unit_rows(units, np.asarray([p]), seed=int(selection_seed), update_index=update_index)[0],)
        row, row_skips = load_any_row(table, augment, seed, on_bad_image, args)
        for skipped in row_skips:
            skips.add(*skipped)
        return row

    ds = (grain.MapDataset.source(pos.tolist()).map(lambda p: load(int(p)))
          .batch(batch_size, batch_fn=TrainIterator._collate))
    yield from ds.to_iter_dataset(_read_options(num_workers, batch_size))


def eval_batches(table: ExampleTable, *, batch_size: int, augment: AugmentConfig | None = None,
                 num_workers: int = 0, num_shards: int = 1, shard_index: int = 0,
                 on_bad_image: str = "error") -> Iterator[dict]:
    """The whole split in order, fixed `batch_size`, mask 0 on padding.

    Global batch g covers positions [g*B*S, (g+1)*B*S); shard s takes the s-th block of B.
    Every shard yields `num_eval_batches(N, B, S)` batches.
    """
    aug = augment or AugmentConfig()
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    pos = _shard_positions(len(table), batch_size, num_shards, shard_index)
    s = aug.eval_image_size or aug.image_size
    attr_names = table.attribute_names
    skips = _SkipCounter()

    def load(p: int) -> dict:
        rec = table[p] if p >= 0 else None
        img = np.zeros((s, s, aug.channels), np.float32)
        if rec is not None:
            try:
                img = eval_view(decode_image(rec["image"], channels=aug.channels), aug)
            except DataError as e:
                if on_bad_image == "error":
                    raise DataError(f"{table.meta.name}/{table.split} row {p}: {e}") from e
                skips.add(f"{table.meta.name}/{table.split} row {p}", e)
                rec = None
        label, label_mask = _label_arrays(table, rec)
        out = {"image": img, "label": label, "mask": 0.0 if rec is None else 1.0,
               "example_id": -1 if rec is None else int(rec["example_id"]),
               "patient_id": "" if rec is None else str(rec["patient_id"])}
        if label_mask is not None:
            out["label_mask"] = label_mask
        for a in attr_names:
            out[f"attr_{a}"] = "" if rec is None else str(rec["attrs"].get(a, "Unknown"))
        return out

    def collate(rows: list[dict]) -> dict:
        batch = {}
        for key in rows[0]:
            vals = [r[key] for r in rows]
            if key == "patient_id" or key.startswith("attr_"):
                batch[key] = np.asarray(vals, dtype=str)
            elif key == "example_id":
                batch[key] = np.asarray(vals, np.int32)
            elif key == "label" and table.task == "multiclass":
                batch[key] = np.asarray(vals, np.int32)
            else:
                batch[key] = np.stack(vals).astype(np.float32)
        return batch

    ds = grain.MapDataset.source(pos.tolist()).map(lambda p: load(int(p))).batch(batch_size, batch_fn=collate)
    yield from ds.to_iter_dataset(_read_options(num_workers, batch_size))
