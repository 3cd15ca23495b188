"""Private hyper-parameter selection: a random number of trials, the best one kept, its cost accounted.

Papernot & Steinke (2022, "Hyperparameter tuning with Renyi differential privacy", arXiv:2110.03620):
run K independent trials, K drawn from a known distribution, each trial a DP training run with
hyper-parameters drawn at random from the candidates, and release only the best trial by a score.
If one trial is (lambda, eps(lambda))-RDP, the release is RDP with a cost that grows like
log(E[K]) / (lambda - 1) plus a constant -- far less than K-fold composition, which is what
picking the best of a fixed grid costs.

Distributions of K (`DISTRIBUTIONS`, dp-accounting's `RepeatAndSelectDpEvent` shapes):
  "poisson"            K ~ Poisson(mean) (K may be 0: nothing is released)     shape = inf
  "geometric"          truncated negative binomial with eta = 1                  shape = 1
  "logarithmic"        truncated negative binomial with eta = 0                  shape = 0
  "negative_binomial:ETA" truncated negative binomial, 0 < ETA < inf             shape = ETA
The accounting is dp-accounting's RDP accountant (at `accounting.RDP_ORDERS`, the run's RDP
orders) over `RepeatAndSelectDpEvent(trial event, mean, shape)`; dp-accounting's PLD accountant
does not support that event. The number of trials is drawn from the OS's CSPRNG (`secrets`).
"""
from __future__ import annotations

import dataclasses
import math
import secrets

import dp_accounting
from dp_accounting import dp_event
import numpy as np

from dpft.privacy import accounting

#: name -> dp-accounting shape of the distribution of the number of trials.
DISTRIBUTIONS: dict[str, float] = {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}
NEGATIVE_BINOMIAL = "negative_binomial"
#: The accountant of the selection (see the module doc).
SELECTION_ACCOUNTANT = "rdp"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How many trials run: `distribution` (a name of `DISTRIBUTIONS` or "negative_binomial:ETA") with
    mean `mean` (>= 1; the expected number of trials)."""

    distribution: str
    mean: float

    def __post_init__(self) -> None:
        shape_of(self.distribution)  # raises on an unknown name
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean) and self.mean >= 1):
            raise ValueError(f"private selection: the mean number of trials must be a finite number >= 1, "
                             f"got {self.mean!r}")

    @property
    def shape(self) -> float:
        return shape_of(self.distribution)

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "mean": float(self.mean), "shape": self.shape}


def shape_of(distribution: str) -> float:
    """The dp-accounting shape of `distribution` (see the module doc); ValueError naming the choices."""
    if distribution in DISTRIBUTIONS:
        return DISTRIBUTIONS[distribution]
    if isinstance(distribution, str) and distribution.startswith(NEGATIVE_BINOMIAL + ":"):
        text = distribution.split(":", 1)[1]
        try:
            eta = float(text)
        except ValueError:
            eta = math.nan
        if 0 < eta < math.inf:
            return eta
        raise ValueError(f"private selection: {distribution!r}: the negative binomial's shape ETA must be a number "
                         f"in (0, inf), got {text!r}")
    raise ValueError(f"private selection: unknown distribution {distribution!r}; choose one of "
                     f"{sorted(DISTRIBUTIONS)} or '{NEGATIVE_BINOMIAL}:ETA'")


def tnb_gamma(shape: float, mean: float) -> float:
    """gamma of the truncated negative binomial (eta = `shape` >= 0) whose mean is `mean` (bisection on
    the mean, which falls as gamma grows: E[K] = eta (1-gamma) / (gamma (1 - gamma^eta)), and
    (1/gamma - 1) / log(1/gamma) for eta = 0). Returns the gamma at or ABOVE the exact one: K drawn with it
    has a mean at most `mean`, so the accounting at `mean` covers it."""
    if mean == 1:
        return 1.0

    def tnb_mean(g: float) -> float:
        if shape == 0:
            return (1 / g - 1) / math.log(1 / g)
        return shape * (1 - g) / (g * -math.expm1(shape * math.log(g)))

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid == lo or mid == hi:
            break
        if tnb_mean(mid) < mean:
            hi = mid
        else:
            lo = mid
    return hi


def draw_num_trials(scheme: Scheme, rng: np.random.Generator | None = None) -> int:
    """K, the number of trials, drawn from `scheme` (`rng` default: seeded from `secrets`, 128 bits).
    Poisson may give 0; the truncated negative binomials give K >= 1."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    shape = scheme.shape
    if shape == math.inf:
        return int(rng.poisson(scheme.mean))
    gamma = tnb_gamma(shape, scheme.mean)
    if gamma >= 1.0:
        return 1
    while True:  # the negative binomial conditioned on K >= 1 (eta = 0: the logarithmic series)
        k = int(rng.logseries(1 - gamma)) if shape == 0 else int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


def selection_event(trial_event: dp_accounting.DpEvent, scheme: Scheme) -> dp_accounting.DpEvent:
    """The DpEvent of releasing the best of K ~ `scheme` trials, each `trial_event`."""
    return dp_event.RepeatAndSelectDpEvent(trial_event, float(scheme.mean), scheme.shape)


def selection_epsilon(trial_event: dp_accounting.DpEvent, scheme: Scheme, delta: float) -> float:
    """epsilon at `delta` of the selected trial (dp-accounting's RDP accountant at the run's orders)."""
    acc = accounting.make_accountant(SELECTION_ACCOUNTANT)
    acc.compose(selection_event(trial_event, scheme))
    return float(acc.get_epsilon(delta))


# ------------------------------------------------------------------ the selection file of a sweep

#: WORKDIR/selection.json of `launch/sweep.py --private-selection`: the drawn number of trials and each
#: trial's hyper-parameters (written once, before any trial runs; a rerun of the sweep reuses it, never
#: redraws: drawing K again until it suits would void the guarantee).
SELECTION_FILE = "selection.json"
FORMAT = "dpft.selection/1"
#: Swept fields that would make the trials differ in their privacy accounting (q, sigma, T, the data):
#: every trial must be the same DP mechanism for the selection's accounting (checked again on the
#: trials' ledgers by `dpft evaluate --compare`). Every privacy.* field but the clipping's hyper-
#: parameters (`TUNABLE_PRIVACY_FIELDS`: sigma is relative to the sensitivity, so epsilon does not move).
ACCOUNTING_FIELDS = ("privacy.", "data.", "train.batch_size", "train.num_updates")
TUNABLE_PRIVACY_FIELDS = ("privacy.clip_norm", "privacy.clipping", "privacy.gamma")
#: Evaluation of each trial on this split chooses the selected one (`contract.VALIDATION`'s name).
TRIAL_DIR = "trial-{:03d}"
SELECTION_EVAL_DIR = "selection"  # TRIAL/selection/metrics.json: the trial's metrics on the validation split


def accounting_field(field: str) -> bool:
    """Whether sweeping `field` (dotted, without "config.") would change a trial's privacy accounting."""
    if field in TUNABLE_PRIVACY_FIELDS:
        return False
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in ACCOUNTING_FIELDS)


def draw_trials(axes: list[tuple[str, list[str]]], num_trials: int, rng: np.random.Generator | None = None
                ) -> list[dict[str, str]]:
    """Each trial's hyper-parameters: one value per axis drawn uniformly (independently per trial, as
    the analysis requires: each trial is the same randomized algorithm), and a fresh `seed`."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    trials = []
    for _ in range(num_trials):
        t = {field: values[int(rng.integers(len(values)))] for field, values in axes}
        t["seed"] = str(int(rng.integers(2**31 - 1)))
        trials.append(t)
    return trials


def selection_doc(scheme: Scheme, axes: list[tuple[str, list[str]]], trials: list[dict[str, str]], metric: str | None
                  ) -> dict:
    """The content of SELECTION_FILE."""
    return {"format": FORMAT, "scheme": scheme.to_dict(), "axes": [[f, list(v)] for f, v in axes],
            "num_trials": len(trials), "metric": metric,
            "trials": [{"name": TRIAL_DIR.format(i), "assignment": t} for i, t in enumerate(trials)]}


def read_selection_doc(doc: object, path: str) -> tuple[Scheme, dict]:
    """Checks a parsed SELECTION_FILE -> (its Scheme, the doc); ValueError naming the file and field."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}")
    try:
        scheme = Scheme(str(doc["scheme"]["distribution"]), float(doc["scheme"]["mean"]))
        trials = doc["trials"]
        if int(doc["num_trials"]) != len(trials) or not all(isinstance(t["name"], str) for t in trials):
            raise ValueError("num_trials does not match the trials listed")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid selection record ({e})") from None
    return scheme, doc
