"""The demo's summary table (terminal) and report.md + summary.json (workdir)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

from dpft import atomic_io


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summary_table(rows: list[dict]) -> str:
    """The demo's runs: accuracy overall and per group, the gap (max - min over groups) with its CI."""
    header = ("| run | epsilon | accuracy | majority acc. | minority acc. | accuracy gap, max - min (95% CI) | "
              "median individual eps |")
    lines = [header, "|" + "---|" * 7]
    for r in rows:
        ci = r.get("gap_ci")
        if r["gap"] is None:
            gap = f"n/a ({r.get('gap_undefined') or 'undefined'})"
        else:
            gap = _fmt(r["gap"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and ci[0] is not None else "")
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] else "non-private"
        lines.append(f"| {r['run']} | {eps} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['majority_accuracy'])} | {_fmt(r['minority_accuracy'])} | {gap} | "
                     f"{_fmt(r.get('individual_epsilon_median'))} |")
    return "\n".join(lines)


def units_table(rows: list[dict]) -> str:
    """The privacy-unit study (`dpft.demo.steps.unit_study`): per unit, sigma, epsilon per patient and
    per image, accuracy overall and per group, the gap."""
    lines = ["| privacy unit | sigma | epsilon per patient | epsilon per image | accuracy | majority acc. | "
             "minority acc. | accuracy gap |", "|" + "---|" * 8]
    for r in rows:
        per_image = ("<= " if r["unit"] == "patient" else "") + f"{r['epsilon_per_image']:.2f}"
        lines.append(f"| {r['unit']} | {r['noise_multiplier']:.3f} | {r['epsilon_per_patient']:.2f} | {per_image} | "
                     f"{_fmt(r['accuracy'])} | {_fmt(r['majority_accuracy'])} | {_fmt(r['minority_accuracy'])} | "
                     f"{_fmt(r['gap'])} |")
    return "\n".join(lines)


def write_report(workdir: str, rows: list[dict], cmp: dict, study: dict, elapsed: float,
                 args: argparse.Namespace, units: list[dict] | None = None) -> None:
    lines = [
        "# dpft demo report", "",
        f"A small NFNet ({args.model}) pre-trained non-privately on the public (upright) "
        "digits, then fine-tuned with "
        f"DP-SGD on the private split where rotated digits are {args.minority_fraction:g} of the examples. "
        "Test split: 10% rotated. Accuracy gap = max - min over the groups (patient-level bootstrap "
        "CIs; here one image per 'patient').", "",
        summary_table(rows), "",
        "Sweep (epsilon vs accuracy vs gap): ![compare](compare/compare.png)", "",
        "Per-run evaluation reports (per-group metrics, parity, individual epsilons):", "",
    ]
    for r in rows:
        rel = os.path.relpath(r["dir"], workdir)
        lines.append(f"- {r['run']}: `{rel}/eval/` (report.md, metrics.json, PNGs)")
    if study:
        rel = os.path.relpath(os.path.dirname(study["files"]["png"]), workdir)
        table = open(study["files"]["md"], encoding="utf-8").read().split("\n## Runs")[0]
        table = table.split("\n", 1)[1]  # drop the file's title
        lines += ["", "## Imbalance study (minority fraction x epsilon x seeds, with the non-private baseline)", "",
                  "Each run is a fine-tuning of the same public model on the private split subsampled so that the "
                  "minority (rotated digits) is the given fraction; test split: 10% minority. Individual "
                  "accounting is off in these runs.", "",
                  f"![imbalance study]({rel}/compare.png)", "", table.strip(), "",
                  f"Per-run table and files: `{rel}/compare.md`, `{rel}/compare.json`.", ""]
    if units:
        lines += ["", "## Privacy units: the image or the patient, at the same epsilon per patient", "",
                  f"The private split grouped into patients of 1 to {units[0]['max_images_per_patient']} images "
                  "(`digits_patients`). `example`: Poisson sampling of images, one clipped gradient per image; its "
                  "sigma is raised until the patient with the most images has the target epsilon (group privacy, "
                  "dp-accounting's PLD of the Binomial mixture). `patient`: Poisson sampling of patients, one "
                  "clipped gradient per patient (the sum of its images' gradients). Both use the same expected "
                  "images per update.", "", units_table(units), ""]
    lines += ["", f"Whole demo: {elapsed / 60:.1f} minutes.",
              "Individual epsilons are sensitive data about individuals: they stay in each run's workdir."]
    atomic_io.write_text(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")
    atomic_io.write_json(os.path.join(workdir, "summary.json"),
                         {"runs": rows, "imbalance": study.get("cells") if study else None, "units": units or None,
                          "elapsed_s": elapsed},
                         indent=2, default=str)
