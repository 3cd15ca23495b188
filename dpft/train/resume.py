"""What a resumed run checks in a checkpoint before it continues from it.

`read_checkpoint` reads one step for `dpft.workdir.checkpointing.newest_intact`: the config it was
trained with must be the run's (`check_resume_config`, before any array is read: a changed model
would fail inside orbax; the config item is checked against the step's checksum record first, so an
edited one makes the step corrupt rather than "a different config"), every item must read back
intact, its ledger must compose exactly its update counter with the plan's (q, sigma)
(`dpft.workdir.ledger_check`), and the individual-accounting norms file its `individual` item points
to must have the SHA-256 the item records (`read_individual`).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections
import numpy as np

from dpft.config.base import config_to_json, flatten
from dpft.config.schema import resumable_fields
from dpft.config.validation import same_value
from dpft.errors import UsageError
from dpft.privacy.plan import PrivacyPlan
from dpft.workdir import ledger_check
from dpft.workdir import checkpointing, contract


def check_resume_config(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse to resume with a config that changes what is trained (and so the guarantee): every field
    but those the schema marks resumable (`dpft.config.schema.resumable_fields`) must be the same.
    `old` is the checkpoint's config as `dpft.workdir.contract.checkpoint_config` reads it (upgraded
    to today's schema, loader options included)."""
    a = flatten(json.loads(config_to_json(old)))
    b = flatten(json.loads(config_to_json(new)))
    resumable = resumable_fields()
    changed = sorted(k for k in set(a) | set(b) if k not in resumable and not same_value(a.get(k), b.get(k)))
    if changed:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
        raise UsageError(f"{workdir} holds a checkpoint of a different config ({details}); "
                         f"use a new --workdir, or the same config to resume")


def read_individual(individual: Any, restored: checkpointing.Restored, directory: str, workdir: str) -> Any:
    """The norm recorder of a restored checkpoint's `individual` item (`IndividualHook.read_norms`: the
    file `WORKDIR/individual_norms/<update>.npz`, checked against the item's SHA-256); an unreadable or
    edited file, or a malformed item, makes the step corrupt (`CorruptCheckpoint` naming the item); a file
    whose item records no SHA-256 (older checkpoints) is read unchecked and counted in `restored.unchecked`."""
    try:
        item = restored.json_items[contract.INDIVIDUAL]
        recorder = individual.read_norms(workdir, item)
        if "sha256" not in item:  # written before the digest was recorded: read unchecked, and counted
            restored.unchecked += 1  # the resume line says "N without checksum"
        return recorder
    except (KeyError, TypeError, ValueError) as e:
        raise checkpointing.CorruptCheckpoint(restored.step, directory, f"item {contract.INDIVIDUAL!r}: {e}") from e


def read_checkpoint(ckpt: checkpointing.Checkpointer, step: int, *, config: ml_collections.ConfigDict,
                    workdir: str, targets: Mapping[str, Any], plan: PrivacyPlan,
                    individual: Any = None) -> checkpointing.Restored:
    """Checkpoint `step` of the run of `config`, checked; its ledger item is parsed (a `Ledger`) and,
    with `individual` (the run's `IndividualHook`), its `individual` item read (a `NormRecorder`).

    An unreadable item, a checksum mismatch (the config item's before configs are compared) or an
    individual-accounting file that differs from its recorded SHA-256 raise `CorruptCheckpoint`; a
    changed config UsageError; a ledger that does not match the update counter and the plan
    CheckpointError (no fallback: the checkpoint was edited, not damaged).
    """
    check_resume_config(contract.checkpoint_config(ckpt.directory, step), config, workdir)
    restored = ckpt.restore(step, targets=targets)
    ledger = contract.checkpoint_ledger(restored, ckpt.directory)
    ledger_check.check_ledger(
        ledger, updates=int(np.asarray(restored.pytrees[contract.UPDATE])), sampling_rate=plan.sampling_rate,
        noise_multiplier=plan.noise_multiplier, private=plan.enabled, bands=plan.ledger_bands,
        data_state=restored.json_items.get(contract.DATA_STATE), where=f"checkpoint {ckpt.directory}/{step}")
    restored.json_items[contract.LEDGER] = ledger
    if individual is not None and contract.INDIVIDUAL in restored.json_items:
        restored.json_items[contract.INDIVIDUAL] = read_individual(individual, restored, ckpt.directory, workdir)
    return restored
