"""The random streams of a run, each from its own domain.

Secret streams (what the DP guarantee rests on) come from a `RunSecret`: 256 bits drawn from
the operating system's CSPRNG (`secrets.token_bytes`) when a run starts, stored only inside
the run's checkpoints (never in config.json, logs, metrics or reports), restored on resume.

* noise:     NOISE_STREAMS (3) threefry keys, `noise_base_key(secret)`, each folded with the
             update index (192 key bits; guessing them costs about 2^128, see NOISE_STREAMS);
* selection: Poisson batch selection, `selection_entropy(secret)` (a 128-bit integer that
             seeds numpy's Philox through `SeedSequence`).

Each is derived as BLAKE2b(secret, person=domain), so knowing one stream (or the public
seed) says nothing about another, and the noise and selection streams never coincide.

Public streams come from `config.seed` and may be published: parameter init
(`nnx.Rngs(seed)`), dropout / stochastic depth (`dropout_key`, domain-separated from the
noise even when a test fixes the secret to the same number), augmentation
(`dpft.data.augment.example_rng`, its own numpy stream with tag 0xA06).

`RunSecret.insecure_fixed(n)` fixes the secret for tests and debugging only: anyone who knows
n can regenerate the noise and the selection, so such a run has NO privacy guarantee; the plan
records it and the loop warns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets as _os_secrets

import jax
import numpy as np

SECRET_BYTES = 32
SECRET_FORMAT = "dpft.secret/1"
#: csprng: a fresh secret (a valid guarantee); insecure_fixed_noise_seed: public (tests only);
#: csprng_after_public_noise: fresh, but drawn when resuming a checkpoint that held no secret, so
#: the updates before it used public noise (no guarantee for the run).
SOURCES = ("csprng", "insecure_fixed_noise_seed", "csprng_after_public_noise")
NOISE_DOMAIN = b"dpft-noise"
SELECTION_DOMAIN = b"dpft-selection"
DROPOUT_DOMAIN = 0xD0_0A17  # fold_in tag of the public dropout stream (never a fold of the noise key)


@dataclasses.dataclass(frozen=True)
class RunSecret:
    """The secret of one run: `value` 32 bytes; `source` "csprng" or "insecure_fixed_noise_seed"."""

    value: bytes = dataclasses.field(repr=False)
    source: str = "csprng"

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes) or len(self.value) != SECRET_BYTES:
            raise ValueError(f"RunSecret.value must be {SECRET_BYTES} bytes")
        if self.source not in SOURCES:
            raise ValueError(f"RunSecret.source must be one of {SOURCES}, got {self.source!r}")

    @classmethod
    def generate(cls) -> "RunSecret":
        """A fresh secret from the OS CSPRNG."""
        return cls(_os_secrets.token_bytes(SECRET_BYTES), "csprng")

    @classmethod
    def insecure_fixed(cls, seed: int) -> "RunSecret":
        """A secret that is a public function of `seed`: for tests and debugging ONLY (no DP)."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"insecure_fixed_noise_seed must be an int >= 0, got {seed!r}")
        digest = hashlib.blake2b(int(seed).to_bytes(16, "little"), digest_size=SECRET_BYTES,
                                 person=b"dpft-insecure").digest()
        return cls(digest, "insecure_fixed_noise_seed")

    @property
    def is_secure(self) -> bool:
        return self.source == "csprng"

    def to_json(self) -> dict:
        """For the checkpoint only (it contains the secret)."""
        return {"format": SECRET_FORMAT, "value": self.value.hex(), "source": self.source}

    @classmethod
    def from_json(cls, data: dict) -> "RunSecret":
        if not isinstance(data, dict) or data.get("format") != SECRET_FORMAT:
            raise ValueError(f"not a {SECRET_FORMAT} record")
        try:
            value = bytes.fromhex(str(data["value"]))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{SECRET_FORMAT}: bad value: {e}") from None
        return cls(value, str(data.get("source", "")))

    def to_words(self) -> np.ndarray:
        """uint32 [8]: the secret as words (to broadcast it between hosts)."""
        return np.frombuffer(self.value, dtype="<u4").astype(np.uint32)

    @classmethod
    def from_words(cls, words: np.ndarray, source: str) -> "RunSecret":
        return cls(np.asarray(words, "<u4").tobytes(), source)


def _derive(secret: RunSecret, domain: bytes, nbytes: int) -> bytes:
    return hashlib.blake2b(secret.value, digest_size=nbytes, person=domain).digest()


#: Independent threefry streams the noise is drawn from (`dpft.privacy.noise.standard_normals` sums
#: them): 64 key bits each, NOISE_KEY_BITS = 192 in all. Recomputing the noise by brute force costs
#: 2^192 draws; the best generic attack on a sum of separately keyed streams, meet in the middle (one
#: stream's 2^64 draws against the other two's 2^128 pairs, 3-SUM-like), about 2^128 draws with 2^64
#: stored values. Two streams were not enough: knowing the noise z, an adversary tabulates z_2(k_2)
#: for all 2^64 k_2 and, per k_1, looks up sqrt(2) z - z_1(k_1): 2^64 time and memory.
NOISE_STREAMS = 3
NOISE_KEY_BITS = 64 * NOISE_STREAMS


def noise_base_key(secret: RunSecret) -> jax.Array:
    """The run's noise key: NOISE_STREAMS independent threefry keys (key array [NOISE_STREAMS]) from
    NOISE_KEY_BITS = 192 bits derived from the 256-bit secret under NOISE_DOMAIN (BLAKE2b; 64 bits per
    stream, so one threefry key alone would fall to a 2^64 search; see NOISE_STREAMS for the attack
    costs of the sum)."""
    words = np.frombuffer(_derive(secret, NOISE_DOMAIN, 8 * NOISE_STREAMS), dtype="<u4").astype(np.uint32)
    return jax.random.wrap_key_data(words.reshape(NOISE_STREAMS, 2), impl="threefry2x32")


def selection_entropy(secret: RunSecret) -> int:
    """128-bit seed of the Poisson selection stream (`dpft.privacy.sampling.poisson_selection`)."""
    return int.from_bytes(_derive(secret, SELECTION_DOMAIN, 16), "little")


def dropout_key(seed: int, update: int | jax.Array) -> jax.Array:
    """Public key for dropout / stochastic depth in update `update`; the engine folds in each
    example's id (`dpft.privacy.engine.example_key_ids`), so an example's dropout is the same
    whichever physical batch, device or host it lands on."""
    base = jax.random.fold_in(jax.random.key(int(seed)), DROPOUT_DOMAIN)
    return jax.random.fold_in(base, update)


__all__ = ["RunSecret", "NOISE_STREAMS", "NOISE_KEY_BITS", "noise_base_key", "selection_entropy", "dropout_key"]
