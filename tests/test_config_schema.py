"""The run config's schema (dpft/config/schema.py) is the one record of every field: base_config,
validation, overrides, upgrade of old configs, the resume check and docs/config.md come from it; the
choices come from the records of what they name; consumers read fields, never with a default."""
import ast
import json
import pathlib

import pytest

from dpft.config import base as cb
from dpft.config import docs, schema
from dpft.config.fields import GROUP
from dpft.config.upgrade import upgrade
from dpft.config.validation import validate
from dpft.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Configs as older versions of dpft saved them (config.json, a checkpoint's config item).
OLD_CONFIGS = {
    # 4146989, 2026-11-26: its `base_config()`, saved as JSON
    "4146989": json.loads(
        '{"data": {"augmult": 1, "eval_image_size": 32, "image_size": 32, "name": "digits", "num_workers": 0, '
        '"options": {}, "random_crop": true, "random_flip": true, "root": ""}, "eval": {"batch_size": 256, '
        '"params": "ema", "splits": ["test"]}, "individual": {"enabled": false, "every": 100, '
        '"norm_grid": 0.1}, "model": {"checkpoint": "", "dtype": "float32", "name": "nfnet_f0"}, '
        '"privacy": {"accountant": "pld", "clip_norm": 1.0, "clipping": "flat", "delta": 0.0, "enabled": true, '
        '"epsilon": 8.0, "noise_multiplier": 0.0, "sampling": "poisson"}, "seed": 0, '
        '"train": {"batch_size": 256, "checkpoint_every": 100, "ema_decay": 0.999, "eval_every": 100, '
        '"keep_checkpoints": 3, "log_every": 10, "lr_schedule": {"name": "constant", "warmup_steps": 0}, '
        '"microbatch_size": 16, "num_updates": 100, "optimizer": {"learning_rate": 1.0, "momentum": 0.0, '
        '"name": "sgd", "weight_decay": 0.0}, "physical_batch_size": 64, "polyak": false}}'),
    # 78adaca, 2026-11-29 (before the typed run options): its `base_config()`, saved as JSON
    "78adaca": json.loads(
        '{"data": {"augmult": 1, "eval_image_size": 32, "image_size": 32, "name": "digits", "num_workers": 0, '
        '"options": {}, "random_crop": true, "random_flip": true, "root": ""}, "eval": {"batch_size": 256, '
        '"params": "ema", "splits": ["test"]}, "individual": {"enabled": false, "every": 100, '
        '"min_group_size": 20, "norm_grid": 0.1}, "model": {"checkpoint": "", "dtype": "float32", '
        '"name": "nfnet_f0"}, "privacy": {"accountant": "pld", "clip_norm": 1.0, "clipping": "flat", '
        '"delta": 0.0, "enabled": true, "epsilon": 8.0, "insecure_fixed_noise_seed": -1, '
        '"noise_multiplier": 0.0}, "seed": 0, "train": {"batch_size": 256, "checkpoint_every": 100, '
        '"ema_decay": 0.999, "eval_every": 100, "grad_method": "auto", "keep_checkpoints": 3, "log_every": 10, '
        '"lr_schedule": {"name": "constant", "warmup_steps": 0}, "microbatch_size": 16, "num_updates": 100, '
        '"optimizer": {"learning_rate": 1.0, "momentum": 0.0, "name": "sgd", "weight_decay": 0.0}, '
        '"physical_batch_size": 64, "polyak": false}}'),
    # b152ea1, 2026-11-29 (before privacy.gamma): its `base_config()`, saved as JSON
    "b152ea1": json.loads(
        '{"data": {"attributes": null, "augmult": 1, "crop": "auto", "eval_crop_fraction": 0.0, '
        '"eval_image_size": 32, "image_size": 32, "imbalance": {"attribute": "", "fraction": 0.0, "group": "", '
        '"seed": -1}, "name": "digits", "num_workers": 0, "options": {}, "random_crop": true, '
        '"random_flip": true, "root": "", "train_split": "train", "worker_processes": 0}, '
        '"eval": {"batch_size": 256, "params": "ema", "splits": ["test"]}, "individual": {"enabled": false, '
        '"every": 100, "min_group_size": 20, "norm_grid": 0.1}, "model": {"checkpoint": "", '
        '"dtype": "float32", "name": "nfnet_f0"}, "privacy": {"accountant": "pld", "clip_norm": 1.0, '
        '"clipping": "flat", "delta": 0.0, "enabled": true, "epsilon": 8.0, "insecure_fixed_noise_seed": -1, '
        '"noise_multiplier": 0.0}, "seed": 0, "train": {"batch_size": 256, "checkpoint_every": 100, '
        '"ema_decay": 0.999, "eval_every": 100, "grad_method": "auto", "keep_checkpoints": 3, "log_every": 10, '
        '"lr_schedule": {"name": "constant", "warmup_steps": 0}, "microbatch_size": 16, "num_updates": 100, '
        '"optimizer": {"learning_rate": 1.0, "momentum": 0.0, "name": "sgd", "weight_decay": 0.0}, '
        '"physical_batch_size": 64, "polyak": false}}'),
}


def test_docs_config_md_is_generated_from_the_schema():
    assert (ROOT / "docs" / "config.md").read_text() == docs.markdown(), (
        "docs/config.md is out of date: python -m dpft.config.docs > docs/config.md")


def test_base_config_is_the_schema_at_its_defaults():
    base = cb.base_config()
    flat = cb.flatten(json.loads(cb.config_to_json(base)))
    leaves = {p for p, f in schema.FIELDS.items() if f.kind is not GROUP}
    assert set(flat) == leaves
    for path in leaves:
        field = schema.FIELDS[path]
        assert schema.lookup(base, path) == field.default and field.problem(field.default) is None, path
    assert base.data.options.to_dict() == {}


@pytest.mark.parametrize("version", sorted(OLD_CONFIGS))
def test_configs_saved_by_older_versions_upgrade_to_todays(version):
    today = cb.add_option_defaults(cb.base_config(locked=False))
    up = cb.config_from_json(json.dumps(OLD_CONFIGS[version]))
    assert cb.config_to_json(up) == cb.config_to_json(today)  # privacy.sampling="poisson" is today's behaviour
    validate(up, check_paths=False)
    assert cb.config_to_json(upgrade(up)) == cb.config_to_json(up)  # today's configs pass through unchanged


def test_a_removed_field_at_another_value_stays_and_resuming_is_refused():
    from dpft.train import resume

    old = dict(OLD_CONFIGS["4146989"], privacy={**OLD_CONFIGS["4146989"]["privacy"], "sampling": "shuffle"})
    up = upgrade(old)
    assert up.privacy.sampling == "shuffle"
    with pytest.raises(UsageError, match="privacy.sampling: 'shuffle' -> None"):
        resume.check_resume_config(up, upgrade(OLD_CONFIGS["b152ea1"]), "w")


def test_the_schema_marks_what_a_resume_may_change():
    assert set(schema.resumable_fields()) == {
        "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
        "data.num_workers", "eval.batch_size", "eval.splits", "eval.params"}


def test_choices_come_from_the_records_of_what_they_name():
    from dpft.config import build, optim
    from dpft.data import DATASETS
    from dpft.data.augment import CROPS
    from dpft.models import registry
    from dpft.privacy import bandmf, clipping, units
    from dpft.privacy.accounting import ACCOUNTANTS
    from dpft.privacy.plan import GRAD_METHOD_CHOICES
    from dpft.workdir import contract

    choices = {p: f.choice_names() for p, f in schema.FIELDS.items() if f.choices is not None}
    assert choices == {
        "model.name": registry.names(), "model.dtype": tuple(build.COMPUTE_DTYPES), "data.name": DATASETS.names(),
        "data.crop": ("auto",) + CROPS, "privacy.clipping": clipping.names(private=True),
        "privacy.accountant": ACCOUNTANTS, "train.grad_method": GRAD_METHOD_CHOICES,
        "train.optimizer.name": tuple(optim.OPTIMIZERS), "train.lr_schedule.name": tuple(optim.SCHEDULES),
        "eval.params": tuple(contract.PARAMS_ITEMS), "privacy.unit": units.UNITS,
        "privacy.mechanism": bandmf.MECHANISMS}
    # Each run-config hyper-parameter of the clipping modes is a privacy field at the record's default.
    for name, param in clipping.HYPER_PARAMS.items():
        assert (schema.FIELDS[f"privacy.{name}"].default == param.default) if param.run_config else (
            f"privacy.{name}" not in schema.FIELDS)


def test_audit_and_evaluate_options_take_their_records_from_the_same_mechanism():
    from dpft.evaluate import evaluate_cli, reports
    from dpft.train import audit_cli, canary_audit

    fields = canary_audit.AuditConfig.__dataclass_fields__
    assert fields["dtype"].metadata["field"].choices is schema.FIELDS["model.dtype"].choices
    assert fields["grad_method"].metadata["field"].choices is schema.FIELDS["train.grad_method"].choices
    with pytest.raises(ValueError, match=r"audit config: steps=0: must be in \[1, 1000000\]"):
        canary_audit.AuditConfig(steps=0).validate()
    with pytest.raises(UsageError, match=r"evaluate: invalid target_fpr=1.0: must be in \(0, 1\)"):
        reports.make_config(target_fpr=1.0)
    import argparse

    for module, cls in ((audit_cli, canary_audit.AuditConfig), (evaluate_cli, reports.EvalConfig)):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        defaults = vars(parser.parse_args([]))
        assert {name: defaults[name] for name in module.FLAGS} == {name: getattr(cls(), name) for name in module.FLAGS}


def test_overrides_read_values_as_the_schema_kind():
    c = cb.load_config("configs/digits_demo.py", ["--config.data.attributes=sex,race", "--config.seed=1e1",
                                                  "--config.data.options.minority_fraction=0.25"])
    assert c.data.attributes == "sex,race" and c.seed == 10 and c.data.options.minority_fraction == 0.25
    c = cb.load_config("configs/digits_demo.py", ["--config.data.attributes=('sex',)",
                                                  "--config.model.checkpoint=None"])
    assert c.data.attributes == ("sex",) and c.model.checkpoint == "None"  # a string field takes the text
    with pytest.raises(UsageError, match=r"config field 'config.data.augmult': cannot parse '2.5' as int"):
        cb.load_config("configs/digits_demo.py", ["--config.data.augmult=2.5"])


def test_consumers_read_config_fields_without_defaults():
    """After `upgrade`, every field exists: no `config....get(name, default)` and no KeyError migration."""
    found = []
    for path in (ROOT / "dpft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                root = node.func.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in ("config", "cfg"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
