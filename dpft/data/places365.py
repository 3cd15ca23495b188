"""Places-365 from a prepared TFDS `places365_small` directory (256x256 images), read without TF.

Same pattern as ImageNet (see `dpft.data.imagenet`): "train" = TFDS train minus its last
`holdout` (10,000) examples, "validation" = those, "test" = the official validation set
(the official test set has no labels). Preparing needs TensorFlow; dpft asks for a prepared dir.
"""
from __future__ import annotations

from typing import Any

from dpft.data.base import DatasetSpec, options_from
from dpft.data.base import ExampleTable
from dpft.data.imagenet import TfdsOptions, load_tfds_splits

NAME = "places365_small"


def load_splits(root: str, **options: Any) -> dict[str, ExampleTable]:
    """{"train", "validation", "test"} of Places-365 from the TFDS data dir `root`."""
    opts = options_from(TfdsOptions, options, NAME)
    return load_tfds_splits(root, NAME, "validation", opts.holdout)


DATASET = DatasetSpec(load_splits, TfdsOptions, required_attributes=())  # no subgroup attributes
