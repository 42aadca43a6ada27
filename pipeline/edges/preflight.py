"""What the validate stage checks before any work, beyond the params' own values: the keys
dvc.yaml reads exist, the dataset can be read and its images share a size, the model runs on
it, and the digest of a user model's code (a dependency of every stage that builds it).

Each check raises a ``PipelineError`` whose one line names what to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.allocation.problem import layer_bounds
from pipeline.config.params import Params
from pipeline.edges.stage import adopt_checkpoint
from pipeline.errors import PipelineError
from pipeline.nn.data import DatasetSplits, load_dataset
from pipeline.nn.layers import prunable_numel, unpruned_matrices
from pipeline.nn.models import MODEL_SOURCES, MODELS, build_model

log = logging.getLogger("rdprune")

# validate runs on every `dvc repro`: a few seconds at most, even on ImageNet
SIZE_CHECK_ALL = 10_000  # image headers read, all up to this many files, else evenly spaced
DECODE_SAMPLE = 64  # images decoded in full (a truncated file fails only when decoded)


def dvc_param_keys(dvc_yaml: Path) -> dict[str, list[str]]:
    """``{stage: [params.yaml keys it lists]}`` from dvc.yaml (keys of params.yaml only)."""
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PipelineError(f"{dvc_yaml} is not a readable dvc.yaml ({first})") from None
    out: dict[str, list[str]] = {}
    for stage, spec in stages.items():
        keys: list[str] = []
        for entry in (spec or {}).get("params") or []:
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, Mapping) and entry.get("params.yaml"):  # null: all of it
                keys += list(entry["params.yaml"])
        out[stage] = keys
    return out


def check_dvc_params(mapping: Mapping[str, Any] | None, dvc_yaml: Path) -> None:
    """Every param a dvc.yaml stage lists is in params.yaml: DVC fails on a missing one only
    after it has deleted the outputs of the stage that lists it."""
    if not dvc_yaml.is_file():
        return  # a stage run outside a DVC project (tests, benchmarks)
    for stage, keys in dvc_param_keys(dvc_yaml).items():
        for key in keys:
            node: Any = mapping or {}
            for part in key.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise PipelineError(
                        f"params.yaml lacks {key}, which dvc.yaml's stage {stage} reads; "
                        "allowed: every param spelled out (copy params.yaml from the "
                        "repository or a preset and edit it)"
                    )
                node = node[part]


def _image_files(dataset: Any) -> list[str]:
    samples = getattr(dataset, "samples", None)
    return [path for path, _ in samples] if samples else []


def _evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[math.floor(i * step)] for i in range(count)]


def check_folder_files(root: Path, files: list[str]) -> None:
    """An image folder's files are each read once (a symlink to a folder above would feed its
    images again, silently) and what the reader skips (not an image) is said."""
    seen: dict[str, str] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            raise PipelineError(
                f"data.root: {path} is {seen[real]} again (through a symlink); allowed: each "
                "image once under its class folder"
            )
        seen[real] = path
    taken = {os.path.normpath(f) for f in files}
    skipped = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(root)
        for name in names
        if os.path.normpath(os.path.join(folder, name)) not in taken and not name.startswith(".")
    ]
    if skipped:
        log.warning(
            "validate: %d file(s) under %s are not images and are not read, e.g. %s",
            len(skipped),
            root,
            skipped[0],
        )


def check_images(params: Params, splits: DatasetSplits) -> None:
    """Image-folder data: every image's header (an evenly spaced sample beyond
    ``SIZE_CHECK_ALL`` files) opens, and with ``data.image_size`` null they all share one
    size; a sample decodes."""
    from PIL import Image

    for split in (splits.train_eval, splits.test):
        files = _image_files(split)
        if not files:
            continue
        check_folder_files(Path(split.root), files)
        sizes: dict[tuple[int, int], str] = {}
        for path in _evenly(files, SIZE_CHECK_ALL):
            try:
                with Image.open(path) as image:
                    sizes.setdefault(image.size, path)
            except (OSError, Image.DecompressionBombError) as exc:
                raise PipelineError(
                    f"data.root: {path} is not a readable image ({exc}); allowed: image "
                    "files PIL reads (move others out of the class folders)"
                ) from None
            if params.data.image_size is None and len(sizes) > 1:
                (a, first), (b, other) = list(sizes.items())[:2]
                raise PipelineError(
                    f"data.root: {other} is {b[0]}x{b[1]} but {first} is {a[0]}x{a[1]}; "
                    "allowed: images of one size, or data.image_size: N to resize them"
                )
        for path in _evenly(files, DECODE_SAMPLE):
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, Image.DecompressionBombError) as exc:
                raise PipelineError(f"data.root: {path} cannot be decoded ({exc})") from None


def check_model_runs(params: Params, splits: DatasetSplits) -> None:
    """The model builds for the data's channels and classes, takes its checkpoint, runs on one
    of the data's images to finite logits, and every allocate.limits / exclude pattern matches
    one of its prunable layers within [0, 1]."""
    x, _ = splits.test[0]
    try:
        built = build_model(params.model.arch, splits.in_channels, splits.num_classes)
        model = adopt_checkpoint(built, params)  # as the baseline stage will
        with torch.no_grad():
            out = model.eval()(x.unsqueeze(0))
    except PipelineError:
        raise
    except Exception as exc:  # whatever the model raises on this input
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PipelineError(
            f"model.arch = {params.model.arch!r} cannot run on data.name = "
            f"{params.data.name!r} images {tuple(x.shape)} ({type(exc).__name__}: {first}); "
            "allowed: a model for this data's channels and size (torchvision models take 3 "
            "channels)"
        ) from None
    left = unpruned_matrices(model)
    if left:
        log.warning(
            "validate: %d weight matrices are not in a prunable layer and stay dense (their "
            "weights count in metrics/prune.json's sparsity_all_weight_matrices only): %s",
            len(left),
            ", ".join(left),
        )
    if not torch.is_tensor(out) or out.shape != (1, splits.num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise PipelineError(
            f"model.arch = {params.model.arch!r} gives {shape} for one image; allowed: a "
            f"model whose output is (N, {splits.num_classes}) logits"
        )
    if not out.isfinite().all():
        raise PipelineError(
            f"model.arch = {params.model.arch!r} gives NaN or inf logits for the first test "
            "image; allowed: a model (and checkpoint) with finite outputs"
        )
    layer_bounds(list(prunable_numel(model)), params.allocate.limits, params.allocate.exclude)


def check_counts(params: Params, splits: DatasetSplits) -> None:
    """The image counts the params draw from the training split fit in it."""
    n = len(splits.train_eval)
    counts = {
        "calibrate.samples": params.calibrate.samples if params.calibrate.source == "data" else 0,
        # with a repair, the BatchNorm statistics come from the repair's images
        "prune.bn_recalibration": 0 if params.prune.reconstruct else params.prune.bn_recalibration,
        "prune.reconstruct_samples": params.prune.reconstruct_samples
        if params.prune.reconstruct
        else 0,
    }
    for key, count in counts.items():
        if count > n:
            raise PipelineError(f"{key} = {count} exceeds the {n} training images; allowed: 1..{n}")


def check_data_and_model(params: Params) -> DatasetSplits:
    splits = load_dataset(params.data)
    check_counts(params, splits)
    check_images(params, splits)
    check_model_runs(params, splits)
    return splits


def user_model_sources(arch: str) -> list[Path]:
    """The files of a ``package.module:factory`` model's code: the module's file, or every
    .py file of its folder when it is a package; none for the registry's own models."""
    prefix, sep, _ = arch.partition(":")
    if arch in MODELS or not sep or prefix in MODEL_SOURCES:
        return []
    spec = importlib.util.find_spec(prefix)
    if spec is None or spec.origin is None or not spec.has_location:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: all of it
        return sorted(origin.parent.rglob("*.py"))
    return [origin]


def model_code_digest(arch: str, root: Path) -> dict[str, str]:
    """``{file: sha256}`` of a user model's code, paths relative to the project ``root`` where
    they lie inside it: the stages that build the model depend on this, so editing the code
    reruns them."""
    out = {}
    for path in user_model_sources(arch):
        try:
            name = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            name = str(path.resolve())
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
