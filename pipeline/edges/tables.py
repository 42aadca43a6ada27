"""The Parquet tables stages pass on: the distortion curves, allocations and the Pareto sweep.

Each table carries its name and schema version in its metadata and is read back strictly: a
table of another kind or version, or with values out of range, is one error naming the file.
Writes are byte-deterministic and atomic (``io.write_bytes_atomic``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.allocation.problem import Allocation
from pipeline.edges.io import write_bytes_atomic
from pipeline.errors import PipelineError
from pipeline.profiling.distortion import DistortionCurves

SCHEMA_VERSION = "2"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(
        fields, metadata={"rdprune.table": name, "rdprune.schema_version": SCHEMA_VERSION}
    )


DISTORTION_SCHEMA = _schema(
    "distortion",
    [
        pa.field("layer", pa.string(), nullable=False),  # named_modules() path
        pa.field("layer_index", pa.int32(), nullable=False),  # position in named_modules() order
        pa.field("numel", pa.int64(), nullable=False),  # weights in the layer
        pa.field("level", pa.int32(), nullable=False),  # index into the sparsity grid
        pa.field("sparsity", pa.float64(), nullable=False),  # fraction of the layer zeroed
        pa.field("kept", pa.int64(), nullable=False),  # weights kept at this level
        pa.field("macs_per_weight", pa.int64(), nullable=False),  # MACs per kept weight and sample
        pa.field("flops", pa.int64(), nullable=False),  # MACs kept at this level, per sample
        pa.field("distortion", pa.float64(), nullable=False),  # mean per-sample logit MSE
        pa.field("distortion_max", pa.float64(), nullable=False),  # max per-sample logit MSE
    ],
)

_ALLOCATION_FIELDS = [
    pa.field("layer", pa.string(), nullable=False),
    pa.field("numel", pa.int64(), nullable=False),
    pa.field("level", pa.int32(), nullable=False),  # nearest grid level
    pa.field("sparsity", pa.float64(), nullable=False),  # 1 - kept / numel
    pa.field("kept", pa.int64(), nullable=False),
    pa.field("macs_per_weight", pa.int64(), nullable=False),
    pa.field("flops", pa.int64(), nullable=False),  # kept MACs per sample
    pa.field("predicted_distortion", pa.float64(), nullable=False),
]
ALLOCATION_SCHEMA = _schema("allocation", _ALLOCATION_FIELDS)
# The Pareto front: one allocation per swept ratio, long format (ratio x layer).
PARETO_SCHEMA = _schema(
    "pareto", [pa.field("ratio", pa.float64(), nullable=False), *_ALLOCATION_FIELDS]
)


def _write_table(
    path: Path, columns: dict[str, Any], schema: pa.Schema, extra: Mapping[str, str]
) -> None:
    table = pa.table(columns, schema=schema.with_metadata({**schema.metadata, **extra}))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def _read_table(path: Path, schema: pa.Schema, producer: str) -> pa.Table:
    """Read and check a table: exact columns and types, no nulls, matching schema version."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run the {producer} stage first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(
            f"{path} is corrupt or not Parquet ({str(exc).splitlines()[0]})"
        ) from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    expected = schema.metadata[b"rdprune.schema_version"].decode()
    if meta.get("rdprune.schema_version") != expected:
        raise PipelineError(
            f"{path} has schema version {meta.get('rdprune.schema_version')!r}; "
            f"allowed: {expected!r} (re-run the {producer} stage)"
        )
    for f in schema:
        if f.name not in table.column_names:
            raise PipelineError(f"{path} lacks column {f.name!r}; re-run the {producer} stage")
        found = table.schema.field(f.name).type
        if found != f.type:
            raise PipelineError(f"{path} column {f.name!r} has type {found}; allowed: {f.type}")
        if table.column(f.name).null_count:
            raise PipelineError(f"{path} column {f.name!r} has nulls; allowed: none")
    return table


def write_distortion(path: Path, curves: DistortionCurves, extra: Mapping[str, str]) -> None:
    """One row per layer x level, layers in order, levels ascending."""
    n_layers, n_levels = len(curves.layers), len(curves.sparsity)
    columns = {
        "layer": np.repeat(np.array(curves.layers, dtype=object), n_levels),
        "layer_index": np.repeat(np.arange(n_layers, dtype=np.int32), n_levels),
        "numel": np.repeat(curves.numel.astype(np.int64), n_levels),
        "level": np.tile(np.arange(n_levels, dtype=np.int32), n_layers),
        "sparsity": np.tile(curves.sparsity, n_layers),
        "kept": curves.kept().ravel(),
        "macs_per_weight": np.repeat(curves.macs_per_weight.astype(np.int64), n_levels),
        "flops": (curves.kept() * curves.macs_per_weight[:, None]).ravel(),
        "distortion": curves.mean.ravel(),
        "distortion_max": curves.max.ravel(),
    }
    _write_table(path, columns, DISTORTION_SCHEMA, extra)


def read_distortion(path: Path) -> DistortionCurves:
    """Rebuild the (L, K) curves; a table with missing or duplicate levels is rejected."""
    table = _read_table(path, DISTORTION_SCHEMA, "profile").sort_by(
        [("layer_index", "ascending"), ("level", "ascending")]
    )
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    order = np.unique(cols["layer_index"])
    n_layers, n_levels = len(order), int(cols["level"].max()) + 1 if len(cols["level"]) else 0
    full = (
        n_layers * n_levels == table.num_rows
        and np.array_equal(cols["level"], np.tile(np.arange(n_levels), n_layers))
        and np.array_equal(order, np.arange(n_layers))
    )
    if not full:
        raise PipelineError(
            f"{path} does not hold every level for every layer; re-run the profile stage"
        )
    grid = lambda name: cols[name].reshape(n_layers, n_levels)  # noqa: E731
    layers = [str(x) for x in cols["layer"][::n_levels]]
    if not all((grid("sparsity") == grid("sparsity")[0]).all(axis=1)):
        raise PipelineError(
            f"{path} has different sparsity grids per layer; re-run the profile stage"
        )
    return DistortionCurves(
        layers=layers,
        numel=grid("numel")[:, 0].astype(np.int64),
        sparsity=grid("sparsity")[0].astype(np.float64),
        mean=grid("distortion").astype(np.float64),
        max=grid("distortion_max").astype(np.float64),
        macs_per_weight=grid("macs_per_weight")[:, 0].astype(np.int64),
    )


def read_table_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata of a Parquet file's schema."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(
            f"{path} is corrupt or not Parquet ({str(exc).splitlines()[0]})"
        ) from None
    return {k.decode(): v.decode() for k, v in meta.items()}


def _allocation_columns(allocation: Allocation) -> dict[str, Any]:
    return {
        "layer": allocation.layers,
        "numel": allocation.numel,
        "level": allocation.level.astype(np.int32),
        "sparsity": allocation.sparsity,
        "kept": allocation.kept,
        "macs_per_weight": allocation.macs_per_weight,
        "flops": allocation.flops,
        "predicted_distortion": allocation.predicted_distortion,
    }


def write_allocation(path: Path, allocation: Allocation, extra: Mapping[str, str]) -> None:
    meta = {**extra, "rdprune.lower_bound": repr(allocation.lower_bound)}
    _write_table(path, _allocation_columns(allocation), ALLOCATION_SCHEMA, meta)


def read_allocation(path: Path) -> Allocation:
    table = _read_table(path, ALLOCATION_SCHEMA, "allocate")
    col = lambda name: table.column(name).to_numpy()  # noqa: E731
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return Allocation(
        layers=[str(x) for x in table.column("layer").to_pylist()],
        numel=col("numel").astype(np.int64),
        level=col("level").astype(np.int64),
        sparsity=col("sparsity").astype(np.float64),
        kept=col("kept").astype(np.int64),
        macs_per_weight=col("macs_per_weight").astype(np.int64),
        predicted_distortion=col("predicted_distortion").astype(np.float64),
        lower_bound=float(meta.get("rdprune.lower_bound", "nan")),
    )


def write_pareto(
    path: Path, front: Sequence[tuple[float, Allocation]], extra: Mapping[str, str]
) -> None:
    """One row per (ratio, layer)."""
    if not front:  # every swept ratio was infeasible: an empty table of the right schema
        _write_table(path, {f.name: [] for f in PARETO_SCHEMA}, PARETO_SCHEMA, extra)
        return
    parts = [_allocation_columns(a) for _, a in front]
    columns: dict[str, Any] = {
        "ratio": np.concatenate([np.full(len(a.layers), r) for r, a in front])
    }
    for name in parts[0]:
        columns[name] = np.concatenate(
            [np.asarray(p[name], dtype=object if name == "layer" else None) for p in parts]
        )
    _write_table(path, columns, PARETO_SCHEMA, extra)
