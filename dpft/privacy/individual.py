"""Individual (per-example) privacy accounting for DP-SGD (Yu et al. 2023).

In DP-SGD an example whose gradient norm ||g|| stays below the clip norm C is
protected by a larger *effective* noise multiplier sigma * C / ||g||. Tracking each
example's gradient norm over training therefore gives it an individual epsilon
<= the worst-case (data-independent) epsilon of the run.

Pieces (each pure numerics on numpy arrays, except the tiny recorder state):
- `NormRecorder`: for each example id, its gradient norm at each recorded update,
  rounded UP to a grid of width r (so an estimate never under-states the norm).
  Stored as uint16 grid indices [R, N]; plain data, saved as `.npz`.
- `individual_epsilons`: per-example RDP of the Poisson-subsampled Gaussian with the
  effective noise multiplier, composed over the updates, converted to epsilon at delta.
  RDP vectors are computed once per distinct effective norm (few, thanks to the grid)
  and combined per example with one matrix product.
- `summarise`: quantiles per subgroup and per class, Spearman correlation with loss.
- `write_individual_epsilons`: `WORKDIR/individual_epsilon.npz` (+ a README warning).

The values are estimates, as in the paper: norms are measured every `every` updates
with the parameters of that update and held until the next record. They are *not* a
formal guarantee for any individual; the run's worst-case epsilon is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

MISSING = np.iinfo(np.uint16).max  # grid index meaning "no norm recorded" (-> worst case)
MAX_BIN = MISSING - 1  # largest storable grid index; larger norms saturate here
QUANTILES: dict[str, float] = {"min": 0.0, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
NPZ_NAME = "individual_epsilon.npz"
README_NAME = "INDIVIDUAL_PRIVACY_README.md"


def round_up_to_grid(norms: np.ndarray, grid_width: float) -> np.ndarray:
    """Grid indices k (uint16 [...]) with k * grid_width >= norm, the smallest such k.

    Norms above MAX_BIN * grid_width saturate at MAX_BIN (harmless while the clip norm
    is <= MAX_BIN * grid_width, which `individual_epsilons` checks).
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
        """All state as numpy arrays (for orbax checkpoints or `np.savez`)."""
        return {"num_examples": np.int64(self.num_examples), "grid_width": np.float64(self.grid_width),
                "every": np.int64(self.every), "update_indices": self.update_indices.copy(),
                "bins": self.bins.copy()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "NormRecorder":
        missing = {"num_examples", "grid_width", "every", "update_indices", "bins"} - set(state)
        if missing:
            raise ValueError(f"NormRecorder state lacks fields {sorted(missing)}")
        return cls(int(state["num_examples"]), float(state["grid_width"]), int(state["every"]),
                   np.asarray(state["update_indices"]), np.asarray(state["bins"]))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the state to `path` (.npz), atomically."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **self.state_dict())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NormRecorder":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls.from_state_dict({k: z[k] for k in z.files})
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read norm recorder {os.fspath(path)!r}: {e}") from e


def rdp_poisson_gaussian(sampling_rate: float, noise_multiplier: float, orders: Sequence[float]) -> np.ndarray:
    """RDP [O] of one Poisson-subsampled Gaussian step, via dp_accounting's RdpAccountant."""
    import dp_accounting

    if noise_multiplier == math.inf:
        return np.zeros(len(orders))
    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    acc.compose(dp_accounting.PoissonSampledDpEvent(
        float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))))
    return acc.rdp


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> np.ndarray:
    """Epsilon [...] at `delta` from RDP [..., O]; vectorised dp_accounting `compute_epsilon`.

    Same conversion (Prop. 12 of arXiv:2004.00010, orders <= 1.01 unused) so it matches
    `dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon` element by element.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    a = np.asarray(orders, np.float64)
    rdp = np.asarray(rdp, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        eps = rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)
        eps = np.where(a > 1.01, eps, np.inf)
        eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
        eps = np.where(rdp < 0, 0.0, eps)
    return np.maximum(0.0, eps.min(axis=-1))


def _default_orders() -> list[float]:
    from dp_accounting.rdp import rdp_privacy_accountant

    return list(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def update_counts(update_indices: np.ndarray, num_updates: int) -> tuple[int, np.ndarray]:
    """How many updates each record stands for: (updates before the first record, counts [R]).

    Record j covers updates [u_j, u_{j+1}); the last covers [u_R, num_updates).
    """
    u = np.asarray(update_indices, np.int64)
    if len(u) and u[-1] >= num_updates:
        raise ValueError(f"num_updates={num_updates} but a norm was recorded at update {int(u[-1])}")
    if len(u) == 0:
        return int(num_updates), np.zeros([0], np.int64)
    return int(u[0]), np.diff(np.append(u, num_updates))


INF_RDP = 1e100  # finite stand-in for an unbounded RDP order


def individual_epsilons(recorder: NormRecorder, *, sampling_rate: float, noise_multiplier: float,
                        clip_norm: float, num_updates: int, delta: float,
                        orders: Sequence[float] | None = None, chunk_size: int = 65536) -> np.ndarray:
    """Individual epsilon [N] of each example after `num_updates` updates.

    Update t is charged the RDP of PoissonSampled(q, Gaussian(sigma * C / min(n, C))), with
    n the example's rounded-up norm at the latest record <= t (0 -> no RDP). Updates before
    the first record, and records that missed the example, count as worst case (n >= C).
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for individual accounting; got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0; got {clip_norm}")
    if clip_norm > MAX_BIN * recorder.grid_width:
        raise ValueError(f"clip_norm {clip_norm} exceeds the recorder's range {MAX_BIN} * grid_width "
                         f"{recorder.grid_width}; use a coarser grid_width")
    orders = _default_orders() if orders is None else list(orders)
    before, counts = update_counts(recorder.update_indices, int(num_updates))

    # Effective norm level of each (record, example): min(k * r, C); MISSING -> C.
    top = math.ceil(clip_norm / recorder.grid_width)  # smallest k with k * r >= C, up to float noise
    top = top if top * recorder.grid_width >= clip_norm else top + 1
    levels = np.minimum(recorder.bins.astype(np.int64), top)  # MISSING > top -> top
    uniq, inverse = np.unique(np.append(levels.reshape(-1), top), return_inverse=True)
    inverse = inverse[:-1].reshape(levels.shape)
    table = np.zeros([len(uniq), len(orders)])  # RDP of one step at each level, computed once
    for i, k in enumerate(uniq):
        norm = min(k * recorder.grid_width, clip_norm)
        if norm > 0:
            table[i] = rdp_poisson_gaussian(sampling_rate, noise_multiplier * clip_norm / norm, orders)
    top_index = len(uniq) - 1  # uniq is sorted and contains `top`, the largest level
    # dp_accounting gives +inf RDP at orders it cannot bound (large q); 0 updates * inf would be
    # NaN in the product below, so use a finite stand-in far above any usable RDP (such an
    # order is never the minimiser of the conversion unless every order is, as with inf).
    table = np.where(np.isfinite(table), table, INF_RDP)

    n = recorder.num_examples
    out = np.empty([n])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        hist = np.zeros([stop - start, len(uniq)])  # number of updates at each level
        rows = np.arange(stop - start)
        hist[:, top_index] += before
        for j, c in enumerate(counts):
            hist[rows, inverse[j, start:stop]] += c  # one entry per row: no duplicate indices
        out[start:stop] = rdp_to_epsilon(orders, hist @ table, delta)
    return out


def worst_case_epsilon(*, sampling_rate: float, noise_multiplier: float, num_updates: int,
                       delta: float, orders: Sequence[float] | None = None) -> float:
    """The data-independent RDP epsilon of the same run (what every example is promised)."""
    orders = _default_orders() if orders is None else list(orders)
    rdp = num_updates * rdp_poisson_gaussian(sampling_rate, noise_multiplier, orders)
    return float(rdp_to_epsilon(orders, rdp, delta))


def _quantiles(x: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {"count": int(x.size)}
    if x.size:
        out.update({k: float(np.quantile(x, q)) for k, q in QUANTILES.items()})
        out["mean"] = float(np.mean(x))
    return out


def summarise(eps: np.ndarray, attrs: Mapping[str, Sequence[str]] | None, labels: np.ndarray | None,
              losses: np.ndarray | None = None, *, worst_case_epsilon: float | None = None,
              class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Distribution of individual epsilons [N], overall, per subgroup and per class.

    Args:
      eps: float [N]. attrs: name -> str [N]. labels: int [N] (multi-class) or 0/1
        [N, L] (multi-label: a class's group is its positive examples).
      losses: float [N] per-example training loss, for the Spearman correlation.
    Returns: {"num_examples", "worst_case_epsilon", "overall": {count, min, p5, ..., max,
      mean}, "by_attribute": {name: {value: quantiles}}, "by_class": {name: quantiles},
      "spearman_loss": {"rho", "pvalue"} | None}.
    """
    eps = np.asarray(eps, np.float64).reshape(-1)
    n = eps.shape[0]
    out: dict[str, Any] = {"num_examples": n, "worst_case_epsilon": worst_case_epsilon,
                           "overall": _quantiles(eps), "by_attribute": {}, "by_class": {},
                           "spearman_loss": None}
    for name, values in (attrs or {}).items():
        values = np.asarray(values).astype(str)
        if values.shape != (n,):
            raise ValueError(f"summarise: attribute {name!r} has shape {values.shape}; expected ({n},)")
        out["by_attribute"][name] = {v: _quantiles(eps[values == v]) for v in sorted(set(values.tolist()))}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[0] != n or labels.ndim not in (1, 2):
            raise ValueError(f"summarise: labels have shape {labels.shape}; expected ({n},) or ({n}, L)")
        if labels.ndim == 1:
            groups = {int(c): labels == c for c in np.unique(labels)}
        else:
            groups = {c: labels[:, c] > 0.5 for c in range(labels.shape[1])}
        for c, sel in groups.items():
            name = str(class_names[c]) if class_names is not None else str(c)
            out["by_class"][name] = _quantiles(eps[sel])
    if losses is not None:
        import scipy.stats

        losses = np.asarray(losses, np.float64).reshape(-1)
        if losses.shape != (n,):
            raise ValueError(f"summarise: losses have shape {losses.shape}; expected ({n},)")
        finite = np.isfinite(eps) & np.isfinite(losses)
        if finite.sum() >= 3 and np.ptp(eps[finite]) > 0 and np.ptp(losses[finite]) > 0:
            res = scipy.stats.spearmanr(eps[finite], losses[finite])
            out["spearman_loss"] = {"rho": float(res.statistic), "pvalue": float(res.pvalue)}
    return out


_README = """# Individual privacy values: sensitive data

`{npz}` holds one privacy-loss estimate (epsilon) per training example, keyed by
example id, with the example's subgroup attributes. These values are derived from each
individual's gradients and reveal information about the individuals in the training
data (e.g. which examples are atypical). Treat them as sensitive personal data:

- do not copy, publish or share this file, or per-example values from it, outside this
  workdir;
- only aggregate statistics (quantiles per subgroup, see `individual_epsilon.json`)
  may be reported.

The values are estimates (Yu et al. 2023, "Individual Privacy Accounting for
Differentially Private Stochastic Gradient Descent"); the formal guarantee of every
example is the run's worst-case epsilon.
"""


def write_individual_epsilons(workdir: str | os.PathLike, example_ids: np.ndarray, epsilons: np.ndarray,
                              attrs: Mapping[str, Sequence[str]] | None = None, *,
                              summary: Mapping[str, Any] | None = None) -> str:
    """Writes WORKDIR/individual_epsilon.npz (example_id [N], epsilon [N], attr_<name> [N]),
    the README warning beside it, and `summary` (aggregates only) to individual_epsilon.json.

    Returns the path of the .npz file.
    """
    ids = np.asarray(example_ids, np.int64).reshape(-1)
    eps = np.asarray(epsilons, np.float64).reshape(-1)
    if ids.shape != eps.shape:
        raise ValueError(f"write_individual_epsilons: {ids.shape[0]} example ids but {eps.shape[0]} epsilons")
    arrays: dict[str, np.ndarray] = {"example_id": ids, "epsilon": eps}
    for name, values in (attrs or {}).items():
        values = np.asarray(values).astype(str)
        if values.shape != ids.shape:
            raise ValueError(f"write_individual_epsilons: attribute {name!r} has {values.shape[0]} values, "
                             f"expected {ids.shape[0]}")
        arrays[f"attr_{name}"] = values
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, NPZ_NAME)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)
    with open(os.path.join(workdir, README_NAME), "w", encoding="utf-8") as f:
        f.write(_README.format(npz=NPZ_NAME))
    if summary is not None:
        with open(os.path.join(workdir, "individual_epsilon.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True, default=float)
    return path


def read_individual_epsilons(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an individual_epsilon.npz written by `write_individual_epsilons`."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for key in ("example_id", "epsilon"):
        if key not in out:
            raise ValueError(f"{os.fspath(path)!r} lacks the field {key!r}")
    return out
