"""Test AUC per user group after every epoch, with both early-stopping losses (docs/training.md).

    python docs/tables/epoch_auc.py --data sv200k --seed 1                 # the streaming trainer's batches
    python docs/tables/epoch_auc.py --data sv200k --seed 1 --order full    # one permutation of all rows

Trains like ``mtrank train`` (same preprocessing, outputs, initial weights and batches) for
``--epochs`` epochs without stopping early, and prints one JSON line per epoch: the validation loss
over rows and over user groups (``train.valid_loss`` ``rows`` / ``groups``), each group's validation
loss, and the test AUC of ``--task`` per user group and over all rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtrank.spec import validate
from mtrank.training.evaluate import evaluate_frames
from mtrank.training.frames import load_spec
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.outputs import fit_outputs
from mtrank.training.streaming import SplitSource, Tensors, TrainStream, fit_preprocessing, to_tensors
from mtrank.training.trainer import TrainConfig, Trainer, load_config_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="data directory (mtrank synth's output)")
    p.add_argument("--model", default="ple", help="registered model name")
    p.add_argument("--config", type=Path, default=Path("configs/ple.yaml"), help="model and train config")
    p.add_argument("--seed", type=int, default=1, help="training seed")
    p.add_argument("--epochs", type=int, default=3, help="epochs to train, none stopped early")
    p.add_argument("--task", default="vtr", help="binary task whose AUC is printed")
    p.add_argument("--order", choices=["stream", "full"], default="stream",
                   help="stream: the trainer's block shuffle; full: one permutation of all train rows per epoch")
    a = p.parse_args()
    doc = load_config_file(a.config)
    values = {**doc.get("train", {}), "seed": a.seed, "epochs": a.epochs, "patience": a.epochs, "threads": 1}
    cfg = validate(TrainConfig, values, str(a.config), prefix="train.")
    torch.set_num_threads(cfg.threads)
    spec = load_spec(a.data, None)
    splits = {s: SplitSource.open(a.data, s, spec) for s in ("train", "valid", "test")}
    pre, labels, space = fit_preprocessing(splits["train"], spec, cfg.max_vocab, cfg.seed)
    outputs = fit_outputs(spec, labels, space)
    torch.manual_seed(cfg.seed)
    model = create_model(a.model, spec, pre.shape, make_config(a.model, doc.get("model", {}), str(a.config)))
    trainer = Trainer(model, cfg, outputs)
    if a.order == "stream":
        train = TrainStream(splits["train"], pre, cfg.batch_size, cfg.shuffle_rows, cfg.seed)
    else:
        train = Tensors.cat([to_tensors(f, spec, pre) for f in splits["train"].frames()])
    valid = Tensors.cat([to_tensors(f, spec, pre) for f in splits["valid"].frames()])
    criterion = trainer.validation_loss
    epoch = 0

    def report(v: Tensors) -> float:
        nonlocal epoch
        epoch += 1
        losses = {}
        for mode in ("rows", "groups"):
            trainer.cfg.valid_loss = mode
            losses[mode] = criterion(v)
        trainer.cfg.valid_loss = "rows"
        by_group = {g: round(criterion(v.rows(v.group == i)), 5) for i, g in enumerate(spec.user_groups.values)}
        metrics = evaluate_frames(model, splits["test"].frames(), pre, outputs)
        auc = {g: round(m[a.task]["auc"], 4) for g, m in metrics["groups"].items()}
        print(json.dumps({"epoch": epoch, "valid_loss_rows": round(losses["rows"], 5),
                          "valid_loss_groups": round(losses["groups"], 5), "valid_loss_by_group": by_group,
                          f"test_{a.task}_auc": {**auc, "all": round(metrics["tasks"][a.task]["auc"], 4)}}),
              flush=True)
        return losses["groups"]

    trainer.validation_loss = report
    trainer.fit(train, valid, progress=False)


if __name__ == "__main__":
    main()
