"""STEM-Net: the all-forward task-specific-backward gate, its embedding layout, the paper's subsets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtrank.spec import FeatureSpec
from mtrank.training.evaluate import evaluate_run, feedback_buckets, parameter_counts, stem_subsets
from mtrank.training.features import Preprocessor
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.streaming import to_tensors

TASK_A, TASK_B = 0, 1


@pytest.fixture(scope="module")
def tiny():
    spec = FeatureSpec.from_dict(
        {
            "name": "tiny",
            "dense": [{"name": "x"}],
            "sparse": [
                {"name": "user_id", "side": "user", "location": "store"},
                {"name": "device", "side": "user"},
                {"name": "item_id", "side": "item", "location": "store"},
            ],
            "tasks": [{"name": "like"}, {"name": "finish"}, {"name": "vcr", "type": "regression"}],
        }
    )
    rng = np.random.default_rng(0)
    n = 256
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "user_id": rng.integers(0, 30, n).astype(str),
            "device": rng.choice(["ios", "android"], n),
            "item_id": rng.integers(0, 20, n).astype(str),
            "like": rng.integers(0, 2, n).astype(float),
            "finish": rng.integers(0, 2, n).astype(float),
            "vcr": rng.random(n),
        }
    )
    pre = Preprocessor.fit(spec, frame)
    return spec, pre, to_tensors(frame, spec, pre)


def stem(tiny, **config):
    spec, pre, _ = tiny
    torch.manual_seed(0)
    return create_model("stem", spec, pre.shape, make_config("stem", config))


def task_a_loss(model, t):
    logits = model(t.dense, t.sparse)
    return F.binary_cross_entropy_with_logits(logits[:, TASK_A], t.labels[:, TASK_A])


def view_grads(model, view: int) -> list[torch.Tensor]:
    """Gradient of each table's ``view`` columns, for the fields whose row holds that view."""
    d = model.embedding_dim
    return [
        table.weight.grad[:, view * d : (view + 1) * d]
        for i, table in enumerate(model.embeddings.tables)
        if view < len(model.field_view_names(i))
    ]


def grad_sum(module) -> float:
    """Sum of |grad| over a module's parameters; a parameter the loss never reached counts 0."""
    return sum(0.0 if p.grad is None else float(p.grad.abs().sum()) for p in module.parameters())


@pytest.mark.parametrize("fields", ["all", "ids"])
def test_task_loss_gives_exactly_zero_gradient_to_other_tasks_tables_and_experts(tiny, fields):
    _, _, t = tiny
    model = stem(tiny, task_embedding_fields=fields, n_shared_experts=2, n_task_experts=2)
    task_a_loss(model, t).backward()
    view_b = 1 + TASK_B
    assert view_grads(model, view_b), "some field has task B's view"
    for grad in view_grads(model, view_b):
        assert torch.count_nonzero(grad) == 0
    for module in (model.task_experts[TASK_B], model.gates[TASK_B], model.towers[TASK_B]):
        for p in module.parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
    # ...while task A's own and the shared parts are trained.
    assert all(g.abs().sum() > 0 for g in view_grads(model, 1 + TASK_A))
    assert all(g.abs().sum() > 0 for g in view_grads(model, 0))
    assert grad_sum(model.task_experts[TASK_A]) > 0 and grad_sum(model.shared_experts) > 0


def test_task_a_output_reads_task_b_embeddings_and_experts_forward(tiny):
    _, _, t = tiny
    model = stem(tiny).eval()
    before = model(t.dense, t.sparse)[:, TASK_A]
    d, view_b = model.embedding_dim, 1 + TASK_B
    with torch.no_grad():
        model.embeddings.tables[0].weight[:, view_b * d : (view_b + 1) * d] += 1.0
    after_tables = model(t.dense, t.sparse)[:, TASK_A]
    with torch.no_grad():
        for p in model.task_experts[TASK_B].parameters():
            p.add_(0.5)
    gates: dict[str, torch.Tensor] = {}
    after_experts = model(t.dense, t.sparse, gates=gates)[:, TASK_A]
    assert (after_tables - before).abs().max() > 1e-4
    assert (after_experts - after_tables).abs().max() > 1e-4
    assert gates["like"].shape == (len(t), 1 + 3), "task A's gate weighs the shared and every task's experts"


def test_without_stop_gradient_task_loss_reaches_other_tasks_tables_and_experts(tiny):
    _, _, t = tiny
    model = stem(tiny, stop_gradient=False)
    task_a_loss(model, t).backward()
    assert all(g.abs().sum() > 0 for g in view_grads(model, 1 + TASK_B))
    assert grad_sum(model.task_experts[TASK_B]) > 0
    assert grad_sum(model.gates[TASK_B]) == 0, "task B's own gate still serves task B only"


def test_stop_gradient_changes_gradients_not_outputs(tiny):
    _, _, t = tiny
    with_sg, without_sg = stem(tiny).eval(), stem(tiny, stop_gradient=False).eval()
    assert torch.equal(with_sg(t.dense, t.sparse), without_sg(t.dense, t.sparse))


def test_one_table_row_holds_the_shared_and_every_task_view(tiny):
    spec, _, t = tiny
    model = stem(tiny)
    assert model.view_names == ["shared", *spec.task_names]
    for i, table in enumerate(model.embeddings.tables):
        assert model.field_view_names(i) == model.view_names
        assert table.embedding_dim == model.embedding_dim * len(model.view_names)
    assert [v.shape[1] for v in model.embed(t.sparse)] == [table.embedding_dim for table in model.embeddings.tables]


@pytest.mark.parametrize(
    ("fields", "with_task_views"),
    [
        ("all", [True, True, True]),
        ("user", [True, True, False]),
        ("ids", [True, False, True]),
        (["device"], [False, True, False]),
    ],
)
def test_task_embedding_fields_choose_which_tables_get_task_views(tiny, fields, with_task_views):
    model = stem(tiny, task_embedding_fields=fields)
    n_views = len(model.view_names)
    assert [len(model.field_view_names(i)) == n_views for i in range(3)] == with_task_views
    for i, table in enumerate(model.embeddings.tables):
        assert table.embedding_dim == model.embedding_dim * len(model.field_view_names(i))
    counts = parameter_counts(model)
    vocab = model.shape.vocab_sizes
    expected = sum(
        n * model.embedding_dim * (n_views if own else 1) for n, own in zip(vocab, with_task_views, strict=True)
    )
    assert counts["embeddings"] == expected
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_task_embedding_fields_errors_name_the_problem(tiny):
    with pytest.raises(ValueError, match=r"unknown sparse fields \['author'\]"):
        stem(tiny, task_embedding_fields=["author"])
    with pytest.raises(ValueError, match="one of"):
        make_config("stem", {"task_embedding_fields": "users"})


def test_multi_embedding_ple_task_loss_stays_off_other_task_views(tiny):
    spec, pre, t = tiny
    torch.manual_seed(0)
    model = create_model("me_ple", spec, pre.shape, make_config("me_ple", {"n_levels": 1}))
    task_a_loss(model, t).backward()
    assert all(torch.count_nonzero(g) == 0 for g in view_grads(model, 1 + TASK_B))
    assert all(g.abs().sum() > 0 for g in view_grads(model, 1 + TASK_A))


def test_feedback_buckets_have_equal_frequency():
    scores = np.random.default_rng(1).random(1000)
    buckets = feedback_buckets(scores)
    assert np.bincount(buckets).tolist() == [100] * 10
    assert (np.diff(buckets[np.argsort(scores)]) >= 0).all(), "higher expected feedback, higher bucket"


def test_stem_subsets_on_a_constructed_example():
    # 100 samples; A's expected feedback rises with the index. B's is A's for the first 50
    # (comparable), falls for the last 50 (A overwhelms B at the top, B overwhelms A below).
    a = np.arange(100, dtype=float)
    b = np.where(a < 50, a, 149 - a)
    masks = stem_subsets(a, b)
    d = feedback_buckets(a) - feedback_buckets(b)
    assert masks["comparable"][:50].all()
    assert np.array_equal(masks["a_overwhelming"], d >= 2)
    assert np.array_equal(masks["b_overwhelming"], d <= -2)
    assert masks["a_overwhelming"][95:].all()
    total = sum(m.astype(int) for m in masks.values())
    assert (total == 1).all(), "the three subsets partition the samples"


def test_stem_pair_without_a_baseline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="stem_pair needs a baseline"):
        evaluate_run(tmp_path, tmp_path, stem_pair="like,finish")


@pytest.mark.slow
def test_evaluate_run_reports_mtl_gain_and_stem_subsets(trained_run, synth_dir, tmp_path):
    run = tmp_path / "stem"
    shutil.copytree(trained_run("stem"), run)
    single = trained_run("single")
    trained = json.loads((run / "metrics.json").read_text())

    report = evaluate_run(run, synth_dir, baseline=single, stem_pair="like,finish")

    written = json.loads((run / "metrics.json").read_text())
    assert written == report
    assert report["train_seconds"] == trained["train_seconds"], "training-only fields survive"
    assert report["tasks"]["like"]["auc"] == pytest.approx(trained["tasks"]["like"]["auc"])
    assert set(report["mtl_gain"]) == set(report["tasks"])
    assert report["param_counts"]["total"] == report["params"] == trained["params"]
    section = report["stem_subsets"]
    assert section["pair"] == ["like", "finish"]
    subsets = section["subsets"]
    assert set(subsets) == {"a_overwhelming", "comparable", "b_overwhelming"}
    assert sum(s["rows"] for s in subsets.values()) == report["rows"]
    for s in subsets.values():
        assert (
            set(s["auc"])
            == set(s["baseline_auc"])
            == set(s["oracle_auc"])
            == {"vtr", "finish", "skip", "like", "share"}
        )
        assert 0 <= s["positives"]["like"] <= s["rows"]

    valid = evaluate_run(run, synth_dir, split="valid")
    assert (run / "metrics.valid.json").is_file() and valid["split"] == "valid"
    assert json.loads((run / "metrics.json").read_text()) == report, "another split leaves metrics.json alone"
