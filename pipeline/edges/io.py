"""Files in general: the artifact paths (paths.yaml), atomic writes, checkpoints, metrics,
JSON, CSV and figures. Parquet tables: ``tables``; params.yaml: ``params_file``.

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
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.errors import PipelineError

LAYOUT_FILE = Path(__file__).parents[1] / "paths.yaml"


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


def read_json(path: Path) -> Any:
    """Any JSON value a stage wrote (``write_json``)."""
    return read_metrics(path)


def write_json(path: Path, value: Any) -> None:
    """Any JSON value (e.g. a list of records, which DVC plots read), byte-deterministic."""
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
