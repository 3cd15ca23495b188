"""The model a comparison selects, and what the selection costs in privacy.

`dpft evaluate --compare` of the trials of `launch/sweep.py --private-selection` (their parent holds
`selection.json`, `dpft.privacy.selection`) selects the trial with the best validation metric
(TRIAL/selection/metrics.json, split "validation") and reports the (epsilon, delta) of releasing it:
dp-accounting's RDP accountant over RepeatAndSelect(the trials' common DP event, the drawn
distribution's mean and shape). The trials must be exactly the ones drawn (no more, no fewer: a
subset is another selection) and must share one ledger (one DP mechanism) and delta.

`--select-by METRIC` over runs that are not such a selection (a plain sweep) selects the best run by
METRIC of the metrics the comparison reads, and says that the choice is NOT accounted: the selected
run's epsilon covers its training, not the use of the other runs' results to choose it.

Only the training examples (privacy units) are covered: the validation split that scores the trials
chooses the model and is not protected by this guarantee (use a split that is public, or one you
accept to expose through the choice).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpft.errors import UsageError
from dpft.privacy import selection as selection_lib
from dpft.privacy.accounting import Ledger
from dpft.workdir import contract

NOT_ACCOUNTED = ("the selection is NOT accounted: the selected run's epsilon covers its own training, not the "
                 "choice among {n} runs by their results (use launch/sweep.py --private-selection)")
VALIDATION_NOTE = ("the validation split that scored the trials chose the model; the guarantee covers the "
                   "training examples, not that split")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def selection_record(run_dirs: Sequence[str | Path]) -> tuple[Path, selection_lib.Scheme, dict] | None:
    """(path, its Scheme, doc) of the `selection.json` beside the runs when they all share the parent that
    holds one; UsageError when the runs are not exactly its trials."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    if len(parents) != 1:
        return None
    path = next(iter(parents)) / selection_lib.SELECTION_FILE
    if not path.is_file():
        return None
    try:
        scheme, doc = selection_lib.read_selection_doc(_read_json(path), str(path))
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = sorted(Path(d).name for d in run_dirs)
    trials = sorted(t["name"] for t in doc["trials"])
    if names != trials:
        raise UsageError(f"{path}: the compared runs {names} are not the {len(trials)} trials it drew {trials}: a "
                         "private selection compares all its trials and nothing else")
    return path, scheme, doc


def _metric(metrics: Mapping[str, Any], metric: str, path: Path) -> float:
    """The point estimate of overall metric `metric` (metrics.json: {"value": v, "ci": ...})."""
    overall = metrics.get("overall", {})
    value = (overall.get(metric) or {}).get("value") if isinstance(overall.get(metric), dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        have = sorted(overall)
        raise UsageError(f"{path}: no finite overall metric {metric!r} to select by (have {', '.join(have[:8])}, ...)")
    return float(value)


def private_selection(path: Path, scheme: selection_lib.Scheme, doc: dict, run_dirs: Sequence[str | Path],
                      select_by: str | None) -> dict[str, Any]:
    """The accounted selection over the trials of `doc` (see the module doc)."""
    metric = select_by or doc.get("metric")
    scores, ledgers, deltas, valid, units = {}, {}, set(), set(), set()
    for d in sorted(Path(r) for r in run_dirs):
        mpath = d / selection_lib.SELECTION_EVAL_DIR / "metrics.json"
        if not mpath.is_file():
            raise UsageError(f"{mpath}: file not found (score the trial with `dpft evaluate --workdir {d} "
                             f"--reuse-predictions --split {contract.VALIDATION} --out {mpath.parent}`)")
        m = _read_json(mpath)
        meta = m.get("meta", {})
        if meta.get("split") != contract.VALIDATION:
            raise UsageError(f"{mpath}: field 'meta.split' is {meta.get('split')!r}, not {contract.VALIDATION!r}: "
                             "trials are scored on the validation split")
        metric = metric or meta["headline"][0]
        scores[d.name] = _metric(m, metric, mpath)
        lpath = d / contract.LEDGER_FILE
        if not lpath.is_file():
            raise UsageError(f"{lpath}: file not found (a trial without its ledger cannot be accounted)")
        try:
            ledger = Ledger.from_json(lpath.read_text())
        except ValueError as e:
            raise UsageError(f"{lpath}: {e}") from None
        eps = meta.get("epsilon")
        if eps is None or not math.isclose(ledger.epsilon(float(meta["delta"])), float(eps), rel_tol=1e-9):
            raise UsageError(f"{d / contract.LEDGER_FILE}: its epsilon is not the {eps} that evaluation verified from "
                             f"the checkpoint ({mpath})")
        ledgers[d.name] = ledger  # its whole record: the mechanism (BandMF's bands) and every entry
        run_eps = float(eps)
        deltas.add(float(meta["delta"]))
        valid.add(meta.get("guarantee_valid"))
        units.add(meta.get("privacy_unit"))
    if len({l.to_json() for l in ledgers.values()}) != 1 or len(deltas) != 1 or len(units) != 1:
        raise UsageError(f"{path}: the trials differ in their privacy accounting (ledgers, delta or privacy unit): "
                         "a private selection needs every trial to be the same DP mechanism")
    best = max(sorted(scores), key=lambda n: scores[n])  # ties: the first by name
    delta = deltas.pop()
    trial_ledger = next(iter(ledgers.values()))
    event = trial_ledger.dp_event()
    return {
        "accounted": True, "selected": best, "metric": metric, "split": contract.VALIDATION,
        "score": scores[best], "scores": scores, "num_trials": len(scores), "scheme": scheme.to_dict(),
        "delta": delta, "trial_epsilon": trial_ledger.epsilon(delta, selection_lib.SELECTION_ACCOUNTANT),
        "trial_epsilon_run_accountant": run_eps,
        "epsilon": selection_lib.selection_epsilon(event, scheme, delta),
        "accountant": selection_lib.SELECTION_ACCOUNTANT, "guarantee_valid": valid.pop() if len(valid) == 1 else False,
        "privacy_unit": units.pop(), "note": VALIDATION_NOTE,
    }


def plain_selection(rows: Sequence[Mapping[str, Any]], select_by: str) -> dict[str, Any]:
    """`--select-by` over runs that are no private selection: the best run by the metric, not accounted."""
    scores = {}
    for r in rows:
        path = Path(r["metrics_path"])
        m = _read_json(path)
        scores[r["run"]] = (_metric(m, select_by, path), m.get("meta", {}).get("split"))
    best = max(sorted(scores), key=lambda n: scores[n][0])
    selected = next(r for r in rows if r["run"] == best)
    return {"accounted": False, "selected": best, "metric": select_by, "split": scores[best][1],
            "score": scores[best][0], "scores": {n: s for n, (s, _) in scores.items()}, "num_trials": len(rows),
            "epsilon": selected.get("epsilon_spent"), "guarantee_valid": selected.get("guarantee_valid"),
            "note": NOT_ACCOUNTED.format(n=len(rows))}


def render(sel: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the selection section of compare.md."""
    eps = sel.get("epsilon")
    eps_text = "n/a" if eps is None else contract.mark_epsilon(f"{eps:.3f}", sel.get("guarantee_valid"))
    lines = ["", "## Selection", "",
             f"Selected **{sel['selected']}** of {sel['num_trials']} by {sel['metric']} on split {sel['split']} "
             f"({sel['score']:.4f})."]
    if sel["accounted"]:
        s = sel["scheme"]
        lines.append(f"Private selection (Papernot & Steinke 2022): K ~ {s['distribution']} with mean {s['mean']:g} "
                     f"trials; each trial epsilon {sel['trial_epsilon_run_accountant']:.3f} by its run's accountant, "
                     f"{sel['trial_epsilon']:.3f} by RDP; releasing the selected model: "
                     f"**epsilon {eps_text} at delta {sel['delta']:.2g}** ({sel['accountant'].upper()}, "
                     f"per {sel['privacy_unit']}). Note: {sel['note']}.")
    else:
        lines.append(f"Epsilon of the selected run: {eps_text}. Note: {sel['note']}.")
    return lines
