"""A loaded model version as the service holds it: its manifest, its feature transform, its
store tables, and per user group an ONNX Runtime session with its batcher."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mtrank.manifest import (
    DENSE_INPUT,
    EMB_PREFIX,
    IDS_INPUT,
    ITEM_FACET_INPUT,
    GraphInfo,
    Manifest,
    ManifestError,
)
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

    @cached_property
    def task_outputs(self) -> list[tuple[str, str]]:
        """(task, output name) in output order."""
        return [(task, out.name) for task, out in zip(self.info.tasks, self.info.outputs, strict=True)]

    @cached_property
    def store_fields(self) -> list[str]:
        return [i.name[len(EMB_PREFIX):] for i in self.runner.inputs if i.name.startswith(EMB_PREFIX)]

    @cached_property
    def input_names(self) -> frozenset[str]:
        return frozenset(i.name for i in self.runner.inputs)


def check_graph(key: str, info: GraphInfo, runner: GraphRunner, transform: FeatureTransform,
                tables: dict[str, LocalTable]) -> None:
    """The ONNX graph's inputs and outputs match the manifest, its transform and its tables."""
    for spec in runner.inputs:
        field_name = spec.name[len(EMB_PREFIX):] if spec.name.startswith(EMB_PREFIX) else None
        if spec.name == DENSE_INPUT:
            expected = len(transform.dense)
        elif spec.name == IDS_INPUT:
            expected = len(transform.graph_fields)
        elif spec.name == ITEM_FACET_INPUT and transform.item_facet is not None:
            expected = None
        elif field_name is not None and field_name in transform.store_fields:
            if field_name not in tables:
                raise ValueError(f"store field {field_name!r} has no table in the manifest")
            expected = tables[field_name].width
        else:
            raise ValueError(f"graph {key!r}: unexpected input {spec.name!r}")
        if spec.width is not None and spec.width != expected:
            raise ValueError(f"graph {key!r}: input {spec.name} has width {spec.width}, expected {expected}")
    declared = [o.name for o in info.outputs]
    if sorted(runner.output_names) != sorted(declared) or len(info.tasks) != len(declared):
        raise ValueError(f"graph {key!r}: outputs {runner.output_names} do not match the manifest's {declared}")


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
