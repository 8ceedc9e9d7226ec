"""Foundation models: shapes, gates, masked loss, PLE/CGC structure, config checks."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtrank.spec import FeatureSpec, SpecError
from mtrank.training.features import Preprocessor
from mtrank.training.losses import LossWeighting, masked_task_losses
from mtrank.training.models.registry import create_model, make_config, model_names
from mtrank.training.streaming import to_tensors

FOUNDATION = ["single", "shared_bottom", "mmoe", "cgc", "ple"]


@pytest.fixture(scope="module")
def tiny():
    spec = FeatureSpec.from_dict(
        {
            "name": "tiny",
            "dense": [{"name": "x", "transform": "log1p"}, {"name": "y"}],
            "sparse": [
                {"name": "uid", "side": "user", "location": "store"},
                {"name": "dev", "side": "user"},
            ],
            "tasks": [{"name": "a"}, {"name": "b", "type": "regression", "space": "p"}, {"name": "c"}],
            "user_groups": {
                "column": "g",
                "values": ["new", "low", "high"],
                "rules": [{"value": "new", "feature": "x", "op": "lt", "threshold": 1.0}],
                "default": "high",
            },
        }
    )
    rng = np.random.default_rng(0)
    n = 512
    frame = pd.DataFrame(
        {
            "x": rng.exponential(3, n),
            "y": rng.normal(size=n),
            "uid": rng.integers(0, 40, n).astype(str),
            "dev": rng.choice(["ios", "android"], n),
            "a": rng.integers(0, 2, n).astype(float),
            "b": rng.random(n),
            "c": rng.integers(0, 2, n).astype(float),
            "p": rng.integers(0, 2, n),
        }
    )
    frame["g"] = np.array(spec.user_groups.values)[spec.user_groups.assign({"x": frame["x"].to_numpy()})]
    pre = Preprocessor.fit(spec, frame)
    return spec, pre, to_tensors(frame, spec, pre)


@pytest.mark.parametrize("name", FOUNDATION)
def test_forward_gives_one_logit_per_head(tiny, name):
    spec, pre, t = tiny
    model = create_model(name, spec, pre.shape)
    out = model(t.dense[:9], t.sparse[:9])
    assert out.shape == (9, len(model.heads))
    assert [h.task for h in model.heads] == spec.task_names
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple"])
def test_gate_weights_sum_to_one(tiny, name):
    spec, pre, t = tiny
    model = create_model(name, spec, pre.shape)
    gates: dict[str, torch.Tensor] = {}
    model(t.dense, t.sparse, gates=gates)
    assert gates, "gated models report their gates"
    for w in gates.values():
        assert torch.allclose(w.sum(dim=1), torch.ones(len(t)), atol=1e-6)
        assert (w >= 0).all()


def test_ple_gates_see_own_and_shared_experts_and_shared_gate_sees_all(tiny):
    spec, pre, t = tiny
    cfg = make_config("ple", {"n_levels": 2, "n_task_experts": 2, "n_shared_experts": 3})
    model = create_model("ple", spec, pre.shape, cfg)
    gates: dict[str, torch.Tensor] = {}
    model(t.dense, t.sparse, gates=gates)
    n_tasks = len(spec.tasks)
    assert gates["L0.a"].shape[1] == 2 + 3
    assert gates["L0.shared"].shape[1] == n_tasks * 2 + 3
    assert "L1.shared" not in gates, "the last extraction layer has no shared gate"


def test_one_level_ple_has_cgc_structure(tiny):
    spec, pre, _ = tiny
    torch.manual_seed(3)
    ple = create_model("ple", spec, pre.shape, make_config("ple", {"n_levels": 1}))
    torch.manual_seed(3)
    cgc = create_model("cgc", spec, pre.shape)
    assert [(k, v.shape) for k, v in ple.state_dict().items()] == [(k, v.shape) for k, v in cgc.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(ple.state_dict().values(), cgc.state_dict().values(), strict=True))
    assert all(layer.shared_gate is None for layer in cgc.layers)


def test_cgc_refuses_more_than_one_level():
    with pytest.raises(ValueError, match="exactly one extraction layer"):
        make_config("cgc", {"n_levels": 2})


def test_unknown_model_and_unknown_config_key_are_clear_errors():
    with pytest.raises(SpecError, match="unknown model 'plee'"):
        make_config("plee")
    with pytest.raises(SpecError, match="model.n_expertz: unknown config key of model 'mmoe'"):
        make_config("mmoe", {"n_expertz": 3})


def test_single_keeps_one_embedding_view_per_task(tiny):
    spec, pre, t = tiny
    model = create_model("single", spec, pre.shape)
    assert model.view_names == spec.task_names
    # Task a's loss must not move task b's embedding view: the models are independent.
    model(t.dense, t.sparse)[:, 0].sum().backward()
    grad = model.embeddings.tables[0].weight.grad
    d = model.embedding_dim
    assert grad[:, :d].abs().sum() > 0
    assert grad[:, d:].abs().sum() == 0


def test_masked_loss_ignores_rows_outside_the_space():
    logits = torch.tensor([[0.0, 2.0], [0.0, -3.0], [0.0, 5.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    is_binary = torch.tensor([True, True])
    losses = masked_task_losses(logits, labels, masks, is_binary)
    # Head 1 sees only row 0: its loss is BCE(2, 1), not the mean over three rows.
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(2.0), torch.tensor(1.0))
    assert torch.isclose(losses[1], expected)
    # Changing a label outside the space changes nothing.
    labels[2, 1] = 1.0
    assert torch.isclose(masked_task_losses(logits, labels, masks, is_binary)[1], expected)


def test_masked_loss_regression_is_mse_on_the_normalised_predictions():
    preds = torch.tensor([[0.5]])
    losses = masked_task_losses(preds, torch.tensor([[1.0]]), torch.ones(1, 1), torch.tensor([False]))
    assert torch.isclose(losses[0], torch.tensor(0.25))


def test_loss_weighting_static_dynamic_uncertainty():
    losses = torch.tensor([1.0, 2.0])
    assert LossWeighting("static", [1.0, 0.5])(losses, epoch=3).item() == pytest.approx(2.0)
    dyn = LossWeighting("dynamic", [1.0, 1.0], [0.5, 1.0])
    assert dyn(losses, epoch=2).item() == pytest.approx(0.25 + 2.0)
    unc = LossWeighting("uncertainty", [1.0, 1.0])
    assert unc(losses, epoch=0).item() == pytest.approx(0.5 * 1 + 0.5 * 2)
    assert sum(p.numel() for p in unc.parameters()) == 2
    with pytest.raises(ValueError, match="loss_weighting"):
        LossWeighting("gradnorm", [1.0])


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_from_its_defaults(tiny, name):
    spec, pre, t = tiny
    model = create_model(name, spec, pre.shape)
    assert model(t.dense[:4], t.sparse[:4]).shape == (4, len(model.heads))


@pytest.mark.parametrize("name", model_names())
def test_a_forward_without_a_gates_dict_leaves_no_state_behind(tiny, name):
    spec, pre, t = tiny
    model = create_model(name, spec, pre.shape).eval()
    with torch.no_grad():
        first = model(t.dense[:8], t.sparse[:8])
        gates: dict[str, torch.Tensor] = {}
        second = model(t.dense[:8], t.sparse[:8], gates=gates)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not any(hasattr(m, "last_weights") for m in model.modules()), "gate weights are returned, not kept"


MODEL_DIR = Path(__file__).resolve().parents[1] / "mtrank" / "training" / "models"
SHARED_MODULES = {"mtrank.training.models.blocks", "mtrank.training.models.base", "mtrank.training.models.registry"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if base == "mtrank.training.models"}
    return found


def test_the_model_directory_is_where_the_import_check_looks():
    assert {"__init__.py", "base.py", "blocks.py", "registry.py"} <= {p.name for p in MODEL_DIR.glob("*.py")}


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_files_import_only_torch_the_spec_and_the_shared_blocks(path):
    allowed_own = SHARED_MODULES | {"mtrank.training.models"}
    if path.stem == "__init__":
        # The package imports every model module so that their @register decorators run.
        allowed_own |= {f"mtrank.training.models.{p.stem}" for p in MODEL_DIR.glob("*.py")}
    bad = []
    for module in _imports(path):
        top = module.split(".")[0]
        if module == "__future__" or top in sys.stdlib_module_names or top == "torch":
            continue
        if module == "mtrank.spec" or module in allowed_own:
            continue
        bad.append(module)
    assert not bad, f"{path.name} imports {sorted(bad)}: model files map tensors to logits only"
