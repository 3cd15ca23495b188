"""The files of individual accounting (formats in docs/interfaces.md), local or gs://, written only
through `dpft.atomic_io`; per-example files are owner-only.

- `WORKDIR/individual_norms/<update>.npz`: a `NormRecorder`'s state (`save_norms` / `load_norms`), in an
  owner-only directory. Its bytes depend only on the state (`norms_bytes`: no time stamps), so every
  process of a run states the same SHA-256 for it (`norms_sha256`), which the checkpoint records.
- `WORKDIR/individual_epsilon.npz`: example_id int64 [N], epsilon float64 [N], attr_<name> str [N],
  with `INDIVIDUAL_PRIVACY_README.md` beside it; `individual_epsilon.json`: aggregates only.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
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


def _load_npz(path: str | os.PathLike | io.BytesIO) -> dict[str, np.ndarray]:
    """All arrays of the .npz at `path` (or in a BytesIO; no pickles); OSError / ValueError when unreadable."""
    with np.load(path if isinstance(path, io.BytesIO) else _readable(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def norms_bytes(recorder: NormRecorder) -> bytes:
    """The recorder's state as .npz bytes (an uncompressed zip of .npy members, like `np.savez`), the
    same bytes for the same state: members in name order with a fixed date (np.savez stamps the time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, value in sorted(recorder.state_dict().items()):
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def norms_sha256(recorder: NormRecorder) -> str:
    """SHA-256 (hex) of the file `save_norms` writes for `recorder` (of `norms_bytes`)."""
    return hashlib.sha256(norms_bytes(recorder)).hexdigest()


def save_norms(recorder: NormRecorder, path: str | os.PathLike) -> str:
    """Writes the recorder's state to `path` (.npz, `norms_bytes`), atomically and owner-only
    (per-example norms) -> the file's SHA-256 (hex)."""
    data = norms_bytes(recorder)
    atomic_io.write_bytes(path, data, private=True)
    return hashlib.sha256(data).hexdigest()


def load_norms(path: str | os.PathLike, sha256: str | None = None) -> NormRecorder:
    """The recorder saved at `path` by `save_norms`; with `sha256` (as `save_norms` returned it) the
    file's bytes must have that digest. ValueError naming the file when unreadable or different."""
    where = os.fspath(path)
    try:
        data = paths.as_path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read norm recorder {where!r}: {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        raise ValueError(f"norm recorder {where!r}: SHA-256 {got[:16]}... differs from the recorded "
                         f"{str(sha256)[:16]}... (the file was edited or damaged)")
    try:
        return NormRecorder.from_state_dict(_load_npz(io.BytesIO(data)))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read norm recorder {where!r}: {e}") from e


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
