"""Image decoding and augmentation (numpy + PIL, pure functions of image and rng).

Train: decode -> K views, each an independent random crop (random-resized-crop or
pad-and-crop) + optional horizontal flip -> float32 normalised. Eval: decode -> resize
the shorter side to `image_size / eval_crop_fraction` -> centre crop `image_size`.
Randomness comes only from `example_rng(seed, update_index, example_id)`, so a view
is the same whatever thread or host computes it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dpft import paths, remote_files
from dpft.errors import DataError

CROPS = ("random_resized", "pad_crop", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How images become model inputs. Sizes in pixels; mean/std on the [0, 1] scale."""

    image_size: int = 224
    channels: int = 3
    crop: str = "random_resized"  # "random_resized" | "pad_crop" | "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction range (random_resized)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (random_resized)
    pad: int = 4  # pixels of reflection padding (pad_crop)
    flip: bool = True  # horizontal flip with p=0.5 (turn off for X-rays: laterality matters)
    augmult: int = 1  # K views per example
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    eval_crop_fraction: float = 0.875
    eval_image_size: int | None = None  # test resolution; None -> image_size

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DataError(f"augment.crop must be one of {CROPS}, got {self.crop!r}")
        if self.image_size < 1 or self.augmult < 1:
            raise DataError(f"augment: image_size and augmult must be >= 1, got {self.image_size}, {self.augmult}")
        if self.channels not in (1, 3):
            raise DataError(f"augment.channels must be 1 or 3, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            if len(self.mean) == 3 and self.channels == 1:
                object.__setattr__(self, "mean", (float(np.mean(self.mean)),))
                object.__setattr__(self, "std", (float(np.mean(self.std)),))
            else:
                raise DataError(f"augment: mean/std need {self.channels} values, got {self.mean}, {self.std}")
        if not 0.0 < self.eval_crop_fraction <= 1.0:
            raise DataError(f"augment.eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")

    @classmethod
    def from_config(cls, cfg: Any | None) -> "AugmentConfig":
        """From a dict / ml_collections ConfigDict (unknown keys are an error)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"augment: unknown option(s) {unknown}; known: {sorted(names)}")
        for k in ("crop_scale", "crop_ratio", "mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)


def example_rng(seed: int, update_index: int, example_id: int) -> np.random.Generator:
    """The generator of one example's views in one update (independent of thread/host)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(update_index), int(example_id) + 1, 0xA06])


def decode_image(image: Any, *, channels: int = 3) -> Image.Image:
    """A path, encoded bytes or uint8 [H, W] / [H, W, C] array -> PIL image in mode RGB (3) or L (1).

    Raises `DataError` naming the file for missing, unreadable or truncated images.
    """
    mode = "RGB" if channels == 3 else "L"
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise DataError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return Image.fromarray(arr).convert(mode)
    where = image if isinstance(image, str) else "<encoded bytes>"
    try:
        if isinstance(image, str) and paths.is_remote(image):  # gs://... through etils.epath
            img = Image.open(io.BytesIO(remote_files.read_bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            img = Image.open(image)
        else:
            img = Image.open(io.BytesIO(image))
        img.load()  # forces a full decode: truncated files fail here
        return img.convert(mode)
    except FileNotFoundError as e:
        raise DataError(f"{where}: image file not found") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode image ({e})") from e


def _to_float(img: Image.Image, cfg: AugmentConfig) -> np.ndarray:
    x = np.asarray(img, dtype=np.float32) / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def random_resized_box(width: int, height: int, rng: np.random.Generator,
                       scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area fraction in `scale`, aspect in `ratio`.

    10 tries, then the centre crop at the clamped ratio (as torchvision / big_vision)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def train_view(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """One random view: float32 [S, S, C] with S = cfg.image_size."""
    s = cfg.image_size
    if cfg.crop == "random_resized":
        box = random_resized_box(img.width, img.height, rng, cfg.crop_scale, cfg.crop_ratio)
        out = img.resize((s, s), Image.BILINEAR, box=box)
        arr = np.asarray(out)
    elif cfg.crop == "pad_crop":
        base = img if img.size == (s, s) else img.resize((s, s), Image.BILINEAR)
        arr = np.asarray(base)
        pad = [(cfg.pad, cfg.pad), (cfg.pad, cfg.pad)] + ([(0, 0)] if arr.ndim == 3 else [])
        padded = np.pad(arr, pad, mode="reflect")
        y0, x0 = (int(v) for v in rng.integers(0, 2 * cfg.pad + 1, size=2))
        arr = padded[y0:y0 + s, x0:x0 + s]
    else:
        arr = np.asarray(img if img.size == (s, s) else img.resize((s, s), Image.BILINEAR))
    if cfg.flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return _to_float(Image.fromarray(np.ascontiguousarray(arr)), cfg)


def train_views(image: Any, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """K = cfg.augmult independent views of one example: float32 [K, S, S, C]."""
    img = image if isinstance(image, Image.Image) else decode_image(image, channels=cfg.channels)
    return np.stack([train_view(img, rng, cfg) for _ in range(cfg.augmult)])


def eval_view(image: Any, cfg: AugmentConfig) -> np.ndarray:
    """Deterministic centre crop at the test resolution: float32 [S, S, C]."""
    img = image if isinstance(image, Image.Image) else decode_image(image, channels=cfg.channels)
    s = cfg.eval_image_size or cfg.image_size
    short = max(s, int(round(s / cfg.eval_crop_fraction)))
    w, h = img.size
    scale = short / min(w, h)
    nw, nh = max(s, int(round(w * scale))), max(s, int(round(h * scale)))
    img = img.resize((nw, nh), Image.BILINEAR)
    x0, y0 = (nw - s) // 2, (nh - s) // 2
    return _to_float(img.crop((x0, y0, x0 + s, y0 + s)), cfg)
