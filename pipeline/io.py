"""The one module that knows file formats: params, Parquet tables, checkpoints, metrics, CSV.

Every write is atomic (a temporary file in the target directory, then ``os.replace``), so a
failing stage never leaves a half-written output behind, and byte-deterministic, so that DVC
skips unchanged downstream work.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from pipeline.allocation import Allocation
from pipeline.config import Params, load_params
from pipeline.distortion import DistortionCurves
from pipeline.errors import PipelineError

SCHEMA_VERSION = "2"


LAYOUT_FILE = Path(__file__).with_name("paths.yaml")


@functools.cache
def _layout() -> dict[str, str]:
    """Artifact name -> path relative to the project root, from ``paths.yaml``."""
    return yaml.safe_load(LAYOUT_FILE.read_text())["paths"]


@dataclass(frozen=True)
class Paths:
    """Where each stage's outputs live under the project ``root``, as ``paths.yaml`` (which
    dvc.yaml reads too) says."""

    root: Path = Path(".")

    def _at(self, name: str) -> Path:
        return self.root / _layout()[name]

    @property
    def params(self) -> Path:
        return self._at("params")

    @property
    def baseline(self) -> Path:
        return self._at("baseline")

    @property
    def calibration(self) -> Path:
        return self._at("calibration")

    @property
    def distortion(self) -> Path:
        return self._at("distortion")

    @property
    def allocation(self) -> Path:
        return self._at("allocation")

    @property
    def pareto(self) -> Path:
        return self._at("pareto")

    @property
    def pruned(self) -> Path:
        return self._at("pruned")

    @property
    def finetuned(self) -> Path:
        return self._at("finetuned")

    @property
    def export(self) -> Path:
        """The export stage's folder: model.safetensors (compact) and model.onnx."""
        return self._at("export")

    @property
    def rounds(self) -> Path:
        """The schedule's folder: one sub-folder per finished round (``round``)."""
        return self._at("rounds")

    def round(self, index: int) -> Path:
        """Round ``index``'s folder (1-based): model.pt, allocation.parquet, metrics.json."""
        return self.rounds / f"round_{index:03d}"

    def metrics(self, stage: str) -> Path:
        return self._at("metrics") / f"{stage}.json"

    def plot(self, name: str) -> Path:
        return self._at("plots") / f"{name}.csv"

    def figure(self, name: str) -> Path:
        return self._at("plots") / f"{name}.png"

    @property
    def defaults(self) -> Path:
        return self._at("defaults")

    @property
    def model_code(self) -> Path:
        """The digest of a user model's code (validate): a dependency of every stage that
        builds the model."""
        return self._at("model_code")

    FIGURES = ("distortion_curves", "allocation", "pareto", "joint_distortion")

    def figures(self) -> list[Path]:
        return [self.figure(name) for name in self.FIGURES]

    def result_files(self) -> list[Path]:
        """The files that make one pipeline result: its MLflow run is keyed by their bytes."""
        return [
            self.finetuned,
            self.allocation,
            *(self.metrics(s) for s in ("calibrate", "allocate", "prune", "finetune")),
        ]

    def timing(self, stage: str) -> Path:
        """Wall time of a stage's last run: no DVC output, so no stage's cache key holds it."""
        return self._at("timings") / f"{stage}.json"


# ---------------------------------------------------------------------------- atomic writes
TEMPORARY = ".*.tmp"  # the names write_bytes_atomic gives its temporary files


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one. A
    failure (a full disk, no permission) leaves the old file and no temporary, and is one
    ``PipelineError`` naming the file and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a read-only folder: nothing was left either
                Path(tmp).unlink(missing_ok=True)
        raise PipelineError(
            f"cannot write {path}: {exc.strerror or exc}; allowed: a disk with free space "
            "that this user can write (the earlier file is left as it was)"
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(paths: Paths) -> list[Path]:
    """Delete the temporary files a killed stage left in the output folders (a stray one in
    ``artifacts/rounds/`` would change that folder's DVC hash); returns them."""
    folders = {"metrics", "plots", "timings", "rounds"}  # written file by file, whole
    files = {paths._at(n).parent for n in _layout() if n not in folders and n != "params"}
    found = {p for folder in files - {paths.root} for p in folder.glob(TEMPORARY)}
    found |= {p for name in folders for p in paths._at(name).rglob(TEMPORARY)}
    found = sorted(p for p in found if p.is_file())
    for path in found:
        path.unlink(missing_ok=True)
    return found


# ---------------------------------------------------------------------------- params
def read_params(path: Path) -> Params:
    """Parse and validate params.yaml."""
    return load_params(read_params_mapping(path))


def read_params_mapping(path: Path) -> Any:
    """params.yaml as parsed, before validation: as YAML 1.2 reads it, which DVC does."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"params file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Yaml12)  # noqa: S506 (safe)
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise PipelineError(f"{path} is not UTF-8 text ({where})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


_YAML11_ONLY = ("bool", "int", "float")  # their YAML 1.1 resolvers are replaced below


class _Yaml12(yaml.SafeLoader):
    """PyYAML's safe loader reading scalars as YAML 1.2's core schema (and so DVC, through
    ruamel) does, where YAML 1.1 differs: ``1e-1`` is a float (1.1 wants a dot), ``017`` is 17
    (1.1: octal 15), ``yes``/``on``/``4:16`` are strings (1.1: true / true / 256). A key given
    twice is an error (1.1 keeps the last silently; DVC refuses the file)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag.rpartition(":")[2] not in _YAML11_ONLY]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the safe constructor says so itself
                break
            if duplicate:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Yaml12.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


# ---------------------------------------------------------------------------- checkpoints
def _torch_bytes(obj: Any) -> bytes:
    # Saving into memory keeps the archive's internal name fixed (torch.save embeds the file
    # name), so identical tensors always give identical bytes.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}; allowed: the path of a torch state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt archives
        raise PipelineError(
            f"{what} {path} is corrupt or not a torch file ({type(exc).__name__})"
        ) from None


def write_state_dict(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """A plain state_dict: loads with ``torch.load`` + ``load_state_dict``."""
    write_bytes_atomic(
        path, _torch_bytes({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    )


def read_checkpoint(path: Path, what: str = "checkpoint") -> Any:
    """The raw object of a checkpoint file (callers normalise it to a state_dict)."""
    return _torch_load(path, what)


def write_calibration(
    path: Path, inputs: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor
) -> None:
    """inputs (N, ...) float32, labels (N,) int64, reference logits (N, classes) float32."""
    write_bytes_atomic(
        path, _torch_bytes({"inputs": inputs, "labels": labels, "reference": reference})
    )


def read_calibration(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    obj = _torch_load(path, "calibration set")
    if not isinstance(obj, Mapping) or {"inputs", "labels", "reference"} - set(obj):
        raise PipelineError(
            f"calibration set {path} lacks inputs/labels/reference; re-run calibrate"
        )
    return obj["inputs"], obj["labels"], obj["reference"]


# ---------------------------------------------------------------------------- metrics, CSV
def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    write_json(path, dict(metrics))


def read_metrics(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"metrics file not found: {path}; run the stage that writes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PipelineError(f"metrics file {path} is not valid JSON") from None


def read_csv(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found; run the stage that writes it")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_figure(path: Path, figure: Any) -> None:
    """A matplotlib figure as PNG, byte-deterministic (no software or date metadata)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def content_hash(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and bytes: the identity of a result."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path} not found; run the stage that writes it")
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())


# ---------------------------------------------------------------------------- Parquet tables
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


# ---------------------------------------------------------------------------- schedule rounds
ROUND_FILES = ("model.pt", "allocation.parquet", "metrics.json")  # metrics.json last: done


def write_round(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    allocation: Allocation,
    metrics: Mapping[str, Any],
    extra: Mapping[str, str],
) -> None:
    """One finished round: its checkpoint, allocation and metrics. The metrics file, written
    last, marks the round complete: a round killed half-way is recomputed, not half-read."""
    folder = Path(folder)
    (folder / "metrics.json").unlink(missing_ok=True)
    write_state_dict(folder / "model.pt", state_dict)
    write_allocation(folder / "allocation.parquet", allocation, extra)
    write_metrics(folder / "metrics.json", metrics)


def read_round(folder: Path, key: str) -> tuple[Any, Allocation, dict[str, Any]] | None:
    """(state_dict, allocation, metrics) of the round in ``folder`` if it finished under
    ``key``, else None (absent, unfinished, or made by other settings)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in ROUND_FILES):
        return None
    try:
        metrics = read_metrics(folder / "metrics.json")
        if not isinstance(metrics, dict) or metrics.get("key") != key:
            return None
        state = _torch_load(folder / "model.pt", "round checkpoint")
        return state, read_allocation(folder / "allocation.parquet"), metrics
    except PipelineError:  # a damaged file: the round is computed again
        return None


def round_folders(folder: Path) -> dict[int, Path]:
    """Round number -> folder, for the folders ``Paths.round`` names (``round_NNN``)."""
    found = {}
    for path in Path(folder).glob("round_*"):
        match = re.fullmatch(r"round_(\d+)", path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_json(path: Path) -> Any:
    """Any JSON value a stage wrote (``write_json``)."""
    return read_metrics(path)


def write_json(path: Path, value: Any) -> None:
    """Any JSON value (e.g. a list of records, which DVC plots read), byte-deterministic."""
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
