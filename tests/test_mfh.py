"""MFH, H-MTL and flat: product-task heads, group mode, the training rule, three-facet subsets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mtrank.spec import FeatureSpec, SpecError
from mtrank.training.evaluate import evaluate
from mtrank.training.features import Preprocessor
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.profile import forward_cost
from mtrank.training.streaming import Tensors, to_tensors
from mtrank.training.trainer import TrainConfig, Trainer

PRODUCT_MODELS = ["flat", "h_mtl", "mfh"]
# Small sizes keep every test well under a second; the structure is the default one.
SMALL = {
    "flat": {"embedding_dim": 4, "expert_hidden": [16], "tower_hidden": [8]},
    "h_mtl": {"embedding_dim": 4, "level_hidden": [[16], [8], [8]], "partition_hidden": [8], "tower_hidden": [8]},
    "mfh": {
        "embedding_dim": 4,
        "level_hidden": [[16], [8], [8]],
        "partition_hidden": [8],
        "tower_hidden": [8],
        "combine_dim": 8,
    },
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and two threads stall on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(with_groups: bool = True) -> FeatureSpec:
    doc = {
        "name": "tiny-mfh",
        "dense": [{"name": "age", "side": "user", "transform": "log1p"}, {"name": "item_age", "transform": "log1p"}],
        "sparse": [{"name": "uid", "side": "user", "location": "store"}, {"name": "cat"}],
        "tasks": [{"name": "vtr"}, {"name": "vcr", "type": "regression", "space": "played"}, {"name": "skip"}],
        "item_facet": {
            "column": "item_state",
            "values": ["cold", "warm"],
            "rules": [{"value": "cold", "feature": "item_age", "op": "lt", "threshold": 2.0}],
            "default": "warm",
        },
    }
    if with_groups:
        doc["user_groups"] = {
            "column": "user_group",
            "values": ["new", "low", "high"],
            "rules": [
                {"value": "new", "feature": "age", "op": "lt", "threshold": 7.0},
                {"value": "low", "feature": "age", "op": "lt", "threshold": 100.0},
            ],
            "default": "high",
        }
    return FeatureSpec.from_dict(doc)


@pytest.fixture(scope="module")
def tiny():
    spec = _spec()
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame(
        {
            "age": rng.exponential(80, n),
            "item_age": rng.exponential(5, n),
            "uid": rng.integers(0, 50, n).astype(str),
            "cat": rng.choice(["a", "b", "c"], n),
            "vtr": rng.integers(0, 2, n).astype(float),
            "vcr": rng.random(n),
            "skip": rng.integers(0, 2, n).astype(float),
            "played": rng.integers(0, 2, n),
        }
    )
    raw = {"age": frame["age"].to_numpy(), "item_age": frame["item_age"].to_numpy()}
    frame["user_group"] = np.array(spec.user_groups.values)[spec.user_groups.assign(raw)]
    frame["item_state"] = np.array(spec.item_facet.values)[spec.item_facet.assign(raw)]
    pre = Preprocessor.fit(spec, frame)
    return spec, pre, frame, to_tensors(frame, spec, pre)


def _model(name: str, spec: FeatureSpec, pre: Preprocessor, **overrides):
    torch.manual_seed(0)
    return create_model(name, spec, pre.shape, make_config(name, {**SMALL[name], **overrides}))


def _rows_of(t: Tensors, group: int) -> Tensors:
    return t.rows(torch.nonzero(t.group == group).squeeze(1))


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_heads_are_behaviour_by_user_group(tiny, name):
    spec, pre, _, _ = tiny
    model = _model(name, spec, pre)
    assert model.groups == ["new", "low", "high"]
    assert [h.name for h in model.heads] == [f"{b}@{g}" for g in model.groups for b in spec.task_names]
    assert all(h.name == f"{h.task}@{h.group}" for h in model.heads)
    assert [h.task for h in model.group_heads("low")] == spec.task_names


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_spec_without_user_groups_is_a_clear_error(name):
    spec = _spec(with_groups=False)
    with pytest.raises(SpecError, match="no user_groups facet"):
        create_model(
            name,
            spec,
            Preprocessor.fit(spec, pd.DataFrame({"uid": ["u"], "cat": ["a"], "age": [1.0], "item_age": [1.0]})).shape,
        )


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("flat", {}),
        ("h_mtl", {}),
        ("mfh", {}),
        ("h_mtl", {"order": ["behaviour", "user_group"], "switchers": ["mmoe", "cgc"]}),
        ("mfh", {"switchers": ["ple", "mmoe"], "ple_levels": 3}),
        ("mfh", {"item_facet": True}),
    ],
    ids=["flat", "h_mtl", "mfh", "h_mtl-behaviour-first-mmoe-cgc", "mfh-ple3-mmoe", "mfh-3-facet"],
)
def test_group_mode_equals_the_full_model_on_that_groups_heads(tiny, name, overrides):
    spec, pre, _, t = tiny
    model = _model(name, spec, pre, **overrides).eval()
    t = t.rows(torch.arange(128))
    with torch.no_grad():
        full = model(t.dense, t.sparse)
        for group in model.groups:
            cols = [i for i, h in enumerate(model.heads) if h.group == group]
            grouped = model(t.dense, t.sparse, group=group)
            assert grouped.shape == (len(t), len(model.group_heads(group)))
            torch.testing.assert_close(grouped, full[:, cols], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_group_mode_touches_fewer_parameters_and_flops_per_row(tiny, name, capsys):
    spec, pre, _, t = tiny
    model = _model(name, spec, pre)
    vectors = model.embed(t.sparse[:64])
    full = forward_cost(model, t.dense[:64], vectors)
    with capsys.disabled():
        print(f"\n{name}: full model {full['params']} params, {full['flops_per_row']:.0f} FLOPs/row")
    for group in model.groups:
        cost = forward_cost(model, t.dense[:64], vectors, group=group)
        with capsys.disabled():
            print(f"{name}: group {group!r} {cost['params']} params, {cost['flops_per_row']:.0f} FLOPs/row")
        assert cost["outputs"] == len(spec.tasks)
        assert cost["params"] < full["params"]
        assert cost["flops_per_row"] < full["flops_per_row"]


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_new_user_rows_reach_the_low_and_high_task_losses(tiny, name):
    spec, pre, _, t = tiny
    model = _model(name, spec, pre)
    new_rows = _rows_of(t, model.groups.index("new"))
    losses = Trainer(model, TrainConfig()).head_losses(new_rows)
    by_head = dict(zip([h.name for h in model.heads], losses, strict=True))
    for group in ("low", "high"):
        for task in spec.task_names:
            assert by_head[f"{task}@{group}"] > 0, f"new-user rows must train {task}@{group}"
    losses.sum().backward()
    high_tower = model.towers[[h.name for h in model.heads].index("vtr@high")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in high_tower.parameters())


def test_low_rows_train_high_heads_but_not_new_heads(tiny):
    spec, pre, _, t = tiny
    model = _model("mfh", spec, pre)
    losses = Trainer(model, TrainConfig()).head_losses(_rows_of(t, model.groups.index("low")))
    by_group = {
        g: [float(x) for h, x in zip(model.heads, losses.detach(), strict=True) if h.group == g] for g in model.groups
    }
    assert all(x > 0 for x in by_group["low"] + by_group["high"])
    assert all(x == 0 for x in by_group["new"])


def test_own_group_only_rule_keeps_new_rows_out_of_other_groups_losses(tiny):
    spec, pre, _, t = tiny
    model = _model("h_mtl", spec, pre, also_trains={})
    losses = Trainer(model, TrainConfig()).head_losses(_rows_of(t, model.groups.index("new")))
    assert all(float(x) == 0 for h, x in zip(model.heads, losses.detach(), strict=True) if h.group != "new")


def test_also_trains_names_must_be_user_groups(tiny):
    spec, pre, _, _ = tiny
    with pytest.raises(SpecError, match="unknown user groups \\['old'\\]"):
        _model("mfh", spec, pre, also_trains={"new": ["old"]})


def test_own_task_logits_read_each_rows_own_group(tiny):
    spec, pre, _, t = tiny
    model = _model("mfh", spec, pre).eval()
    with torch.no_grad():
        logits = model(t.dense, t.sparse)
        own = model.own_task_logits(logits, t.group)
    assert own.shape == (len(t), len(spec.tasks))
    names = [h.name for h in model.heads]
    for row in range(0, len(t), 37):
        group = model.groups[int(t.group[row])]
        expected = [logits[row, names.index(f"{task}@{group}")] for task in spec.task_names]
        assert torch.equal(own[row], torch.stack(expected))


def test_three_facet_model_with_a_declared_subset_builds_exactly_those_towers(tiny):
    spec, pre, _, t = tiny
    # The paper's subset: cold items only for high-activity users.
    model = _model("mfh", spec, pre, item_facet=True, tasks=["*@*@warm", "*@high@cold"])
    expected = {f"{b}@{g}@warm" for b in spec.task_names for g in model.groups}
    expected |= {f"{b}@high@cold" for b in spec.task_names}
    assert len(expected) == 12
    assert {h.name for h in model.heads} == expected
    assert len(model.towers) == 12
    assert len(model.trees) == 6, "one tree per order of the three facets"
    for tree in model.trees:
        leaves = {tree.paths[h] for h in range(len(model.heads))}
        assert len(leaves) == 12
        # No branch leads to a cold-item tower of a new or low user.
        for prefix in tree.branches:
            facets = dict(zip(tree.order, prefix, strict=False))
            assert not (facets.get("item") == "cold" and facets.get("user_group") in ("new", "low"))
    assert model(t.dense[:5], t.sparse[:5]).shape == (5, 12)
    assert model(t.dense[:5], t.sparse[:5], group="new").shape == (5, 3)


def test_declared_subset_must_keep_a_tower_for_every_row(tiny):
    spec, pre, _, _ = tiny
    with pytest.raises(SpecError, match="without a tower"):
        _model("h_mtl", spec, pre, item_facet=True, tasks=["*@*@cold"])
    with pytest.raises(SpecError, match="match no product task"):
        _model("h_mtl", spec, pre, tasks=["vtr@old"])


def test_three_facet_rows_without_their_own_item_tower_use_the_default_items(tiny):
    spec, pre, _, t = tiny
    model = _model("h_mtl", spec, pre, item_facet=True, tasks=["*@*@warm", "*@high@cold"])
    names = [h.name for h in model.heads]
    cold = spec.item_facet.values.index("cold")
    groups = torch.tensor([model.groups.index(g) for g in ("new", "high")])
    items = torch.tensor([cold, cold])
    picked = model.own_task_logits(torch.arange(12.0).expand(2, 12), groups, items)
    assert [names[int(i)] for i in picked[0]] == [f"{b}@new@warm" for b in spec.task_names]
    assert [names[int(i)] for i in picked[1]] == [f"{b}@high@cold" for b in spec.task_names]
    # A cold row of a new user trains the warm towers of new, low, high and high's cold towers.
    mask = model.head_row_mask(groups[:1], items[:1])[0]
    assert {names[h] for h in torch.nonzero(mask).squeeze(1).tolist()} == {
        f"{b}@{g}" for b in spec.task_names for g in ("new@warm", "low@warm", "high@cold")
    }
    with pytest.raises(SpecError, match="item-facet index"):
        model.head_row_mask(t.group)


def test_tensors_carry_each_rows_item_facet_index(tiny):
    spec, _, frame, t = tiny
    assert t.item is not None
    assert [spec.item_facet.values[int(i)] for i in t.item[:50]] == list(frame["item_state"][:50])
    assert torch.equal(t.rows(torch.arange(3, 9)).item, t.item[3:9])


def test_three_facet_model_trains_and_evaluates_with_the_generic_trainer(tiny):
    spec, pre, frame, t = tiny
    model = _model("h_mtl", spec, pre, item_facet=True, tasks=["*@*@warm", "*@high@cold"])
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=300))
    fit = trainer.fit(t, t.rows(torch.arange(100)), progress=False)
    assert np.isfinite(fit["best_valid_loss"])
    report = evaluate(model, frame, pre)
    assert set(report["groups"]) == {"new", "low", "high"}
    assert set(report["item_facets"]) == {"cold", "warm"}
    assert report["tasks"]["vtr"]["auc"] is not None
    assert report["gates"], "gate utilisation is reported for three-facet models too"


def test_three_facet_group_mode_picks_the_head_of_each_rows_item_value(tiny):
    spec, pre, _, t = tiny
    model = _model("mfh", spec, pre, item_facet=True).eval()
    t = t.rows(torch.arange(64))
    with torch.no_grad():
        own = model.own_task_logits(model(t.dense, t.sparse), t.group, t.item)
        for g, group in enumerate(model.groups):
            rows = t.group == g
            picked = model.group_task_logits(model(t.dense, t.sparse, group=group), group, t.item)
            assert picked.shape == (len(t), len(spec.tasks))
            torch.testing.assert_close(picked[rows], own[rows], rtol=0, atol=1e-6)


def test_towers_can_differ_in_size_per_task(tiny):
    spec, pre, _, _ = tiny
    model = _model("mfh", spec, pre, tower_hidden_by_task={"*@new": [4], "skip@*": [16, 8]})
    widths = {
        h.name: [m.out_features for m in tower.mlp if isinstance(m, torch.nn.Linear)]
        for h, tower in zip(model.heads, model.towers, strict=True)
    }
    assert widths["vtr@new"] == [4]
    assert widths["skip@new"] == [4], "the first matching pattern wins"
    assert widths["skip@high"] == [16, 8]
    assert widths["vtr@high"] == [8]


def test_switcher_kind_is_chosen_per_level(tiny):
    spec, pre, _, _ = tiny
    model = _model("h_mtl", spec, pre, switchers=["mmoe", "cgc"])
    tree = model.trees[0]
    assert tree.switchers["root"].kind == "mmoe"
    assert {tree.switchers[k].kind for k in ("new", "low", "high")} == {"cgc"}
    default = _model("h_mtl", spec, pre)
    assert default.trees[0].switchers["root"].kind == "shared_bottom"
    assert default.trees[0].switchers["new"].kind == "ple"
    with pytest.raises(ValueError, match="unknown switcher kinds"):
        make_config("mfh", {"switchers": ["shared_bottom", "moe"]})
    with pytest.raises(ValueError, match="not a permutation"):
        make_config("h_mtl", {"order": ["user_group", "user_group"]})


def test_mfh_builds_one_tree_per_facet_order_and_combines_both_paths(tiny):
    spec, pre, _, _ = tiny
    model = _model("mfh", spec, pre)
    assert [tree.order for tree in model.trees] == [("user_group", "behaviour"), ("behaviour", "user_group")]
    assert all(len(paths) == 2 for paths in model.combine)


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_config_from_a_checkpoint_rebuilds_the_same_model(tiny, name):
    import dataclasses
    import json

    spec, pre, _, t = tiny
    model = _model(name, spec, pre).eval()
    saved = json.loads(json.dumps(dataclasses.asdict(model.cfg)))
    rebuilt = create_model(name, spec, pre.shape, make_config(name, saved)).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(t.dense, t.sparse), model(t.dense, t.sparse))


@pytest.mark.parametrize("name", PRODUCT_MODELS)
def test_gate_weights_are_distributions(tiny, name):
    spec, pre, _, t = tiny
    model = _model(name, spec, pre)
    gates: dict[str, torch.Tensor] = {}
    model(t.dense, t.sparse, gates=gates)
    assert gates
    for w in gates.values():
        torch.testing.assert_close(w.sum(dim=1), torch.ones(len(t)))


def test_group_mode_reports_only_the_gates_it_computed(tiny):
    spec, pre, _, t = tiny
    model = _model("mfh", spec, pre)
    full: dict[str, torch.Tensor] = {}
    grouped: dict[str, torch.Tensor] = {}
    model(t.dense[:16], t.sparse[:16], gates=full)
    model(t.dense[:16], t.sparse[:16], group="new", gates=grouped)
    assert set(grouped) < set(full)
    assert "user_group>behaviour/new/L0.vtr" in grouped and "user_group>behaviour/high/L0.vtr" not in grouped


def test_three_facet_mfh_trains_with_mtrank_train_and_exports_with_an_item_facet_input(synth_dir, tmp_path):
    import onnxruntime as ort
    import yaml

    from mtrank.cli import main as cli_main
    from mtrank.export.exporter import export_run
    from mtrank.manifest import ITEM_FACET_INPUT, TensorInfo, load_manifest
    from mtrank.training.checkpoint import load_run
    from tests.test_export import random_rows, serving_feeds

    config = tmp_path / "mfh3.yaml"
    model_cfg = {**SMALL["mfh"], "item_facet": True}
    train_cfg = {"epochs": 1, "batch_size": 512, "eval_train_rows": 2000, "threads": 1}
    config.write_text(yaml.safe_dump({"name": "mfh", "model": model_cfg, "train": train_cfg}))
    run_dir = tmp_path / "run"
    argv = ["train", "--model", "mfh", "--data", str(synth_dir), "--out", str(run_dir), "--config", str(config)]
    assert cli_main(argv) == 0
    run = load_run(run_dir)
    spec = run.spec
    report = yaml.safe_load((run_dir / "metrics.json").read_text())
    assert set(report["item_facets"]) == set(spec.item_facet.values)
    assert all(report["tasks"][t.name] for t in spec.tasks)

    vdir = export_run(run_dir, tmp_path / "repo", progress=False)
    manifest = load_manifest(vdir)
    dense, sparse = random_rows(run.model.shape, 256)
    n_items = len(spec.item_facet.values)
    for group, graph in manifest.graphs.items():
        assert graph.tasks == spec.task_names == [o.name for o in graph.outputs]
        assert graph.inputs[-1] == TensorInfo(ITEM_FACET_INPUT, "int64", ["batch"])
        session = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"])
        by_item = []
        for value in range(n_items):
            item = np.full(len(dense), value, dtype=np.int64)
            feeds = {**serving_feeds(manifest, vdir, dense, sparse, group), ITEM_FACET_INPUT: item}
            got = np.stack(session.run(graph.tasks, feeds), axis=1)
            with torch.no_grad():
                logits = run.model(torch.from_numpy(dense), torch.from_numpy(sparse), group=group)
                expected = torch.sigmoid(run.model.group_task_logits(logits, group, torch.from_numpy(item))).numpy()
            assert np.abs(got - expected).max() <= 1e-5, (group, value)
            by_item.append(got)
        assert np.abs(by_item[0] - by_item[1]).max() > 1e-4, "each item value is served by its own heads"
    assert max(max(d["fp32"].values()) for d in manifest.parity["max_abs_diff"].values()) <= 1e-5


def test_the_three_facet_config_file_builds_a_three_facet_mfh(tiny):
    from pathlib import Path

    import yaml

    spec, pre, _, _ = tiny
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "mfh_item_facet.yaml").read_text())
    model = create_model(doc["name"], spec, pre.shape, make_config(doc["name"], doc["model"]))
    assert model.uses_item_facet
    assert len(model.heads) == len(spec.tasks) * 3 * 2
