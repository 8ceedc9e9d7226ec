"""A loaded model version as the service holds it: its manifest, its feature transform, its
store tables, and per user group an ONNX Runtime session with its batcher."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mtrank import kinds
from mtrank.manifest import ITEM_FACET_INPUT, GraphInfo, Manifest, ManifestError
from mtrank.service.batcher import Batcher
from mtrank.service.errors import NotReady
from mtrank.service.runner import GraphRunner
from mtrank.service.stores import LocalTable
from mtrank.transform import FeatureTransform


@dataclass
class GroupGraph:
    key: str
    info: GraphInfo
    runner: GraphRunner
    batcher: Batcher
    inputs: dict[str, kinds.GraphInput]
    """The graph's inputs by name, as the feature kinds derive them (:func:`expected_inputs`)."""

    @cached_property
    def task_outputs(self) -> list[tuple[str, str]]:
        """(task, output name) in output order."""
        return [(task, out.name) for task, out in zip(self.info.tasks, self.info.outputs, strict=True)]


def expected_inputs(runner: GraphRunner, transform: FeatureTransform,
                    tables: dict[str, LocalTable]) -> list[kinds.GraphInput]:
    """The inputs the feature kinds derive for this model (the item-facet index where the graph
    takes one)."""
    item_facet = transform.item_facet is not None and any(i.name == ITEM_FACET_INPUT for i in runner.inputs)
    return kinds.graph_inputs(transform, {f: t.width for f, t in tables.items()}, item_facet)


def check_graph(key: str, info: GraphInfo, runner: GraphRunner, transform: FeatureTransform,
                tables: dict[str, LocalTable]) -> dict[str, kinds.GraphInput]:
    """The ONNX graph's inputs are those the feature kinds derive from the manifest (names, axes,
    widths, dtypes) and its outputs the manifest's; the derived inputs by name."""
    expected = expected_inputs(runner, transform, tables)
    got = [i.name for i in runner.inputs]
    if got != [i.name for i in expected]:
        raise ValueError(f"graph {key!r}: inputs {got}, the manifest's features need {[i.name for i in expected]}")
    for spec, want in zip(runner.inputs, expected, strict=True):
        sizes_differ = len(spec.tail) != len(want.width) or any(
            a and a != b for a, b in zip(spec.tail, want.width, strict=False))
        if spec.per_request != want.per_request or sizes_differ or spec.dtype != np.dtype(want.dtype):
            axis = "requests" if spec.per_request else "batch"
            raise ValueError(f"graph {key!r}: input {spec.name} is {np.dtype(spec.dtype).name} "
                             f"[{', '.join(map(str, (axis, *spec.tail)))}], expected {want.dtype} {want.shape}")
    declared = [o.name for o in info.outputs]
    if sorted(runner.output_names) != sorted(declared) or len(info.tasks) != len(declared):
        raise ValueError(f"graph {key!r}: outputs {runner.output_names} do not match the manifest's {declared}")
    return {i.name: i for i in expected}


@dataclass
class LoadedVersion:
    manifest: Manifest
    dir: Path
    graphs: dict[str, GroupGraph]
    transform: FeatureTransform
    tables: dict[str, LocalTable]
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def device(self) -> str:
        return next(iter(self.graphs.values())).runner.device

    @property
    def provider(self) -> str:
        return next(iter(self.graphs.values())).runner.provider

    @cached_property
    def task_names(self) -> list[str]:
        names: list[str] = []
        for g in self.graphs.values():
            names += [t for t in g.info.tasks if t not in names]
        return names

    @cached_property
    def fusion_ranges(self) -> dict[str, tuple[float, float]]:
        """Task → (lo, hi) mapping its output onto the fusion's (0, 1] (regression tasks)."""
        return {t["name"]: tuple(t["fusion_range"]) for t in self.manifest.tasks if t.get("fusion_range")}

    def graph_for(self, group: str | None) -> GroupGraph:
        try:
            return self.graphs[self.manifest.graph_key(group)]
        except ManifestError as e:
            raise NotReady(str(e)) from None

    async def close(self) -> None:
        for g in self.graphs.values():
            await g.batcher.close()
