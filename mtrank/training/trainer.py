"""Training: streamed minibatches, masked multi-task loss, early stopping on validation loss,
data-parallel workers (torch.distributed), checkpoints and resume.

:func:`train` is ``mtrank train``: it reads the splits as datasets (mtrank.training.streaming), fits the
preprocessing in one streaming pass, trains (one process, or one of the workers ``torchrun`` /
``--nproc`` starts), evaluates exactly on the whole test split, and has rank 0 publish the run
directory when everything is written. :func:`resume` continues a killed run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mtrank.spec import STRICT, FeatureSpec, SpecError, load_yaml, validate
from mtrank.training import distributed
from mtrank.training.checkpoint import (
    config_hash,
    load_optimizer,
    load_train_state,
    optimizer_tensors,
    partial_dir,
    publish_run,
    save_run,
    save_train_state,
    write_json_atomic,
)
from mtrank.training.distributed import Context
from mtrank.training.evaluate import evaluate, evaluate_frames
from mtrank.training.features import Preprocessor
from mtrank.training.losses import LossWeighting, masked_task_losses
from mtrank.training.models.base import MultiTaskModel
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.outputs import OutputLayer, TaskOutput, default_outputs, fit_outputs
from mtrank.training.streaming import SplitSource, Tensors, TrainStream, chunks, fit_preprocessing, to_tensors


@dataclass
class TrainConfig:
    """The ``train:`` section of a config file, validated strictly (see mtrank.spec)."""

    __pydantic_config__ = STRICT

    epochs: int = 4
    """Upper bound on passes over the training split."""
    batch_size: int = 1024
    """Rows per optimiser step over all workers: each of N data-parallel workers takes
    ``batch_size // N``, so N workers take the same steps as one process."""
    lr: float = 2e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    patience: int = 1
    """Epochs without validation-loss improvement before stopping; the best epoch is kept."""
    valid_loss: Literal["groups", "rows"] = "groups"
    """Early stopping's validation loss. ``groups``: per user group, the summed task losses of the
    predictions that group is served (its own heads), then the mean over the groups, so a group of a
    few percent of the rows counts as much as the largest (docs/training.md, issue 32); ``rows``:
    every head's loss over all rows, which the largest group decides. Without user groups: ``rows``."""
    seed: int = 0
    loss_weighting: Literal["static", "dynamic", "uncertainty"] = "static"
    """static | dynamic (ω_k0·γ_k^t) | uncertainty."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """ω_k0 per task (default 1)."""
    task_gammas: dict[str, float] = field(default_factory=dict)
    """γ_k per task for dynamic weighting (default 1)."""
    threads: int = 1
    """torch intra-op threads per worker; fixed so two runs with one seed give identical results. One
    is fastest for these small MLPs on a shared 2-core machine (two threads spin-wait for a core)."""
    eval_train_rows: int = 50_000
    """Train rows re-scored after training, for the train−test gap."""
    shuffle_rows: int = 65_536
    """Rows shuffled together (rounded down to whole batches, at least one): the bounded shuffle
    buffer, so memory does not grow with the split (see mtrank.training.streaming)."""
    checkpoint_every: int = 1000
    """Optimiser steps between checkpoints; 0: only at the end of each epoch."""
    max_vocab: int = 2_000_000
    """Most keys per sparse field, the most frequent ones; also bounds the key counters
    (docs/training.md: ids beyond it share the out-of-vocabulary row)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "threads", "eval_train_rows", "shuffle_rows", "max_vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.patience < 0 or self.checkpoint_every < 0:
            raise ValueError("lr must be > 0, weight_decay, patience and checkpoint_every >= 0")

    def check_tasks(self, spec: FeatureSpec, source: str) -> None:
        """Task weights and gammas must name the spec's tasks."""
        for key in ("task_weights", "task_gammas"):
            unknown = sorted(set(getattr(self, key)) - set(spec.task_names))
            if unknown:
                raise SpecError(f"{source}: train.{key}.{unknown[0]}: not a task; tasks are {spec.task_names}")


class Objective(nn.Module):
    """The model and its loss weighting: a batch → the weighted multi-task loss. This is what
    DistributedDataParallel wraps, so learnable task weights (uncertainty) are averaged too."""

    def __init__(self, model: MultiTaskModel, weighting: LossWeighting, outputs: list[TaskOutput]):
        super().__init__()
        self.model = model
        self.weighting = weighting
        spec = model.spec
        task_index = {t.name: k for k, t in enumerate(spec.tasks)}
        self.register_buffer("head_task", torch.tensor([task_index[h.task] for h in model.heads]), persistent=False)
        self.register_buffer(
            "is_binary", torch.tensor([spec.task(h.task).type == "binary" for h in model.heads]), persistent=False
        )
        self.head_outputs = OutputLayer([outputs[task_index[h.task]] for h in model.heads])
        self.task_outputs = OutputLayer(outputs)

    def served_loss_sums(self, dense, sparse, labels, space, group, item) -> tuple[torch.Tensor, torch.Tensor]:
        """Per user group and task, the loss of the predictions the group is served (its own heads),
        summed over the rows inside the task's space, and those rows' count: two ``[G, n_tasks]``
        float64 tensors (G = the spec's user groups, 1 without)."""
        served = self.model.own_task_logits(self.model(dense, sparse), group, item)
        out = self.task_outputs
        preds, targets = out.loss_inputs(served), out.normalise(labels)
        bce = F.binary_cross_entropy_with_logits(preds, targets, reduction="none")
        per_row = torch.where(out.is_binary, bce, (preds - targets) ** 2) * space
        spec = self.model.spec
        n_groups = 1 if spec.user_groups is None else len(spec.user_groups.values)
        sums = torch.zeros(n_groups, per_row.shape[1], dtype=torch.float64, device=per_row.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, group, per_row.double())
        counts.index_add_(0, group, space.double())
        return sums, counts

    def head_losses(self, dense, sparse, labels, space, group, item) -> torch.Tensor:
        """Per-head masked loss ``[H]`` (see mtrank.training.losses)."""
        logits = self.model(dense, sparse)
        masks = space[:, self.head_task] * self.model.head_row_mask(group, item)
        out = self.head_outputs
        return masked_task_losses(out.loss_inputs(logits), out.normalise(labels[:, self.head_task]), masks,
                                  self.is_binary)

    def forward(self, dense, sparse, labels, space, group, item, epoch: int) -> torch.Tensor:
        return self.weighting(self.head_losses(dense, sparse, labels, space, group, item), epoch)


class _InMemory:
    """Batches of a :class:`Tensors` held in memory, reshuffled each epoch (a seeded permutation)."""

    def __init__(self, t: Tensors, batch_size: int, seed: int):
        self.t, self.batch_size, self.seed = t, batch_size, seed
        self.steps = math.ceil(len(t) / batch_size)
        self.rows_per_epoch = len(t)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Tensors]:
        order = torch.randperm(len(self.t), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        for idx in order.split(self.batch_size)[start_step:]:
            yield self.t.rows(idx)


Checkpointer = Callable[[dict[str, dict[str, torch.Tensor]], dict[str, Any]], None]


class Trainer:
    """Minibatch training of ``model``; ``outputs`` (one per task, default :func:`default_outputs`)
    say how each head's logit is compared with its label (see mtrank.training.outputs); ``ctx`` places it
    in a data-parallel job (default: one process)."""

    def __init__(self, model: MultiTaskModel, cfg: TrainConfig, outputs: list[TaskOutput] | None = None,
                 ctx: Context | None = None):
        self.model = model
        self.cfg = cfg
        self.ctx = ctx or Context()
        spec = model.spec
        weighting = LossWeighting(
            cfg.loss_weighting,
            [cfg.task_weights.get(h.task, 1.0) for h in model.heads],
            [cfg.task_gammas.get(h.task, 1.0) for h in model.heads],
        )
        self.objective = Objective(model, weighting, outputs or default_outputs(spec)).to(self.ctx.device)
        self.weighting = weighting
        self.net: nn.Module = self.objective
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.ctx.device] if self.ctx.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.objective, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def head_losses(self, batch: Tensors) -> torch.Tensor:
        b = batch.to(self.ctx.device)
        return self.objective.head_losses(b.dense, b.sparse, b.labels, b.space, b.group, b.item)

    def fit(
        self,
        train: Tensors | TrainStream,
        valid: Tensors | Callable[[], Iterable[Tensors]],
        progress: bool = True,
        resume_from: tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
        checkpoint: Checkpointer | None = None,
    ) -> dict[str, Any]:
        """Train for up to ``cfg.epochs`` epochs with early stopping; the best epoch's weights are kept.

        ``train``: tensors in memory or this worker's :class:`TrainStream`; ``valid``: tensors or a
        callable giving this worker's validation batches (losses are summed over workers).
        ``resume_from``: a checkpoint (see :meth:`state`) to continue from; ``checkpoint``: called
        with the state every ``cfg.checkpoint_every`` steps and at the end of each epoch.
        Returns history, best validation loss, rows trained on (this worker) and seconds.
        """
        cfg, ctx = self.cfg, self.ctx
        batches = _InMemory(train, cfg.batch_size, cfg.seed) if isinstance(train, Tensors) else train
        st: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "best": math.inf, "since_best": 0,
                              "history": [], "stopped": False, "rows": 0, "seconds": 0.0, "loop_seconds": 0.0}
        best_state = None
        if resume_from is not None:
            best_state = self._restore(*resume_from, st)
        began = time.perf_counter()
        base_seconds = st["seconds"]

        def save() -> None:
            if checkpoint is not None:
                st["seconds"] = base_seconds + time.perf_counter() - began
                checkpoint(*self.state(st, best_state))

        for epoch in range(st["epoch"], cfg.epochs):
            if st["stopped"]:
                break
            self.net.train()
            bar = tqdm(total=batches.rows_per_epoch, initial=st["step"] * batches.batch_size * ctx.world, unit="rows",
                       unit_scale=True,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, file=sys.stderr)
            loop_began = time.perf_counter()
            for batch in batches.batches(epoch, st["step"]):
                b = batch.to(ctx.device)
                loss = self.net(b.dense, b.sparse, b.labels, b.space, b.group, b.item, epoch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                st["step"] += 1
                st["global_step"] += 1
                st["rows"] += len(batch)
                bar.update(len(batch) * ctx.world)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                due = cfg.checkpoint_every and st["global_step"] % cfg.checkpoint_every == 0
                if due and st["step"] < batches.steps:
                    st["loop_seconds"] += time.perf_counter() - loop_began
                    save()
                    loop_began = time.perf_counter()
            st["loop_seconds"] += time.perf_counter() - loop_began
            bar.close()
            val = self.validation_loss(valid)
            st["history"].append({"epoch": epoch + 1, "valid_loss": val})
            if progress:
                print(f"epoch {epoch + 1}: valid loss {val:.5f}", file=sys.stderr)
            if val < st["best"] - 1e-6:
                st["best"], st["since_best"] = val, 0
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                st["since_best"] += 1
                st["stopped"] = st["since_best"] > cfg.patience
            st["epoch"], st["step"] = epoch + 1, 0
            save()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        st["seconds"] = base_seconds + time.perf_counter() - began
        return {"history": st["history"], "best_valid_loss": st["best"], "rows": st["rows"],
                "seconds": st["seconds"], "loop_seconds": st["loop_seconds"]}

    def state(self, st: dict[str, Any], best_state: dict[str, torch.Tensor] | None
              ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """A checkpoint: tensors (model with loss weighting, optimiser, best weights, RNG) and JSON
        (data position, early stopping, rows, seconds, optimiser groups)."""
        flat, groups = optimizer_tensors(self.optimizer)
        tensors = {"objective": self.objective.state_dict(), "optimizer": flat, "rng": {"torch": torch.get_rng_state()}}
        if best_state is not None:
            tensors["best"] = best_state
        return tensors, {**st, "history": list(st["history"]), "optimizer_groups": groups, "world": self.ctx.world}

    def _restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                 st: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        self.objective.load_state_dict({k: v.to(self.ctx.device) for k, v in tensors["objective"].items()})
        load_optimizer(self.optimizer, {k: v.to(self.ctx.device) for k, v in tensors["optimizer"].items()},
                       state["optimizer_groups"])
        torch.set_rng_state(tensors["rng"]["torch"])
        st.update({k: state[k] for k in st})
        best = tensors.get("best")
        return None if best is None else {k: v.to(self.ctx.device) for k, v in best.items()}

    @torch.no_grad()
    def validation_loss(self, valid: Tensors | Callable[[], Iterable[Tensors]], batch_size: int = 8192) -> float:
        """Early stopping's criterion over all workers (see ``TrainConfig.valid_loss``): with user
        groups, the mean over groups of each group's summed task losses (each task's loss averaged
        over the group's rows inside its space); else (or ``rows``) the unweighted sum of per-head
        losses, averaged over rows inside each head's space."""
        self.objective.eval()
        batches = (valid.rows(idx) for idx in torch.arange(len(valid)).split(batch_size)) if isinstance(
            valid, Tensors) else (c for part in valid() for c in chunks(part, batch_size))
        if self.cfg.valid_loss == "groups" and self.model.spec.user_groups is not None:
            return self._group_mean_loss(batches)
        total = torch.zeros(len(self.model.heads) + 1, dtype=torch.float64)
        for batch in batches:
            total[:-1] += self.head_losses(batch).double().cpu() * len(batch)
            total[-1] += len(batch)
        total = self.ctx.all_sum(total)
        return float(total[:-1].sum() / total[-1])

    def _group_mean_loss(self, chunks: Iterable[Tensors]) -> float:
        sums = counts = None
        for batch in chunks:
            b = batch.to(self.ctx.device)
            s, c = self.objective.served_loss_sums(b.dense, b.sparse, b.labels, b.space, b.group, b.item)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        n_groups, n_tasks = len(self.model.spec.user_groups.values), len(self.model.spec.tasks)
        both = torch.zeros(2, n_groups, n_tasks, dtype=torch.float64)
        if sums is not None:
            both[0], both[1] = sums.cpu(), counts.cpu()
        both = self.ctx.all_sum(both)
        per_group = (both[0] / both[1].clamp(min=1.0)).sum(dim=1)
        present = both[1].sum(dim=1) > 0
        return float(per_group[present].mean())


CONFIG_SECTIONS = ("name", "model", "train")
TRAIN_OVERRIDES = ("lr", "batch_size", "patience", "threads", "loss_weighting", "epochs", "seed")
"""``train:`` keys the command line may override."""


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A config file's sections (``name``, ``model``, ``train``); a bad file is a one-line SpecError."""
    if path is None:
        return {}
    doc = load_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping with sections {list(CONFIG_SECTIONS)}")
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise SpecError(f"{path}: {unknown[0]}: unknown section (expected {', '.join(CONFIG_SECTIONS)})")
    for key in ("model", "train"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise SpecError(f"{path}: {key}: expected a mapping, got {type(doc[key]).__name__}")
    return doc


SPLITS = ("train", "valid", "test")


@dataclass
class Job:
    """What a run trains: everything ``--resume`` needs, saved in ``RUN.partial/job.json``."""

    model_name: str
    model_cfg: Any
    cfg: TrainConfig
    spec: FeatureSpec
    data_dir: Path
    baseline: Path | None = None

    def to_dict(self, world: int, outputs: list[TaskOutput]) -> dict[str, Any]:
        return {"model": self.model_name, "model_config": dataclasses.asdict(self.model_cfg),
                "train_config": dataclasses.asdict(self.cfg), "spec": self.spec.to_dict(),
                "data": str(self.data_dir), "baseline": None if self.baseline is None else str(self.baseline),
                "world": world, "outputs": [o.to_dict() for o in outputs]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str) -> Job:
        spec = FeatureSpec.from_dict(doc["spec"], source)
        return cls(doc["model"], make_config(doc["model"], doc["model_config"], source),
                   validate(TrainConfig, doc["train_config"], source, prefix="train."), spec, Path(doc["data"]),
                   None if doc["baseline"] is None else Path(doc["baseline"]))


def train(
    model_name: str,
    data_dir: Path,
    out_dir: Path,
    config_path: Path | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    baseline: Path | None = None,
    spec_path: Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train ``model_name`` on ``data_dir``, write the run directory, return metrics.json's content
    (None on workers other than rank 0).

    ``overrides``: ``train:`` values (keys of :data:`TRAIN_OVERRIDES`) that win over the config
    file's, as the command line's ``--lr`` etc. give them. Configs, the spec, every file's columns and
    every row's values are checked before anything is written: a bad one is one SpecError line naming
    the file (and the key or row). Run under ``torchrun`` (or ``--nproc``), this is one worker.
    """
    from mtrank.training.frames import load_spec

    source = str(config_path) if config_path is not None else "train config"
    doc = load_config_file(config_path)
    if doc.get("name", model_name) != model_name:
        raise SpecError(f"{source}: name: this is a config for {doc['name']!r}, not {model_name!r}")
    model_cfg = make_config(model_name, doc.get("model"), source)
    train_values = dict(doc.get("train") or {})
    extra = {"epochs": epochs, "seed": seed, **(overrides or {})}
    train_values.update({k: v for k, v in extra.items() if v is not None})
    cfg = validate(TrainConfig, train_values, source, prefix="train.")
    spec = load_spec(data_dir, spec_path)
    cfg.check_tasks(spec, source)
    job = Job(model_name, model_cfg, cfg, spec, Path(data_dir), None if baseline is None else Path(baseline))
    return _run(job, Path(out_dir), progress, resuming=False)


def resume(out_dir: Path, progress: bool = True) -> dict[str, Any] | None:
    """Continue the run that was training into ``out_dir`` from its last checkpoint (its job,
    preprocessing and outputs come from ``out_dir.partial``); the same number of workers is needed."""
    partial = partial_dir(Path(out_dir))
    path = partial / "job.json"
    if not path.is_file():
        raise SpecError(f"{out_dir}: no run in progress to resume (no {path})")
    return _run(Job.from_dict(json.loads(path.read_text()), str(path)), Path(out_dir), progress, resuming=True)


def resume_world(out_dir: Path) -> int:
    """Workers of the run in progress at ``out_dir`` (1 when it has none)."""
    path = partial_dir(Path(out_dir)) / "job.json"
    return int(json.loads(path.read_text()).get("world", 1)) if path.is_file() else 1


def _run(job: Job, out_dir: Path, progress: bool, resuming: bool) -> dict[str, Any] | None:
    ctx = distributed.from_environment()
    try:
        return _train_job(job, out_dir, progress, resuming, ctx)
    finally:
        distributed.shutdown(ctx)


def _train_job(job: Job, out_dir: Path, progress: bool, resuming: bool, ctx: Context) -> dict[str, Any] | None:
    cfg, spec = job.cfg, job.spec
    partial = partial_dir(out_dir)
    torch.set_num_threads(cfg.threads)
    sources = {split: SplitSource.open(job.data_dir, split, spec) for split in SPLITS}
    pre, outputs = _preprocessing(job, sources, partial, resuming, ctx)
    torch.manual_seed(cfg.seed)
    model = create_model(job.model_name, spec, pre.shape, job.model_cfg)
    trainer = Trainer(model, cfg, outputs, ctx)
    stream = TrainStream(sources["train"], pre, max(1, cfg.batch_size // ctx.world), cfg.shuffle_rows, cfg.seed,
                         ctx.rank, ctx.world)
    valid_source = sources["valid"]

    def valid() -> Iterator[Tensors]:
        for frame in valid_source.frames(units=valid_source.shard(ctx.rank, ctx.world)):
            yield to_tensors(frame, spec, pre)

    def checkpoint(tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        save_train_state(partial, f"epoch{state['epoch']}-step{state['global_step']}", tensors, state)

    state = load_train_state(partial) if resuming else None
    fit = trainer.fit(stream, valid, progress and ctx.is_main, resume_from=state,
                      checkpoint=checkpoint if ctx.is_main else None)
    rows_seen = int(ctx.all_sum(torch.tensor([float(fit["rows"])], dtype=torch.float64))[0])
    if not ctx.is_main:
        return None

    # Evaluation needs only the model: the optimiser's state and the gradients go first (at 6M
    # synthetic rows they are ~50 MB of the peak).
    del trainer, stream
    model.zero_grad(set_to_none=True)
    model.cpu()
    report = evaluate_frames(model, sources["test"].frames(), pre, outputs, rows=sources["test"].rows)
    sample = _train_sample(sources["train"], cfg.eval_train_rows, cfg.seed)
    report["train"] = {k: v for k, v in evaluate(model, sample, pre, outputs).items() if k != "gates"}
    loop = max(fit["loop_seconds"], 1e-9)
    report.update(
        model=job.model_name,
        params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(fit["seconds"], 2),
        epochs_run=len(fit["history"]),
        history=fit["history"],
        workers=ctx.world,
        train_rows=sources["train"].rows,
        rows_seen=rows_seen,
        samples_per_second=round(rows_seen / loop, 1),
        samples_per_second_per_worker=round(rows_seen / loop / ctx.world, 1),
    )
    if job.baseline is not None:
        from mtrank.training import metrics as metrics_lib

        base = json.loads((job.baseline / "metrics.json").read_text())
        report["mtl_gain"] = metrics_lib.mtl_gain(report, base)

    _publish(job, out_dir, model, pre, outputs, report)
    shutil.rmtree(partial, ignore_errors=True)
    return report


def _preprocessing(job: Job, sources: dict[str, SplitSource], partial: Path, resuming: bool,
                   ctx: Context) -> tuple[Preprocessor, list[TaskOutput]]:
    """The run's statistics, vocabularies and task outputs: fitted in one streaming pass over the
    train split (rank 0 saves them beside the checkpoints), or read back when resuming."""
    cfg, spec = job.cfg, job.spec
    if resuming:
        doc = json.loads((partial / "job.json").read_text())
        if doc["world"] != ctx.world:
            raise SpecError(f"{partial}: the run was trained by {doc['world']} workers; resume it with as many, "
                            f"not {ctx.world}")
        return Preprocessor.load(spec, partial), [TaskOutput.from_dict(o) for o in doc["outputs"]]
    for split in ("valid", "test"):
        sources[split].check()
    pre, labels, space = fit_preprocessing(sources["train"], spec, cfg.max_vocab, cfg.seed)
    outputs = fit_outputs(spec, labels, space, say=ctx.is_main)
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pre.save(partial)
        write_json_atomic(partial / "job.json", job.to_dict(ctx.world, outputs))
    return pre, outputs


def _publish(job: Job, out_dir: Path, model: MultiTaskModel, pre: Preprocessor, outputs: list[TaskOutput],
             report: dict[str, Any]) -> None:
    """Write the run beside ``out_dir`` and rename it into place: a run directory is whole or absent."""
    meta = {
        "model_config": dataclasses.asdict(job.model_cfg),
        "train_config": dataclasses.asdict(job.cfg),
        "outputs": [o.to_dict() for o in outputs],
        "config_hash": config_hash(job.model_name, job.model_cfg, job.cfg, job.spec),
        "data": str(job.data_dir),
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        save_run(tmp, model, pre, meta)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        publish_run(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_sample(source: SplitSource, rows: int, seed: int) -> pd.DataFrame:
    """About ``rows`` train rows for the train−test gap: whole units in a seeded order until enough
    are read (one unit on small data), then a uniform sample of their rows."""
    order = np.random.default_rng([seed, 29]).permutation(len(source.units))
    picked, total = [], 0
    for i in order:
        picked.append(source.units[i])
        total += source.units[i].rows
        if total >= rows:
            break
    picked.sort(key=lambda u: (u.file, u.index))
    frame = pd.concat(list(source.frames(units=picked)), ignore_index=True)
    return frame.sample(n=min(rows, len(frame)), random_state=seed)
