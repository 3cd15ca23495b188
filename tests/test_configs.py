"""dpft.config.base and dpft.config.validation: every experiment file, override coercion, JSON round
trip, validation rules. (Optimizers and schedules: tests/test_optim.py.)"""
import glob
import os

import pytest

from dpft.errors import UsageError
from dpft.config import base as cb
from dpft.config.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not os.path.basename(p).startswith("_")
)
EXPECTED = {"digits_demo", "chexpert_nfnet_f0", "mimic_cxr_nfnet_f0", "imagenet_nfnet_f3",
            "places365_nfnet_f3", "fake_chexpert_tiny"}


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out |= _keys(v, prefix + k + ".")
        else:
            out.add(prefix + k)
    return out


def test_all_expected_config_files_exist():
    assert EXPECTED <= {os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_files_are_complete_locked_and_valid(path):
    config = cb.load_config(path, [])
    assert _keys(config.to_dict()) == _keys(cb.base_config().to_dict())
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.train.batchsize = 3
    # Valid apart from data paths that only exist on a real machine.
    validate(config, check_paths=False, num_devices=1)


def test_paper_recipes():
    chex = cb.load_config(os.path.join(ROOT, "configs/chexpert_nfnet_f0.py"), [])
    assert (chex.model.name, chex.privacy.clip_norm, chex.privacy.delta, chex.train.batch_size) == ("nfnet_f0", 1e-3, 0.0, 1024)
    assert chex.privacy.unit == "patient"  # the medical recipes protect patients (batch sizes in patients)
    assert chex.privacy.epsilon == 8.0
    inet = cb.load_config(os.path.join(ROOT, "configs/imagenet_nfnet_f3.py"), ["--config.train.batch_size=262144"])
    assert (inet.model.name, inet.privacy.clip_norm, inet.privacy.delta, inet.data.augmult) == ("nfnet_f3", 1.0, 8e-7, 16)
    assert (inet.train.ema_decay, inet.train.optimizer.name) == (0.9999, "sgd")
    # The papers' delta = 8e-7 is just above 1/N for ImageNet; validate says so.
    with pytest.warns(UserWarning, match="1/N"):
        validate(inet, check_paths=False, num_examples=1_281_167, num_devices=8)


def test_config_arg_sets_epsilon():
    path = os.path.join(ROOT, "configs/chexpert_nfnet_f0.py")
    assert cb.load_config(path + ":eps=4", []).privacy.epsilon == 4.0
    assert cb.load_config(path + ":eps=0.5,steps=7", []).train.num_updates == 7
    with pytest.raises(UsageError, match="epsilonn"):
        cb.load_config(path + ":privacy.epsilonn=4", [])


def test_override_type_coercion():
    c = cb.load_config(
        os.path.join(ROOT, "configs/digits_demo.py"),
        [
            "--config.privacy.enabled=False",
            "config.privacy.epsilon=4",
            "--config.train.batch_size=1024",
            "--config.privacy.delta=1e-5",
            "--config.model.checkpoint=/tmp/x.npz",
            "--config.eval.splits=train,test",
            "--config.data.random_flip=yes",
            "--config.train.num_updates=2e3",
            "--config.privacy.noise_multiplier=None",
            "--config.model.name", "wrn_16_4",
        ],
    )
    assert c.privacy.enabled is False
    assert c.privacy.epsilon == 4.0 and isinstance(c.privacy.epsilon, float)
    assert c.train.batch_size == 1024 and isinstance(c.train.batch_size, int)
    assert c.privacy.delta == 1e-5
    assert c.model.checkpoint == "/tmp/x.npz"
    assert c.eval.splits == ("train", "test")
    assert c.data.random_flip is True
    assert c.train.num_updates == 2000 and isinstance(c.train.num_updates, int)
    assert c.privacy.noise_multiplier is None
    assert c.model.name == "wrn_16_4"


def test_coerce_tuple_of_numbers_and_errors():
    assert cb.coerce_value("1,2,3", (0, 40), field="f") == (1, 2, 3)
    assert cb.coerce_value("(0.5, 1)", (1.0,), field="f") == (0.5, 1)
    assert cb.coerce_value("", ("a",), field="f") == ()
    with pytest.raises(UsageError, match="config.train.batch_size"):
        cb.coerce_value("2.5", 3, field="config.train.batch_size")
    with pytest.raises(UsageError, match="maybe"):
        cb.coerce_value("maybe", True, field="f")
    with pytest.raises(UsageError, match="float"):
        cb.coerce_value("abc", 1.0, field="f")


def test_unknown_field_errors_name_the_field():
    path = os.path.join(ROOT, "configs/digits_demo.py")
    with pytest.raises(UsageError, match=r"config\.privacy\.epsilo'.*did you mean 'privacy\.epsilon'"):
        cb.load_config(path, ["--config.privacy.epsilo=4"])
    with pytest.raises(UsageError, match=r"config\.trainn"):
        cb.load_config(path, ["--config.trainn.batch_size=4"])
    with pytest.raises(UsageError, match="group"):
        cb.load_config(path, ["--config.train=4"])
    with pytest.raises(UsageError, match="no value"):
        cb.load_config(path, ["--config.seed"])
    with pytest.raises(UsageError, match="not found"):
        cb.load_config(os.path.join(ROOT, "configs/nope.py"), [])


def test_json_round_trip():
    c = cb.load_config(os.path.join(ROOT, "configs/chexpert_nfnet_f0.py"), ["--config.eval.splits=validation,test"])
    text = cb.config_to_json(c)
    back = cb.config_from_json(text)
    assert back.to_dict() == c.to_dict()
    assert back.eval.splits == ("validation", "test") and back.data.options.age_edges == (18, 40, 60, 80)
    assert back.is_locked
    with pytest.raises(UsageError, match="malformed"):
        cb.config_from_json("{not json")


# ----------------------------------------------------------------------------- validation


def _valid():
    c = cb.base_config()
    validate(c, num_examples=10_000, num_devices=1)
    return c


def _set(c, path, value):
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    with c.ignore_type():
        node[leaf] = value
    return c


RULES = [
    # (field, bad value, message fragment)
    ("train.physical_batch_size", 60, "multiple of config.train.microbatch_size"),
    ("privacy.clip_norm", 0.0, "must be > 0"),
    ("privacy.clip_norm", -1.0, "must be > 0"),
    ("privacy.delta", 1.0, "[0, 1)"),
    ("privacy.delta", -1e-5, "[0, 1)"),
    ("privacy.epsilon", 0.0, "must be > 0"),
    ("privacy.noise_multiplier", -1.0, ">= 0"),
    ("data.augmult", 0, ">= 1"),
    ("train.ema_decay", 1.0, "[0, 1)"),
    ("train.ema_decay", -0.1, "[0, 1)"),
    ("train.num_updates", 0, "in [1, 10000000]"),
    ("train.batch_size", 0, ">= 1"),
    ("train.microbatch_size", 0, ">= 1"),
    ("model.name", "resnet_50", "not a known model"),
    ("model.dtype", "float16", "not one of"),
    ("data.name", "cifar10", "not one of"),
    ("train.optimizer.name", "lamb", "not one of"),
    ("train.optimizer.learning_rate", 0.0, "> 0"),
    ("train.optimizer.momentum", 1.0, "[0, 1)"),
    ("train.optimizer.weight_decay", -1.0, ">= 0"),
    ("train.lr_schedule.name", "step", "not one of"),
    ("privacy.clipping", "adaptive", "not one of"),
    ("privacy.accountant", "moments", "not one of"),
    ("privacy.insecure_fixed_noise_seed", 1.5, "must be -1"),
    ("eval.params", "swa", "not one of"),
    ("eval.splits", (), "non-empty"),
    ("eval.batch_size", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"),
    ("train.keep_checkpoints", 0, ">= 1"),
    ("data.image_size", 0, ">= 1"),
    ("seed", -1, "in [0, 4294967295]"),
    ("seed", 2**32, "in [0, 4294967295]"),
    ("train.num_updates", 10**7 + 1, "in [1, 10000000]"),
    ("train.batch_size", 2.5, "integer"),
    ("privacy.enabled", "yes", "true or false"),
]


@pytest.mark.parametrize("field,value,fragment", RULES, ids=[f"{r[0]}={r[1]!r}" for r in RULES])
def test_each_rule_raises_naming_field_and_value(field, value, fragment):
    c = _set(_valid(), field, value)
    with pytest.raises(UsageError) as e:
        validate(c, num_examples=10_000)
    msg = str(e.value)
    assert f"config.{field}={value!r}" in msg
    assert fragment in msg


def test_combination_rules():
    c = _valid()
    with pytest.raises(UsageError, match=r"config.train.batch_size=256 is larger than the training set \(N=100\)"):
        validate(c, num_examples=100)
    with pytest.raises(UsageError, match="not divisible by the 3 local devices"):
        validate(c, num_devices=3)
    c = _set(_valid(), "train.physical_batch_size", 64)
    _set(c, "train.microbatch_size", 16)
    with pytest.raises(UsageError, match="gives 8 examples per device"):
        validate(c, num_devices=8)
    c = _set(_valid(), "train.lr_schedule.name", "warmup_cosine")
    _set(c, "train.lr_schedule.warmup_steps", 100)
    with pytest.raises(UsageError, match="warmup_steps=100 must be < config.train.num_updates=100"):
        validate(c)
    c = _set(_valid(), "train.ema_decay", 0.0)
    with pytest.raises(UsageError, match="config.eval.params='ema'"):
        validate(c)
    c = _set(_valid(), "data.name", "chexpert")
    with pytest.raises(UsageError, match="config.data.root=''"):
        validate(c)
    _set(c, "data.root", "/nonexistent/dir")
    with pytest.raises(UsageError, match="is not a directory"):
        validate(c)
    validate(c, check_paths=False)
    c = _set(_valid(), "model.checkpoint", "/nonexistent/F0.npz")
    with pytest.raises(UsageError, match="config.model.checkpoint='/nonexistent/F0.npz' does not exist"):
        validate(c)


def test_privacy_off_relaxes_privacy_rules_and_sigma_bypasses_epsilon():
    c = _set(_valid(), "privacy.enabled", False)
    _set(c, "privacy.epsilon", 0.0)
    _set(c, "privacy.clip_norm", 0.0)
    validate(c)
    c = _set(_valid(), "privacy.epsilon", 0.0)
    _set(c, "privacy.noise_multiplier", 1.1)
    validate(c)


def test_all_errors_reported_together_and_shuffle_is_gone():
    c = _set(_valid(), "data.augmult", 0)
    _set(c, "train.num_updates", 0)
    with pytest.raises(UsageError) as e:
        validate(c)
    assert "config.data.augmult=0" in str(e.value) and "config.train.num_updates=0" in str(e.value)
    with pytest.raises(KeyError):  # no shuffled batches: the option does not exist any more
        _set(_valid(), "privacy.sampling", "shuffle")


def test_default_delta_warns_that_it_is_weak():
    """delta defaults to 1/N (the papers' choice); the >= 1/N warning fires for it too."""
    with pytest.warns(UserWarning, match="weak guarantee"):
        notes = validate(_valid(), num_examples=1000)
    assert any("delta=0.0 means delta=0.001" in n for n in notes)
    c = _set(_valid(), "privacy.delta", 1e-5)
    assert not any("weak" in n for n in validate(c, num_examples=1000))


def test_insecure_fixed_noise_seed_is_validated_and_loud():
    c = _set(_valid(), "privacy.insecure_fixed_noise_seed", 3)
    with pytest.warns(UserWarning, match="NO differential-privacy guarantee"):
        validate(c)
    with pytest.raises(UsageError, match="insecure_fixed_noise_seed=-5"):
        validate(_set(_valid(), "privacy.insecure_fixed_noise_seed", -5))


# ----------------------------------------------------------------------------- optimizer


def test_config_flags_conventions_bare_booleans_and_space_separated_values():
    c = cb.load_config("configs/digits_demo.py", ["--config.train.polyak", "--config.privacy.epsilon", "2.5",
                                                  "--config.data.random_flip=false"])
    assert c.train.polyak is True and c.privacy.epsilon == 2.5 and c.data.random_flip is False
    # A bare boolean never swallows the next flag as its value (the old parser did).
    c = cb.load_config("configs/digits_demo.py", ["--config.train.polyak", "--config.train.num_updates=7"])
    assert c.train.polyak is True and c.train.num_updates == 7
    with pytest.raises(UsageError, match="has no value"):
        cb.load_config("configs/digits_demo.py", ["--config.train.num_updates", "--config.train.polyak"])
    c = cb.load_config("configs/digits_demo.py", [])
    assert not c.train.polyak


def test_recipes_import_their_shared_parts_as_a_package(tmp_path):
    import shutil

    # The paper recipes import configs/_medical.py as `from configs import _medical`.
    chex = cb.load_config(os.path.join(ROOT, "configs", "chexpert_nfnet_f0.py"), [])
    assert chex.data.name == "chexpert" and chex.model.name == "nfnet_f0"
    # A second checkout's configs package (same package name, other files) is loaded from its own path.
    other = tmp_path / "elsewhere" / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), other, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "_medical.py").write_text((other / "_medical.py").read_text().replace(
        "def medical_config(", "MARK = 1\n\n\ndef medical_config("))
    import sys
    cb.load_config(str(other / "chexpert_nfnet_f0.py"), [])
    assert getattr(sys.modules["configs._medical"], "MARK", None) == 1
    cb.load_config(os.path.join(ROOT, "configs", "chexpert_nfnet_f0.py"), [])
    assert not hasattr(sys.modules["configs._medical"], "MARK")


def test_recipes_set_only_what_differs_from_the_base():
    """flax's v100_x8.py style: a recipe line that restates a base default is noise (and hides
    which settings are the experiment's own). Literal assignments `c.a.b = <literal>` are checked."""
    import ast

    def starts_from_base(fn: ast.FunctionDef) -> bool:  # `c = base_config(...)`; derived recipes compare to their parent
        return any(isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                   and getattr(n.value.func, "id", getattr(n.value.func, "attr", "")) == "base_config"
                   for n in ast.walk(fn))

    base = cb.base_config(locked=False)
    restated = []
    for path in [*glob.glob(os.path.join(ROOT, "configs", "*.py")), os.path.join(ROOT, "dpft", "demo", "recipe.py")]:
        functions = [f for f in ast.walk(ast.parse(open(path).read())) if isinstance(f, ast.FunctionDef)]
        for node in (n for f in functions if starts_from_base(f) for n in ast.walk(f)):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            target, parts = node.targets[0], []
            while isinstance(target, ast.Attribute):
                parts.insert(0, target.attr)
                target = target.value
            if not (isinstance(target, ast.Name) and target.id == "c" and parts):
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            current: object = base
            for p in parts:
                current = current[p] if isinstance(current, cb.ConfigDict) and p in current else KeyError
            if current is not KeyError and type(current) is type(value) and current == value:
                restated.append(f"{os.path.basename(path)}:{node.lineno}: c.{'.'.join(parts)} = {value!r}")
    assert restated == []
