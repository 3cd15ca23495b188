"""Per-example gradient norms over training: the record individual accounting is computed from.

`NormRecorder` is plain data (numpy arrays, `state_dict` / `from_state_dict`); it reads and
writes no files (`files.save_norms` / `files.load_norms` do, owner-only).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

MISSING = np.iinfo(np.uint16).max  # grid index meaning "no norm recorded" (-> worst case)
MAX_BIN = MISSING - 1  # largest storable grid index; larger norms saturate here
STATE_FIELDS = ("num_examples", "grid_width", "every", "update_indices", "bins")


def round_up_to_grid(norms: np.ndarray, grid_width: float) -> np.ndarray:
    """Grid indices k (uint16 [...]) with k * grid_width >= norm, the smallest such k.

    Norms above MAX_BIN * grid_width saturate at MAX_BIN (harmless while the clip norm
    is <= MAX_BIN * grid_width, which `epsilons.individual_epsilons` checks).
    """
    norms = np.asarray(norms, dtype=np.float64)
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        bad = norms[~(np.isfinite(norms) & (norms >= 0))][:3]
        raise ValueError(f"gradient norms must be finite and >= 0; got e.g. {bad.tolist()}")
    if not grid_width > 0:
        raise ValueError(f"grid_width must be > 0; got {grid_width}")
    k = np.ceil(norms / grid_width)
    k = np.where(k * grid_width < norms, k + 1, k)  # guard against float rounding down
    return np.minimum(k, MAX_BIN).astype(np.uint16)


@dataclasses.dataclass
class NormRecorder:
    """Rounded-up per-example gradient norms at the recorded updates (plain data).

    Attributes:
      num_examples: N, example ids are 0..N-1.
      grid_width: r, the rounding grid (same unit as the gradient norms / clip norm).
      every: the training loop records all N norms every `every` updates.
      update_indices: int64 [R], strictly increasing, the 0-based update index of each
        record (norms measured with the parameters used for that update).
      bins: uint16 [R, N], grid index ceil(norm / r); MISSING where an example was not
        recorded at that record (counted as worst case, norm >= C).
    """

    num_examples: int
    grid_width: float
    every: int = 1
    update_indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([0], np.int64))
    bins: np.ndarray | None = None

    def __post_init__(self) -> None:
        if int(self.num_examples) <= 0:
            raise ValueError(f"NormRecorder.num_examples must be > 0; got {self.num_examples}")
        if not float(self.grid_width) > 0:
            raise ValueError(f"NormRecorder.grid_width must be > 0; got {self.grid_width}")
        if int(self.every) <= 0:
            raise ValueError(f"NormRecorder.every must be >= 1; got {self.every}")
        self.num_examples, self.grid_width, self.every = int(self.num_examples), float(self.grid_width), int(self.every)
        self.update_indices = np.asarray(self.update_indices, np.int64).reshape(-1)
        if self.bins is None:
            self.bins = np.full([len(self.update_indices), self.num_examples], MISSING, np.uint16)
        self.bins = np.asarray(self.bins, np.uint16)
        if self.bins.shape != (len(self.update_indices), self.num_examples):
            raise ValueError(
                f"NormRecorder.bins has shape {self.bins.shape}; expected "
                f"({len(self.update_indices)}, {self.num_examples})")
        if np.any(np.diff(self.update_indices) <= 0):
            raise ValueError(f"NormRecorder.update_indices must increase strictly; got {self.update_indices.tolist()}")

    @property
    def num_records(self) -> int:
        return len(self.update_indices)

    def should_record(self, update_index: int) -> bool:
        """True when the loop should measure all norms before update `update_index`."""
        return update_index % self.every == 0

    def record(self, update_index: int, example_ids: np.ndarray, norms: np.ndarray,
               mask: np.ndarray | None = None) -> None:
        """Records norms [B] of examples `example_ids` [B] (rows with mask [B] == 0 ignored).

        Several calls with the same `update_index` fill the same record (batches of one
        no-noise pass over the data); a new, larger index starts a new record.
        """
        update_index = int(update_index)
        ids = np.asarray(example_ids).reshape(-1)
        norms = np.asarray(norms, np.float64).reshape(-1)
        keep = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).reshape(-1) > 0
        if not ids.shape == norms.shape == keep.shape:
            raise ValueError(f"record: example_ids {ids.shape}, norms {norms.shape}, mask {keep.shape} differ")
        ids, norms = ids[keep].astype(np.int64), norms[keep]
        if np.any((ids < 0) | (ids >= self.num_examples)):
            raise ValueError(f"record: example ids must be in [0, {self.num_examples}); "
                             f"got e.g. {ids[(ids < 0) | (ids >= self.num_examples)][:3].tolist()}")
        if update_index < 0:
            raise ValueError(f"record: update_index must be >= 0; got {update_index}")
        last = int(self.update_indices[-1]) if self.num_records else -1
        if update_index < last:
            raise ValueError(f"record: update_index {update_index} precedes the last record {last}; "
                             "call truncate(update_index) first when resuming from an older checkpoint")
        if update_index > last:
            self.update_indices = np.append(self.update_indices, np.int64(update_index))
            self.bins = np.concatenate([self.bins, np.full([1, self.num_examples], MISSING, np.uint16)])
        self.bins[-1, ids] = round_up_to_grid(norms, self.grid_width)

    def record_all(self, update_index: int, norms_by_example_id: np.ndarray) -> None:
        """Records the norms [N] of all examples (index = example id) before an update."""
        norms = np.asarray(norms_by_example_id).reshape(-1)
        if norms.shape[0] != self.num_examples:
            raise ValueError(f"record_all: expected {self.num_examples} norms, got {norms.shape[0]}")
        self.record(update_index, np.arange(self.num_examples), norms)

    def truncate(self, update_index: int) -> None:
        """Drops records at updates >= update_index (resume from an older checkpoint)."""
        keep = self.update_indices < int(update_index)
        self.update_indices, self.bins = self.update_indices[keep], self.bins[keep]

    def state_dict(self) -> dict[str, np.ndarray]:
        """All state as numpy arrays (for orbax checkpoints or `np.savez`), keys STATE_FIELDS."""
        return {"num_examples": np.int64(self.num_examples), "grid_width": np.float64(self.grid_width),
                "every": np.int64(self.every), "update_indices": self.update_indices.copy(),
                "bins": self.bins.copy()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "NormRecorder":
        missing = set(STATE_FIELDS) - set(state)
        if missing:
            raise ValueError(f"NormRecorder state lacks fields {sorted(missing)}")
        return cls(int(state["num_examples"]), float(state["grid_width"]), int(state["every"]),
                   np.asarray(state["update_indices"]), np.asarray(state["bins"]))


def update_counts(update_indices: np.ndarray, num_updates: int) -> tuple[int, np.ndarray]:
    """How many updates each record stands for: (updates before the first record, counts int64 [R]).

    Record j covers updates [u_j, u_{j+1}); the last covers [u_R, num_updates).
    """
    u = np.asarray(update_indices, np.int64)
    if len(u) and u[-1] >= num_updates:
        raise ValueError(f"num_updates={num_updates} but a norm was recorded at update {int(u[-1])}")
    if len(u) == 0:
        return int(num_updates), np.zeros([0], np.int64)
    return int(u[0]), np.diff(np.append(u, num_updates))
