"""The training loop's hook for individual accounting: when to record per-example norms, how the
record travels with checkpoints, and what is computed and written at the end. The loop only
computes the norms; files go through `files`, epsilons through the run's plan."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dpft import atomic_io
from dpft.privacy.individual import files, groups
from dpft.privacy.individual.norms import NormRecorder


@dataclasses.dataclass
class IndividualHook:
    """recorder: the rounded-up norms so far; last_losses: float [N] per-example training loss at the
    latest record (for the loss-vs-epsilon correlation); min_group_size: summaries suppress smaller groups.
    """

    recorder: NormRecorder
    min_group_size: int = groups.MIN_GROUP_SIZE
    last_losses: np.ndarray | None = None

    @classmethod
    def create(cls, num_examples: int, *, grid_width: float, every: int,
               min_group_size: int = groups.MIN_GROUP_SIZE) -> "IndividualHook":
        return cls(NormRecorder(num_examples=num_examples, grid_width=grid_width, every=every), int(min_group_size))

    def due(self, update: int) -> bool:
        """True when the norms at the parameters of `update` must be recorded before it runs."""
        return self.recorder.should_record(update)

    def record(self, update: int, norms: np.ndarray, losses: np.ndarray) -> None:
        """norms, losses: float [N] of every training example (table order) at update `update`."""
        self.recorder.record_all(update, norms)
        self.last_losses = np.asarray(losses, np.float64)

    def checkpoint_item(self, workdir: str, update: int, *, write: bool) -> dict[str, str]:
        """Saves the recorder as WORKDIR/individual_norms/<update>.npz (when `write`: process 0; the
        directory owner-only) and returns the checkpoint's JSON item {"norms_file": relative path,
        "sha256": the file's SHA-256 (hex)}: the item is checksummed with the checkpoint, so the
        digest brings the file under the checkpoint's integrity check (`read_norms`). Every process
        returns the same item (the file's bytes depend only on the recorder, `files.norms_bytes`)."""
        path = os.path.join(workdir, files.NORMS_DIR, f"{update}.npz")
        if write:
            atomic_io.make_dir(os.path.dirname(path), private=True)
            digest = files.save_norms(self.recorder, path)
        else:
            digest = files.norms_sha256(self.recorder)
        return {"norms_file": os.path.relpath(path, workdir), "sha256": digest}

    @staticmethod
    def read_norms(workdir: str, item: Mapping[str, Any]) -> NormRecorder:
        """The recorder a checkpoint's JSON item (`checkpoint_item`) points to, its file checked against
        the item's SHA-256 (an item without one, written before the digest was recorded: unchecked).
        ValueError naming the file when it is unreadable or differs; KeyError/TypeError for a malformed item."""
        return files.load_norms(os.path.join(workdir, item["norms_file"]), item.get("sha256"))

    def finish(self, workdir: str, plan: Any, updates: int, run_epsilon: float, columns: Mapping[str, np.ndarray],
               *, task: str, class_names: Sequence[str]) -> str:
        """Individual epsilons after `updates` by the run's plan (`PrivacyPlan.individual_epsilons`, the
        run's accountant), their summary per attribute (and per class for multiclass) and the private
        files -> the .npz path. columns: example_id, label, attr_<name> of the training split, in table order."""
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting warns for every RDP order it drops
        eps = plan.individual_epsilons(self.recorder, updates)
        attrs = {k[len("attr_"):]: v for k, v in columns.items() if k.startswith("attr_")}
        if task == "multiclass":  # per-class distribution in the evaluation report
            names = list(class_names)
            attrs["class"] = np.asarray([names[int(y)] for y in columns["label"]], dtype=str)
        summary = groups.summarise(eps, attrs, columns["label"], self.last_losses, worst_case_epsilon=run_epsilon,
                                   class_names=class_names, min_group_size=self.min_group_size)
        summary["run_epsilon"] = {"value": run_epsilon, "accountant": plan.accountant}
        summary["accountant"] = plan.accountant
        summary["clipping"] = plan.clipping.mode
        return files.write_individual_epsilons(workdir, columns["example_id"], eps, attrs, summary=summary)
