"""Which examples take part in each optimizer update (host-side numpy, no jax).

Poisson selection (the default, what the accountant assumes): for update t every example
is included independently with probability q, from a counter-based generator
(numpy Philox seeded with (secret seed, t, tag)), so every host computes the same global
selection from (seed, t) alone, cheaply for N up to millions, and a resumed run
reproduces it exactly.

Physical batches: the selected indices are dealt round-robin to `num_shards` shards and
cut into fixed-shape chunks of `physical_batch_size`, padded with index -1 / mask 0.
Every shard runs ceil(max_s |shard s| / physical_batch_size) chunks (at least one), so
all hosts take the same number of steps.

NO truncation cap: a realised batch larger than expected simply takes more physical
batches, so the Poisson sampling guarantee the accountant uses holds exactly. The price
is a timing side channel: the wall-clock time (number of physical batches) of an update
reveals roughly how many examples were sampled. That count is the one thing an observer
of the timing learns; DP of the model output is not affected, but do not publish
per-update timings if that matters to you.

Cyclic Poisson selection (BandMF, `bands` b > 1): each example is put once into one of b groups,
independently and uniformly, from the secret (`group_members`: jax_privacy's INDEPENDENT partition,
the one compatible with add-or-remove-one neighbours; an equal split is not); update t samples
group t mod b, each member independently at rate b*q (expected batch q N). An example is only ever
selected at updates congruent to its group mod b: participations are at least b apart (b-min-sep),
what BandMF's amplified accounting assumes. b = 1 is `poisson_selection` exactly.

There is no shuffled (fixed-size) batching: the accountant analyses Poisson sampling, and
that is the only selection dpft runs.

The selection seed is secret (`dpft.privacy.keys.selection_entropy` of the run's CSPRNG
secret): which examples an update used is itself private.
"""
from __future__ import annotations

import functools

import numpy as np

_POISSON_TAG = 0x5053  # "PS": separates these streams from other users of (seed, index)
_PARTITION_TAG = 0x4350  # "CP": the cyclic-Poisson partition (one permutation per run)


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _generator(seed: int, index: int, tag: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, index, tag])))


def expected_batch_size(num_examples: int, sampling_rate: float) -> float:
    """N * q: the public constant the noisy gradient sum is divided by."""
    _check_rate(sampling_rate)
    if _check_nonneg_int("num_examples", num_examples) < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples!r}")
    return float(num_examples) * float(sampling_rate)


def _check_rate(sampling_rate: float) -> None:
    if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")


def poisson_selection(seed: int, update_index: int, num_examples: int, sampling_rate: float) -> np.ndarray:
    """Sorted int64 indices in [0, N) of the examples selected for update `update_index`.

    Each example is selected independently with probability `sampling_rate`; the result is
    a pure function of (seed, update_index, num_examples, sampling_rate).
    """
    seed = _check_nonneg_int("seed", seed)
    update_index = _check_nonneg_int("update_index", update_index)
    num_examples = _check_nonneg_int("num_examples", num_examples)
    _check_rate(sampling_rate)
    rng = _generator(seed, update_index, _POISSON_TAG)
    return np.flatnonzero(rng.random(num_examples) < sampling_rate).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _partition(seed: int, num_examples: int, bands: int) -> tuple[np.ndarray, ...]:
    # Example i's group is the i-th draw of a stream of (seed, bands): independent of N and of the others.
    group_of = _generator(seed, bands, _PARTITION_TAG).integers(0, bands, size=num_examples)
    groups = tuple(np.flatnonzero(group_of == g).astype(np.int64) for g in range(bands))
    for g in groups:
        g.setflags(write=False)
    return groups


def group_members(seed: int, num_examples: int, bands: int, group: int) -> np.ndarray:
    """Sorted int64 positions of group `group` of the run's secret partition of [0, N) into `bands` groups:
    each example's group uniform in [0, bands), independently of the others (sizes Binomial(N, 1/bands))."""
    seed = _check_nonneg_int("seed", seed)
    num_examples = _check_nonneg_int("num_examples", num_examples)
    if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or not 1 <= bands <= max(1, num_examples):
        raise ValueError(f"bands must be an int in [1, N={num_examples}], got {bands!r}")
    if not 0 <= group < bands:
        raise ValueError(f"group must be in [0, {bands}), got {group!r}")
    return _partition(seed, num_examples, int(bands))[int(group)]


def cyclic_poisson_selection(seed: int, update_index: int, num_examples: int, sampling_rate: float,
                             bands: int) -> np.ndarray:
    """Sorted int64 indices in [0, N) selected for update `update_index` by cyclic Poisson sampling: the
    members of group update_index mod `bands` (`group_members`), each with probability bands*q.

    bands = 1 is `poisson_selection(seed, update_index, N, q)`, draw for draw.
    """
    _check_rate(sampling_rate)
    if bands == 1:
        return poisson_selection(seed, update_index, num_examples, sampling_rate)
    update_index = _check_nonneg_int("update_index", update_index)
    rate = float(bands) * float(sampling_rate)
    if not rate <= 1:
        raise ValueError(f"bands*sampling_rate = {bands}*{sampling_rate} must be <= 1")
    members = group_members(seed, num_examples, bands, update_index % int(bands))
    u = _generator(seed, update_index, _POISSON_TAG).random(num_examples)  # example i's own draw, as Poisson's
    return members[u[members] < rate]


def num_physical_batches(num_selected: int, physical_batch_size: int, num_shards: int = 1) -> int:
    """Chunks every shard runs for `num_selected` examples dealt round-robin (>= 1)."""
    per_shard = -(-num_selected // num_shards)  # the largest shard
    return max(1, -(-per_shard // physical_batch_size))


def physical_batches(indices: np.ndarray, physical_batch_size: int, *, num_shards: int = 1,
                     shard_index: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut this shard's share of `indices` into fixed-shape padded chunks.

    Shard s gets indices[s::num_shards]. Returns a list (same length on every shard) of
    (indices int64 [physical_batch_size], padded with -1; mask float32 [physical_batch_size]).
    An empty selection still gives one all-padding chunk: the update (noise only) must run.
    """
    if not isinstance(physical_batch_size, (int, np.integer)) or physical_batch_size < 1:
        raise ValueError(f"physical_batch_size must be an int >= 1, got {physical_batch_size!r}")
    if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index!r}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    mine = indices[shard_index::num_shards]
    count = num_physical_batches(len(indices), physical_batch_size, num_shards)
    padded = np.full(count * physical_batch_size, -1, dtype=np.int64)
    padded[:len(mine)] = mine
    mask = np.zeros(count * physical_batch_size, dtype=np.float32)
    mask[:len(mine)] = 1.0
    return [(padded[i * physical_batch_size:(i + 1) * physical_batch_size],
             mask[i * physical_batch_size:(i + 1) * physical_batch_size]) for i in range(count)]


def sampling_rate_for(batch_size: float, num_examples: int) -> float:
    """q = B / N for a desired expected batch size B (clear error if B > N)."""
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"expected batch size must be in (0, num_examples={num_examples}], got {batch_size!r}")
    return float(batch_size) / float(num_examples)


__all__ = ["expected_batch_size", "poisson_selection", "cyclic_poisson_selection", "group_members", "physical_batches", "num_physical_batches",
           "sampling_rate_for"]
