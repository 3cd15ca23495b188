"""Individual (per-example) privacy accounting for DP-SGD (Yu et al. 2023).

In DP-SGD an example that adds c < S (the sensitivity) to the clipped sum is protected by a
larger *effective* noise multiplier sigma * S / c; c is the plan's `contribution_norm` of the
example's (K-view-averaged) gradient norm: min(||g||, C) for flat clipping, C ||g|| / (||g|| +
gamma) for automatic clipping. Tracking each example's norm over training therefore gives it
an individual epsilon <= the worst-case (data-independent) epsilon of the run.

Pieces (each pure numerics on numpy arrays, except the tiny recorder state):
- `NormRecorder`: for each example id, its gradient norm at each recorded update,
  rounded UP to a grid of width r (so an estimate never under-states the norm).
  Stored as uint16 grid indices [R, N]; plain data, saved as `.npz`.
- `individual_epsilons`: per example, the Poisson-subsampled Gaussian with the effective
  noise multiplier composed over the updates, with the RUN's accountant: PLD (one
  dp-accounting PLD per distinct history, built from cached self-composed pieces per
  contribution level) or RDP (RDP vectors per level, combined with one matrix product).
  `PrivacyPlan.individual_epsilons` calls it and caps the result at the run's epsilon.
- `summarise` / `group_stats`: q05..q95 and mean per subgroup and per class (no min/max; no
  statistics for groups below `min_group_size`), Spearman correlation with loss.
- `write_individual_epsilons`: `WORKDIR/individual_epsilon.npz` (owner-only, + a README warning).

The values are estimates, as in the paper: norms are measured every `every` updates
with the parameters of that update and held until the next record. They are *not* a
formal guarantee for any individual; the run's worst-case epsilon is.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dpft import atomic_io, paths

MISSING = np.iinfo(np.uint16).max  # grid index meaning "no norm recorded" (-> worst case)
MAX_BIN = MISSING - 1  # largest storable grid index; larger norms saturate here
# No min/max: each is one individual's value. Groups below `min_group_size` get no statistics.
QUANTILES: dict[str, float] = {"q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95}
MIN_GROUP_SIZE = 20
NPZ_NAME = "individual_epsilon.npz"
README_NAME = "INDIVIDUAL_PRIVACY_README.md"


def _readable(path: str | os.PathLike) -> Any:
    """`path` itself for a local file; the object's bytes (a BytesIO) for a remote URL."""
    if paths.is_remote(path):
        import io

        return io.BytesIO(paths.as_path(path).read_bytes())
    return path


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
        """Writes the state to `path` (.npz), atomically and owner-only (per-example norms)."""
        atomic_io.write_bytes(path, lambda f: np.savez(f, **self.state_dict()), private=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NormRecorder":
        try:
            with np.load(_readable(path), allow_pickle=False) as z:
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


def _contribution_levels(recorder: NormRecorder, sensitivity: float,
                         contribution: Callable[[np.ndarray], np.ndarray] | None
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct contribution norms and, per (record, example), the index of its level.

    Returns (values float64 [U] in [0, S], sorted, the last being S; inverse int [R, N]; index
    of S). A MISSING record counts as S (worst case); a contribution is clipped to S.
    """
    uniq_bins, inv = np.unique(np.append(recorder.bins.reshape(-1), MISSING), return_inverse=True)
    norms = uniq_bins.astype(np.float64) * recorder.grid_width
    values = np.minimum(norms, sensitivity) if contribution is None else np.minimum(
        np.asarray(contribution(norms), np.float64), sensitivity)
    values = np.where(uniq_bins == MISSING, sensitivity, values)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("contribution norms must be finite and >= 0")
    levels, level_of_bin = np.unique(values, return_inverse=True)
    inverse = level_of_bin[inv[:-1]].reshape(recorder.bins.shape)
    top = int(level_of_bin[inv[-1]])  # the level of MISSING, i.e. S (levels are <= S)
    return levels, inverse, top


def _histograms(recorder: NormRecorder, inverse: np.ndarray, top: int, num_levels: int, num_updates: int,
                start: int, stop: int) -> np.ndarray:
    """Number of updates [stop - start, U] each example spent at each contribution level."""
    before, counts = update_counts(recorder.update_indices, int(num_updates))
    hist = np.zeros([stop - start, num_levels], np.int64)
    rows = np.arange(stop - start)
    hist[:, top] += before
    for j, c in enumerate(counts):
        hist[rows, inverse[j, start:stop]] += c  # one entry per row: no duplicate indices
    return hist


def individual_epsilons(recorder: NormRecorder, *, sampling_rate: float, noise_multiplier: float,
                        sensitivity: float, num_updates: int, delta: float, accountant: str = "pld",
                        contribution: Callable[[np.ndarray], np.ndarray] | None = None,
                        orders: Sequence[float] | None = None, chunk_size: int = 65536) -> np.ndarray:
    """Individual epsilon [N] of each example after `num_updates` updates, with `accountant`
    ("pld", dp-accounting's PLD at the run's discretisation, or "rdp") -- the run's own.

    Update t charges PoissonSampled(q, Gaussian(sigma * S / c)), c = `contribution(n)` the L2 norm
    the example adds to the clipped sum at its rounded-up norm n of the latest record <= t (the
    plan's `contribution_norm`: min(n, C) for flat, C n / (n + gamma) for automatic clipping;
    default min(n, S)); c = 0 charges nothing. Updates before the first record and records that
    missed the example count as worst case (c = S). PLD composes, per distinct history, the
    self-composed PLD of each level (cached), exactly as the run's PLDAccountant would.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and > 0 for individual accounting; got {noise_multiplier}")
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"sensitivity must be finite and > 0; got {sensitivity}")
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be 'pld' or 'rdp'; got {accountant!r}")
    if sensitivity > MAX_BIN * recorder.grid_width:
        raise ValueError(f"sensitivity {sensitivity} exceeds the recorder's range {MAX_BIN} * grid_width "
                         f"{recorder.grid_width}; use a coarser grid_width")
    levels, inverse, top = _contribution_levels(recorder, sensitivity, contribution)
    sigmas = np.where(levels > 0, noise_multiplier * sensitivity / np.maximum(levels, 1e-300), np.inf)
    n = recorder.num_examples
    out = np.empty([n])
    if accountant == "rdp":
        orders = _default_orders() if orders is None else list(orders)
        table = np.stack([rdp_poisson_gaussian(sampling_rate, float(s), orders) for s in sigmas])
        # dp_accounting gives +inf RDP at orders it cannot bound (large q); 0 updates * inf would be
        # NaN in the product below, so use a finite stand-in far above any usable RDP.
        table = np.where(np.isfinite(table), table, INF_RDP)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            hist = _histograms(recorder, inverse, top, len(levels), num_updates, start, stop)
            out[start:stop] = rdp_to_epsilon(orders, hist @ table, delta)
        return out
    pieces = _PldPieces(sampling_rate, sigmas)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        hist = _histograms(recorder, inverse, top, len(levels), num_updates, start, stop)
        uniq, back = np.unique(hist, axis=0, return_inverse=True)
        eps = np.array([pieces.epsilon(row, delta) for row in uniq])
        out[start:stop] = eps[np.asarray(back).reshape(-1)]
    return out


class _PldPieces:
    """Self-composed PLDs of PoissonSampled(q, Gaussian(sigma_u)) per (level u, count), cached; the
    same construction as dp_accounting's PLDAccountant at dpft's discretisation."""

    def __init__(self, sampling_rate: float, sigmas: np.ndarray):
        self.q = float(sampling_rate)
        self.sigmas = sigmas
        self._cache: dict[tuple[int, int], Any] = {}

    def _piece(self, level: int, count: int):
        key = (level, count)
        if key not in self._cache:
            from dp_accounting.pld import privacy_loss_distribution as pld_lib

            from dpft.privacy.accounting import PLD_DISCRETIZATION
            self._cache[key] = pld_lib.from_gaussian_mechanism(
                standard_deviation=float(self.sigmas[level]), value_discretization_interval=PLD_DISCRETIZATION,
                sampling_prob=self.q).self_compose(int(count))
        return self._cache[key]

    def epsilon(self, hist_row: np.ndarray, delta: float) -> float:
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        from dpft.privacy.accounting import PLD_DISCRETIZATION
        total = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
        for level, count in enumerate(hist_row):
            if count > 0 and np.isfinite(self.sigmas[level]):
                total = total.compose(self._piece(level, int(count)))
        return float(total.get_epsilon_for_delta(delta))


def worst_case_epsilon(*, sampling_rate: float, noise_multiplier: float, num_updates: int,
                       delta: float, orders: Sequence[float] | None = None) -> float:
    """The data-independent RDP epsilon at these orders (what every example gets at norm >= C);
    for PLD runs the run's own epsilon (`PrivacyPlan.epsilon_after`) is the worst case."""
    orders = _default_orders() if orders is None else list(orders)
    rdp = num_updates * rdp_poisson_gaussian(sampling_rate, noise_multiplier, orders)
    return float(rdp_to_epsilon(orders, rdp, delta))


def group_stats(x: np.ndarray, min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """{"n", "mean", "q05".."q95"} of the values x [n]; only {"n", "suppressed": True} when
    n < min_group_size (statistics of tiny groups reveal individuals). Never min or max."""
    x = np.asarray(x, np.float64).reshape(-1)
    out: dict[str, Any] = {"n": int(x.size)}
    if x.size < max(int(min_group_size), 1):
        out["suppressed"] = True
        return out
    out.update({k: float(np.quantile(x, q)) for k, q in QUANTILES.items()})
    out["mean"] = float(np.mean(x))
    return out


def summarise(eps: np.ndarray, attrs: Mapping[str, Sequence[str]] | None, labels: np.ndarray | None = None,
              losses: np.ndarray | None = None, *, worst_case_epsilon: float | None = None,
              class_names: Sequence[str] | None = None, min_group_size: int = MIN_GROUP_SIZE) -> dict[str, Any]:
    """Distribution of individual epsilons [N], overall, per subgroup and per class.

    Args:
      eps: float [N]. attrs: name -> str [N]. labels: int [N] (multi-class) or 0/1
        [N, L] (multi-label: a class's group is its positive examples).
      losses: float [N] per-example training loss, for the Spearman correlation.
      min_group_size: groups (and classes) with fewer examples get no statistics (`group_stats`).
    Returns: {"num_examples", "worst_case_epsilon", "min_group_size", "overall": group_stats,
      "by_attribute": {name: {value: group_stats}}, "by_class": {name: group_stats},
      "spearman_loss": {"rho", "pvalue"} | None}.
    """
    eps = np.asarray(eps, np.float64).reshape(-1)
    n = eps.shape[0]
    stats = lambda x: group_stats(x, min_group_size)  # noqa: E731
    out: dict[str, Any] = {"num_examples": n, "worst_case_epsilon": worst_case_epsilon,
                           "min_group_size": int(min_group_size), "overall": stats(eps), "by_attribute": {},
                           "by_class": {}, "spearman_loss": None}
    for name, values in (attrs or {}).items():
        values = np.asarray(values).astype(str)
        if values.shape != (n,):
            raise ValueError(f"summarise: attribute {name!r} has shape {values.shape}; expected ({n},)")
        out["by_attribute"][name] = {v: stats(eps[values == v]) for v in sorted(set(values.tolist()))}
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
            out["by_class"][name] = stats(eps[sel])
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


@dataclasses.dataclass
class IndividualHook:
    """The training loop's hook for individual accounting: when to record per-example norms, how they
    travel with checkpoints, and what is written at the end. The loop only computes the norms.

    recorder: the rounded-up norms so far; last_losses: float [N] per-example training loss at the
    latest record (for the loss-vs-epsilon correlation); min_group_size: summaries suppress smaller groups.
    """

    recorder: NormRecorder
    min_group_size: int = MIN_GROUP_SIZE
    last_losses: np.ndarray | None = None

    @classmethod
    def create(cls, num_examples: int, *, grid_width: float, every: int,
               min_group_size: int = MIN_GROUP_SIZE) -> "IndividualHook":
        return cls(NormRecorder(num_examples=num_examples, grid_width=grid_width, every=every), int(min_group_size))

    def due(self, update: int) -> bool:
        """True when the norms at the parameters of `update` must be recorded before it runs."""
        return self.recorder.should_record(update)

    def record(self, update: int, norms: np.ndarray, losses: np.ndarray) -> None:
        """norms, losses: float [N] of every training example (table order) at update `update`."""
        self.recorder.record_all(update, norms)
        self.last_losses = np.asarray(losses, np.float64)

    def checkpoint_item(self, workdir: str, update: int, *, write: bool) -> dict[str, str]:
        """Saves the recorder as WORKDIR/individual_norms/<update>.npz (when `write`: process 0) and
        returns the checkpoint's JSON item {"norms_file": relative path}."""
        path = os.path.join(workdir, "individual_norms", f"{update}.npz")
        if write:
            atomic_io.make_dir(os.path.dirname(path))
            self.recorder.save(path)
        return {"norms_file": os.path.relpath(path, workdir)}

    def restore(self, workdir: str, item: Mapping[str, Any]) -> None:
        """Continues from a checkpoint's JSON item (`checkpoint_item`)."""
        self.recorder = NormRecorder.load(os.path.join(workdir, item["norms_file"]))

    def finish(self, workdir: str, plan: Any, updates: int, run_epsilon: float, columns: Mapping[str, np.ndarray],
               *, task: str, class_names: Sequence[str]) -> str:
        """Individual epsilons after `updates` by the run's plan (its accountant), their summary per
        attribute (and per class for multiclass) and the private files -> the .npz path.
        columns: example_id, label, attr_<name> of the training split, in table order."""
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting warns for every RDP order it drops
        eps = plan.individual_epsilons(self.recorder, updates)
        attrs = {k[len("attr_"):]: v for k, v in columns.items() if k.startswith("attr_")}
        if task == "multiclass":  # per-class distribution in the evaluation report
            names = list(class_names)
            attrs["class"] = np.asarray([names[int(y)] for y in columns["label"]], dtype=str)
        summary = summarise(eps, attrs, columns["label"], self.last_losses, worst_case_epsilon=run_epsilon,
                            class_names=class_names, min_group_size=self.min_group_size)
        summary["run_epsilon"] = {"value": run_epsilon, "accountant": plan.accountant}
        summary["accountant"] = plan.accountant
        summary["clipping"] = plan.clipping.mode
        return write_individual_epsilons(workdir, columns["example_id"], eps, attrs, summary=summary)


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
    atomic_io.make_dir(workdir)
    path = paths.join(workdir, NPZ_NAME)
    atomic_io.write_bytes(path, lambda f: np.savez(f, **arrays), private=True)  # per-example: owner-only
    atomic_io.write_text(paths.join(workdir, README_NAME), _README.format(npz=NPZ_NAME))
    if summary is not None:
        atomic_io.write_json(paths.join(workdir, "individual_epsilon.json"), summary,
                             indent=2, sort_keys=True, default=float)
    return path


def read_individual_epsilons(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an individual_epsilon.npz written by `write_individual_epsilons` (the one reader:
    training, evaluation reports and notebooks use it). UsageError naming the file and field."""
    from dpft.errors import UsageError

    try:
        with np.load(_readable(path), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{os.fspath(path)}: cannot read ({e})") from None
    for key in ("example_id", "epsilon"):
        if key not in out:
            raise UsageError(f"{os.fspath(path)}: field {key!r}: missing (fields present: {sorted(out)})")
    out["epsilon"] = np.asarray(out["epsilon"], np.float64).reshape(-1)
    for key in [k for k in out if k.startswith("attr_")]:
        out[key] = out[key].astype(str)
        if out[key].shape != out["epsilon"].shape:
            raise UsageError(f"{os.fspath(path)}: field {key!r}: shape {out[key].shape}, expected "
                             f"{out['epsilon'].shape}")
    return out
