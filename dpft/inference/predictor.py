"""`Predictor`: a model's forward pass over a run's data splits -> logits and predictions files.

The one place inference happens: the training loop uses it for its quick evaluation and its
final predictions, `dpft evaluate` for a restored checkpoint. It needs the run config, the data
tables and a forward function `forward(params, images [B, H, W, C]) -> logits [B, C]`; never the
optimizer or the DP step.

Multi-host: each host decodes only its shard of every eval batch; logits are gathered across
hosts, and the metadata comes from the table itself (same order on every host).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dpft import distributed, metrics
from dpft.config import build
from dpft.data import pipeline
from dpft.data.augment import AugmentConfig
from dpft.data.base import ExampleTable
from dpft.privacy.accounting import Ledger
from dpft.workdir import contract
from dpft.workdir import predictions as predictions_lib

Forward = Callable[[Any, jax.Array], jax.Array]


def table_columns(table: ExampleTable) -> dict[str, np.ndarray]:
    """example_id, patient_id, label (, label_mask), attr_<name> of every record, in table order."""
    recs = list(table.records())
    cols = {
        "example_id": np.asarray([r["example_id"] for r in recs], np.int64),
        "patient_id": np.asarray([str(r.get("patient_id", r["example_id"])) for r in recs], dtype=str),
    }
    if table.task == "multilabel":
        cols["label"] = np.stack([np.asarray(r["label"], np.float32) for r in recs])
        cols["label_mask"] = np.stack([np.asarray(r["label_mask"], np.float32) for r in recs])
    else:
        cols["label"] = np.asarray([int(r["label"]) for r in recs], np.int64)
    for a in table.attribute_names:
        cols[f"attr_{a}"] = np.asarray([str(r["attrs"].get(a, "Unknown")) for r in recs], dtype=str)
    return cols


def model_forward(model_merge: Callable[[Any], Any]) -> Forward:
    """The jitted eval forward pass of a merge function (params -> NNX module)."""
    return jax.jit(lambda p, images: model_merge(p)(images, train=False))


class Predictor:
    """Runs `forward` over the splits of `tables` with the eval preprocessing of `augment`."""

    def __init__(self, config: ml_collections.ConfigDict, tables: Mapping[str, ExampleTable], forward: Forward,
                 augment: AugmentConfig, mesh: Any):
        self.config = config
        self.tables = dict(tables)
        self.forward = forward
        self.augment = augment
        self.mesh = mesh
        self._columns: dict[str, dict[str, np.ndarray]] = {}
        self._gather = distributed.together(lambda x: multihost_utils.process_allgather(x, tiled=True), "logits")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, tables: Mapping[str, ExampleTable] | None = None,
                    ) -> tuple["Predictor", Any]:
        """(predictor, params template) for the model and data of a run config: the template is
        the trainable-parameter state (`nnx.Param`) of a freshly built model, replicated over the
        device mesh: the structure and sharding a checkpoint's params / EMA / Polyak items restore into."""
        from flax import nnx

        tables = dict(tables) if tables is not None else build.load_tables(config)
        split = build.train_split_name(config)
        source = tables[split] if split in tables else next(iter(tables.values()))
        fresh = ml_collections.ConfigDict(config.to_dict())  # the weights come from the run's checkpoint:
        fresh.model.checkpoint = ""                          # never re-read the pre-trained file
        model = build.build_model(fresh, source.num_classes)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        forward = model_forward(lambda p: nnx.merge(graphdef, p, rest))
        mesh = distributed.make_data_mesh()
        params = distributed.replicate(params, mesh)  # restored params take this sharding
        return cls(config, tables, forward, build.augment_config(config), mesh), params

    # ------------------------------------------------------------------ predictions
    def columns(self, split: str) -> dict[str, np.ndarray]:
        """`table_columns` of a split, read once (it reads every record: decodes TFDS images)."""
        if split not in self._columns:
            self._columns[split] = table_columns(self.tables[split])
        return self._columns[split]

    def predict_split(self, split: str, params: Any) -> dict[str, np.ndarray]:
        """Logits float32 [N, C] and the metadata columns of every example of `split`, in table order."""
        table = self.tables[split]
        ndev = jax.local_device_count()
        bs = max(ndev, int(self.config.eval.batch_size) // ndev * ndev)
        chunks = []
        for batch in pipeline.eval_batches(table, batch_size=bs, augment=self.augment,
                                           num_workers=int(self.config.data.num_workers),
                                           num_shards=jax.process_count(), shard_index=jax.process_index()):
            images = distributed.shard_batch({"image": batch["image"]}, self.mesh)["image"]
            logits = self.forward(params, images)
            if jax.process_count() > 1:
                logits = self._gather(logits)
            chunks.append(np.asarray(logits, np.float32))
        cols = dict(self.columns(split))
        cols["logits"] = np.concatenate(chunks)[: len(table)]
        return cols

    def quick_eval(self, split: str, params: Any) -> dict[str, float]:
        """The headline metric of `split` from the evaluation metric suite (`dpft.metrics`):
        multiclass top-1 accuracy as "<split>/accuracy"; multilabel mean AUC over the eval tasks
        as "<split>/mean_auc" (NaN when no task has both classes)."""
        out = self.predict_split(split, params)
        table = self.tables[split]
        logits = out["logits"].astype(np.float64)
        if table.task == "multiclass":
            z = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        else:
            probs = 1.0 / (1.0 + np.exp(-logits))
        inp = metrics.make_inputs(table.task, table.class_names, logits, probs, out["label"], out.get("label_mask"),
                                  table.eval_tasks, thresholds={})
        suite = metrics.metric_suite(inp)
        if table.task == "multiclass":
            return {f"{split}/accuracy": float(suite["top1"][0])}
        return {f"{split}/mean_auc": float(suite["auc_mean"][0]) if "auc_mean" in suite else float("nan")}

    def write_predictions(self, workdir: str, step: int, params: Any, which: str, *, ledger: Ledger,
                          plan: Mapping[str, Any]) -> dict[str, str]:
        """`workdir/predictions/<step>/<split>.npz` of `params` (`which`: ema, raw or polyak) for each
        prediction split (`contract.prediction_splits`) the data has -> {split: path}; a choice other than
        the run's `eval.params` in its own folder (`contract.predictions_path`). Epsilon and delta from the
        run's `ledger` and public `plan` dict. Every host runs the model (its shard); process 0 writes."""
        epsilon, delta, valid = contract.predictions_privacy(ledger, plan)
        paths = {}
        for split in contract.prediction_splits(self.config):
            if split not in self.tables:
                continue
            out = self.predict_split(split, params)
            if jax.process_index() != 0:
                continue
            table = self.tables[split]
            attrs = {k[len("attr_"):]: v for k, v in out.items() if k.startswith("attr_")}
            path = contract.predictions_path(workdir, step, split, contract.own_params(self.config, which))
            predictions_lib.write_predictions(
                path, example_id=out["example_id"], patient_id=out["patient_id"], logits=out["logits"],
                label=out["label"], label_mask=out.get("label_mask"), attrs=attrs, task=table.task,
                class_names=table.class_names, eval_tasks=table.eval_tasks, step=step, params=which,
                epsilon=epsilon, delta=delta, guarantee_valid=valid, privacy_unit=plan.get("unit", "example"))
            paths[split] = path
        return paths

