"""The files of individual accounting (formats in docs/interfaces.md), local or gs://, written only
through `dpft.atomic_io`; per-example files are owner-only.

- `WORKDIR/individual_norms/<update>.npz`: a `NormRecorder`'s state (`save_norms` / `load_norms`).
- `WORKDIR/individual_epsilon.npz`: example_id int64 [N], epsilon float64 [N], attr_<name> str [N],
  with `INDIVIDUAL_PRIVACY_README.md` beside it; `individual_epsilon.json`: aggregates only.
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dpft import atomic_io, paths
from dpft.errors import UsageError
from dpft.privacy.individual.norms import NormRecorder

NORMS_DIR = "individual_norms"
NPZ_NAME = "individual_epsilon.npz"
JSON_NAME = "individual_epsilon.json"
README_NAME = "INDIVIDUAL_PRIVACY_README.md"

_README = """# Individual privacy values: sensitive data

`{npz}` holds one privacy-loss estimate (epsilon) per training example, keyed by
example id, with the example's subgroup attributes. These values are derived from each
individual's gradients and reveal information about the individuals in the training
data (e.g. which examples are atypical). Treat them as sensitive personal data:

- do not copy, publish or share this file, or per-example values from it, outside this
  workdir;
- only aggregate statistics (quantiles per subgroup, see `{json}`)
  may be reported.

The values are estimates (Yu et al. 2023, "Individual Privacy Accounting for
Differentially Private Stochastic Gradient Descent"); the formal guarantee of every
example is the run's worst-case epsilon.
"""


def _readable(path: str | os.PathLike) -> Any:
    """`path` itself for a local file; the object's bytes (a BytesIO) for a remote URL."""
    if paths.is_remote(path):
        return io.BytesIO(paths.as_path(path).read_bytes())
    return path


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of the .npz at `path` (no pickles); OSError / ValueError when unreadable."""
    with np.load(_readable(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_norms(recorder: NormRecorder, path: str | os.PathLike) -> None:
    """Writes the recorder's state to `path` (.npz), atomically and owner-only (per-example norms)."""
    atomic_io.write_bytes(path, lambda f: np.savez(f, **recorder.state_dict()), private=True)


def load_norms(path: str | os.PathLike) -> NormRecorder:
    """The recorder saved at `path` by `save_norms`; ValueError naming the file when unreadable."""
    try:
        return NormRecorder.from_state_dict(_load_npz(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read norm recorder {os.fspath(path)!r}: {e}") from e


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
    atomic_io.write_text(paths.join(workdir, README_NAME), _README.format(npz=NPZ_NAME, json=JSON_NAME))
    if summary is not None:
        atomic_io.write_json(paths.join(workdir, JSON_NAME), summary, indent=2, sort_keys=True, default=float)
    return path


def read_individual_epsilons(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an individual_epsilon.npz written by `write_individual_epsilons` (the one reader:
    training, evaluation reports and notebooks use it). UsageError naming the file and field."""
    try:
        out = _load_npz(path)
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
