"""`dpft prepare <dataset> --source DIR [--out DIR] [--config CONFIG]`: validate a data dir and build its index.

Checks: the CSV columns and label values (while loading), every referenced image exists
and decodes (fully, so truncated JPEGs fail), patient split integrity, no empty split.
Writes `<out>/summary.json` (counts per split and per subgroup) and, for the indexed data
sets (a `DatasetSpec` with an `index_key`: chexpert, mimic_cxr), `<out>/index/{<split>.csv,
meta.json}`: load them again with `load_splits(name, root, index_dir="<out>/index", <same options>)`;
`--config` takes the options from the run config that will train on the index (a mismatch is refused
at load time, naming the options that differ); reading run configs is why this command lives in
`dpft.config`, above the data sets it loads.
`--on-bad-image` goes to the loader as its option `on_bad_image` where it has one. Embedded data
sets (`needs_root=False`: made in memory) need no --source and have no image files to check.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import logging
from typing import Any

from dpft import atomic_io
from dpft.errors import UsageError
from dpft.data import DATASETS, dataset, load_splits
from dpft.data.augment import decode_image
from dpft.errors import DataError
from dpft.data.base import ExampleTable, write_index

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS.names())
    parser.add_argument("--source", help="data directory (not needed for digits)")
    parser.add_argument("--out", help="where to write summary.json and index/ (default: <source>/dpft-index)")
    parser.add_argument("--config", default=None, metavar="CONFIG",
                        help="take the loader options from this run config (its data.options, e.g. "
                             "configs/chexpert_nfnet_f0.py), so the index is the one that run loads with index_dir; "
                             "--set overrides them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a loader option, e.g. uncertainty=zeros, frontal_only=true (JSON values)")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="a missing / undecodable image: stop with an error or skip it (counted, logged)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--max-check", type=int, default=None,
                        help="decode at most this many images per split (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_options(items: list[str]) -> dict[str, Any]:
    """["k=v", ...] -> {k: json.loads(v) or the string v}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def check_images(table: ExampleTable, *, on_bad_image: str, workers: int, max_check: int | None,
                 progress: bool) -> tuple[ExampleTable, list[str]]:
    """Decode every image of `table` (or the first `max_check`). Returns (table without bad rows, problems)."""
    from tqdm import tqdm

    n = len(table) if max_check is None else min(len(table), max_check)

    def check(i: int) -> str | None:
        rec = table[i]
        try:
            decode_image(rec["image"], channels=3)
            return None
        except DataError as e:
            return f"{table.meta.name}/{table.split} row {i} (example_id {rec['example_id']}): {e}"

    problems: list[str] = []
    bad: set[int] = set()
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(check, range(n))
        for i, msg in enumerate(tqdm(results, total=n, desc=f"{table.split}", disable=not progress, unit="img")):
            if msg is None:
                continue
            if on_bad_image == "error":
                raise DataError(msg)
            log.warning("skipping: %s", msg)
            problems.append(msg)
            bad.add(i)
    if bad:
        table = table.subset([i for i in range(len(table)) if i not in bad])
    return table, problems


def summarize(tables: dict[str, ExampleTable]) -> dict[str, Any]:
    """{"splits": {split: {"examples", "patients", "attrs": {name: {value: count}}, "positives"?}}}."""
    out: dict[str, Any] = {}
    for split, t in tables.items():
        info: dict[str, Any] = {"examples": len(t)}
        recs = list(t.records()) if t.attribute_names or t.task == "multilabel" else []
        if recs:
            info["patients"] = len({r["patient_id"] for r in recs})
            info["attrs"] = {a: dict(sorted(collections.Counter(r["attrs"].get(a, "Unknown") for r in recs).items()))
                             for a in t.attribute_names}
            if t.task == "multilabel":
                info["positives"] = {c: int(sum(float(r["label"][j]) for r in recs))
                                     for j, c in enumerate(t.class_names)}
        out[split] = info
    return {"splits": out}


def config_options(path: str, dataset_name: str) -> dict[str, Any]:
    """The loader options of the run config at `path` (`config.data.options`, without index_dir and the
    options a run resolves itself); UsageError if it trains another data set."""
    from dpft.config.base import load_config

    config = load_config(path)
    if str(config.data.name) != dataset_name:
        raise UsageError(f"--config {path}: trains data set {config.data.name!r}, not {dataset_name!r}")
    options = dict(config.data.options.to_dict()) if config.data.options is not None else {}
    options.pop("index_dir", None)
    return json.loads(json.dumps(options, default=list))


def run(args: argparse.Namespace) -> int:
    spec = dataset(args.dataset)
    options = {**(config_options(args.config, args.dataset) if args.config else {}), **parse_options(args.set)}
    if "on_bad_image" in spec.option_defaults():
        options.setdefault("on_bad_image", args.on_bad_image)
    from dpft import paths
    paths.check_supported(args.source, "--source")  # local, or gs:// / s3:// / az:// through etils.epath
    paths.check_supported(args.out, "--out")
    if spec.needs_root and not args.source:
        raise UsageError(f"--source is required for {args.dataset}")
    if args.source and not paths.isdir(args.source):
        raise UsageError(f"--source {args.source!r} is not a directory")
    from dpft.data import coverage

    requested = options.pop("attributes", None)  # --option attributes=... (config: data.attributes)
    tables = load_splits(args.dataset, args.source, **options)
    cov = coverage.report(tables, args.dataset, requested)  # printed; a requested attribute nowhere: error
    problems: list[str] = []
    if spec.needs_root:  # embedded data sets' images are arrays made in memory
        for split in list(tables):
            tables[split], p = check_images(tables[split], on_bad_image=args.on_bad_image, workers=args.workers,
                                            max_check=args.max_check, progress=not args.no_progress)
            problems += p
            if len(tables[split]) == 0:
                raise DataError(f"{args.dataset}: split {split!r} is empty after skipping bad images")
    out = args.out or paths.join(args.source or ".", "dpft-index")
    atomic_io.make_dir(out)
    if spec.indexed:
        write_index(tables, out, extra=spec.index_options(args.dataset, options))
    summary = summarize(tables)
    excluded: dict[str, int] = {}  # rows the loader left out, by reason (per group: attribute_coverage)
    for table in tables.values():
        for why, by_attr in table.excluded.items():
            excluded[why] = excluded.get(why, 0) + (sum(next(iter(by_attr.values())).values()) if by_attr else 0)
    summary.update(dataset=args.dataset, source=args.source, options=options, skipped=len(problems),
                   excluded_by_loader=excluded, attribute_coverage=cov,
                   skipped_examples=problems[:100])
    atomic_io.write_json(paths.join(out, "summary.json"), summary, indent=2, sort_keys=True)
    for split, info in summary["splits"].items():
        attrs = "; ".join(f"{a}: " + ", ".join(f"{v}={c}" for v, c in vc.items())
                          for a, vc in info.get("attrs", {}).items())
        print(f"{split}: {info['examples']} examples" + (f", {info['patients']} patients" if "patients" in info else "")
              + (f" | {attrs}" if attrs else ""))
    left_out = "; ".join(f"{why} {n}" for why, n in excluded.items())
    print(f"skipped {len(problems)} bad images" + (f"; left out by the loader: {left_out}" if left_out else "")
          + f"; wrote {out}")
    return 0
