"""Attribute coverage (printed by prepare/train/evaluate) and every loader option settable from the CLI."""
import glob
import json
import os

import pytest

from dpft.data import coverage, fake, load_splits, option_defaults
from dpft.errors import DataError
from dpft.config.base import load_config

CONFIGS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_loader_and_run_option_settable_on_every_config(path):
    base = load_config(path)
    keys = option_defaults(base.data.name)
    assert set(keys) <= set(base.data.options.keys())
    examples = {"mimic_iv_dir": "/data/mimiciv/2.2", "demo_path": "/data/CHEXPERT DEMO.xlsx", "mask_blank": "true",
                "val_fraction": "0.2", "on_bad_image": "skip", "holdout": "500", "index_dir": "/idx"}
    run_options = {"imbalance.fraction": "0.1", "imbalance.attribute": "sex", "attributes": "sex,age",
                   "train_split": "train", "crop": "none", "eval_crop_fraction": "0.9", "worker_processes": "2"}
    overrides = [f"--config.data.options.{k}={v}" for k, v in examples.items() if k in keys]
    overrides += [f"--config.data.{k}={v}" for k, v in run_options.items()]
    c = load_config(path, overrides)
    for k, v in examples.items():
        if k in keys:
            got = c.data.options[k]
            assert str(got).lower() == v.lower() or got == json.loads(v), (k, got)
    for k, v in run_options.items():
        got = c.data.imbalance[k.split(".")[1]] if k.startswith("imbalance.") else c.data[k]
        assert str(got) == v or got == json.loads(v), (k, got)


def test_mimic_config_takes_mimic_iv_dir():
    c = load_config("configs/mimic_cxr_nfnet_f0.py", ["--config.data.options.mimic_iv_dir=/data/mimiciv/2.2/hosp"])
    assert c.data.options.mimic_iv_dir == "/data/mimiciv/2.2/hosp"


def test_coverage_counts_and_checks(tmp_path):
    d = fake.write_fake_chexpert(str(tmp_path / "c"), n_patients=12, n_valid_patients=3, seed=1, demo="csv")
    tables = load_splits("chexpert", d)
    lines = []
    rep = coverage.report(tables, "chexpert", None, lines.append)
    race = rep["attributes"]["race"]
    n = sum(len(t) for t in tables.values())
    assert race["n"] == n and sum(race["groups"].values()) == n
    assert race["with_value"] == n - race["groups"].get("Unknown", 0) < n  # the writer leaves one patient out
    assert any(line.startswith(f"attribute coverage: race {race['with_value']}/{n} (") for line in lines)
    assert any("WARNING: fairness attribute 'race' is missing" in line for line in lines)
    os.remove(os.path.join(d, "CHEXPERT DEMO.csv"))
    tables = load_splits("chexpert", d)
    with pytest.raises(DataError, match=r"requested fairness attribute\(s\) \['race'\].*demo_path"):
        coverage.report(tables, "chexpert", None, lines.append)
    coverage.report(tables, "chexpert", "sex,age", lines.append)  # asking for less is allowed
    assert coverage.required_attributes("chexpert", ()) == ()


def test_training_starts_from_the_prepare_index(tmp_path):
    from dpft import cli
    from dpft.config import build as setup_lib

    d = fake.write_fake_chexpert(str(tmp_path / "c"), n_patients=12, n_valid_patients=3, seed=1, demo="csv")
    out = str(tmp_path / "prepared")
    assert cli.main(["prepare", "chexpert", "--source", d, "--out", out, "--no-progress", "--set",
                     "frontal_only=true", "--set", "age_edges=[18,40,60,80]"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        assert "race" in json.load(f)["attribute_coverage"]["attributes"]
    overrides = [f"--config.data.root={d}", f"--config.data.options.index_dir={out}/index"]
    config = load_config("configs/fake_chexpert_tiny.py", overrides)
    from_index = setup_lib.load_tables(config)
    fresh = setup_lib.load_tables(load_config("configs/fake_chexpert_tiny.py", overrides[:1]))
    assert {k: len(v) for k, v in from_index.items()} == {k: len(v) for k, v in fresh.items()}
    for split in fresh:
        assert [r["attrs"] for r in from_index[split].records()] == [r["attrs"] for r in fresh[split].records()]
    import shutil
    shutil.rmtree(os.path.join(d, "CheXpert-v1.0-small"))  # the CSVs are not read again
    assert len(setup_lib.load_tables(config)["train"]) == len(fresh["train"])


def test_cloud_urls_refused_in_one_line_without_creating_a_gs_folder(tmp_path, capsys, monkeypatch):
    import fsspec

    from dpft import cli

    def no_backend(name):
        raise ImportError(f"no fsspec implementation for {name}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", no_backend)  # never reach a real bucket here
    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_demo.py")
    assert cli.main(["train", "--config", config, "--workdir", "gs://bucket/run"]) == 2
    assert "gs:// paths need the gcsfs package" in capsys.readouterr().err  # gs:// works with gcsfs
    assert cli.main(["train", "--config", config, "--workdir", "hdfs://host/run"]) == 2
    assert "hdfs:// paths are not supported" in capsys.readouterr().err
    assert cli.main(["prepare", "chexpert", "--source", "gs://bucket/chexpert"]) == 2
    assert cli.main(["evaluate", "--workdir", "gs://bucket/run"]) == 2
    assert not os.path.exists(tmp_path / "gs:")


def test_resume_accepts_a_checkpoint_config_without_the_new_option_keys():
    from dpft.train import resume
    from dpft.config.base import ConfigDict, upgrade

    new = load_config("configs/chexpert_nfnet_f0.py")
    old = ConfigDict(new.to_dict())
    with old.unlocked():
        for key in ("mimic_iv_dir", "demo_path", "mask_blank", "index_dir", "attributes"):
            if key in old.data.options:
                del old.data.options[key]
    old = upgrade(old)  # as `dpft.workdir.contract.checkpoint_config` reads a checkpoint's config
    resume.check_resume_config(old, new, "w")  # defaults: same run
    changed = load_config("configs/chexpert_nfnet_f0.py", ["--config.data.options.mask_blank=true"])
    with pytest.raises(Exception, match="mask_blank"):
        resume.check_resume_config(old, changed, "w")
