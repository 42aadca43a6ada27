"""Dataset registry and the deterministic calibration subset.

A loader returns ``DatasetSplits``: the training split with evaluation transforms (what the
calibration subset is drawn from), the training split as the trainer sees it, and the test
split. Nothing is ever downloaded: `digits` ships inside scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # config validates names against this module: no import circle
    from pipeline.config.sections import DataParams


@dataclass(frozen=True)
class DatasetSplits:
    train_eval: Dataset  # training images, evaluation transforms (never augmented)
    train: Dataset  # training images as the trainer sees them
    test: Dataset
    in_channels: int
    num_classes: int


DatasetLoader = Callable[["DataParams"], DatasetSplits]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def add(loader: DatasetLoader) -> DatasetLoader:
        DATASETS[name] = loader
        return loader

    return add


DIGITS_MEAN, DIGITS_STD = [0.3053], [0.3760]  # of all 1,797 images scaled to [0, 1]
DIGITS_SPLIT_SEED = 0  # the train/test split is fixed; `seed` only drives training and sampling


@register_dataset("digits")
def load_digits_splits(params: DataParams) -> DatasetSplits:
    """scikit-learn's 8x8 digits: (N, 1, 8, 8) float32 normalised images, int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    mean = torch.tensor(params.mean or DIGITS_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(params.std or DIGITS_STD).view(1, -1, 1, 1)
    if mean.numel() != 1:
        raise PipelineError(
            f"data.mean = {params.mean} has {mean.numel()} channels; digits has 1; "
            "allowed: one value each in data.mean and data.std, or null"
        )
    images = (images - mean) / std
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = round(params.test_fraction * len(labels))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    train = TensorDataset(images[train_idx], labels[train_idx])
    test = TensorDataset(images[test_idx], labels[test_idx])
    return DatasetSplits(train_eval=train, train=train, test=test, in_channels=1, num_classes=10)


CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _transforms(params: DataParams, mean: list[float], std: list[float], height: int):
    """(train, eval) torchvision transforms.

    data.image_size null: small images used as they are (eval: none; train: random crop with
    4-pixel padding and flips, the CIFAR recipe). Else the ImageNet recipe: eval resizes to
    size * 256 / 224 and centre-crops to size; train takes random resized crops and flips.
    """
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(params.mean or mean, params.std or std)]
    size = params.image_size
    if size is None:
        train = [T.RandomCrop(height, padding=4), T.RandomHorizontalFlip()]
        evaluation: list = []
    else:
        train = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        evaluation = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(train + normalize), T.Compose(evaluation + normalize)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PipelineError(f"data.root: {path} not found; allowed: {what}")
    return path


# What a CIFAR batch's pickle may name: numpy's array and scalar reconstructors and types.
# Nothing else is looked up, so a file cannot make the unpickler call anything else.
_CIFAR_GLOBALS = {
    (module, name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{package}.multiarray", "_reconstruct"),
        (f"{package}.multiarray", "scalar"),
        (f"{package}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # bytes, protocol <= 2


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(images (N, 3, 32, 32) uint8, labels) of one python-pickled CIFAR batch, read by an
    unpickler that admits only numpy arrays, numpy scalars and plain containers: a file that
    names anything else is refused with one line naming it, and nothing in it runs."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if (module, name) not in _CIFAR_GLOBALS:
                raise pickle.UnpicklingError(f"it names {module}.{name}, not CIFAR data")
            return super().find_class(module, name)

    allowed = "a CIFAR-10 batch: a pickled dict of 'data' (N x 3072 uint8) and 'labels' (0-9)"
    try:
        with open(path, "rb") as handle:
            entry = Restricted(handle, encoding="latin1").load()
        data, labels = entry["data"], entry["labels"]
        # checked before anything touches the array: a few bytes of pickle can declare a
        # huge uninitialised one
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
            raise ValueError(f"'data' is {type(data).__name__}, not a uint8 array")
        if data.nbytes > path.stat().st_size or data.size % 3072:
            raise ValueError(f"'data' of shape {data.shape} is not rows of 3072 stored bytes")
        if not all(isinstance(y, int | np.integer) and 0 <= y < 10 for y in labels):
            raise ValueError("a label is not an integer in 0-9")
        data, labels = data.reshape(-1, 3, 32, 32), [int(y) for y in labels]
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
        MemoryError,
        RuntimeError,
    ) as exc:
        raise PipelineError(
            f"data.root: {path} is not allowed ({exc}); allowed: {allowed}"
        ) from None
    if len(labels) != len(data):
        raise PipelineError(
            f"data.root: {path} holds {len(data)} images and {len(labels)} labels; "
            f"allowed: {allowed}"
        )
    return data, labels


class CifarBatches(Dataset):
    """Images of python-pickled CIFAR batches (torchvision's on-disk format): each file holds
    ``data`` (N, 3072) uint8 rows and ``labels``. Items are (transform(PIL image), label)."""

    def __init__(self, files: list[Path], transform) -> None:
        data, labels = [], []
        for f in files:
            images, batch_labels = read_cifar_batch(f)
            data.append(images)
            labels.extend(batch_labels)
        self.images = np.concatenate(data).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@register_dataset("cifar10")
def load_cifar10(params: DataParams) -> DatasetSplits:
    """CIFAR-10 in torchvision's on-disk format: data.root holds ``cifar-10-batches-py/``
    (data_batch_1..5, test_batch) or is that directory. Never downloads."""
    allowed = "a directory holding cifar-10-batches-py/ with data_batch_1..5 and test_batch"
    if params.root is None:
        raise PipelineError(f"data.root = None; allowed: {allowed}")
    root = Path(params.root)
    folder = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    _require_dir(folder, allowed)
    missing = [n for n in [*CIFAR_TRAIN, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise PipelineError(f"data.root: {folder} lacks {', '.join(missing)}; allowed: {allowed}")
    train_tf, eval_tf = _transforms(params, CIFAR10_MEAN, CIFAR10_STD, 32)
    try:
        train_files = [folder / n for n in CIFAR_TRAIN]
        train, train_eval = CifarBatches(train_files, train_tf), CifarBatches(train_files, eval_tf)
        test = CifarBatches([folder / "test_batch"], eval_tf)
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise PipelineError(
            f"data.root: {folder} is not a readable CIFAR-10 directory ({exc})"
        ) from None
    return DatasetSplits(
        train_eval=train_eval, train=train, test=test, in_channels=3, num_classes=10
    )


@register_dataset("imagefolder")
def load_imagefolder(params: DataParams) -> DatasetSplits:
    """ImageNet layout: data.root/train/<class>/* and data.root/val/<class>/* (or test/)."""
    from torchvision.datasets import ImageFolder

    if params.root is None:
        raise PipelineError("data.root = None; allowed: a directory with train/ and val/ or test/")
    allowed = "a directory with train/ and val/ (or test/) class folders"
    root = _require_dir(Path(params.root), allowed)
    _require_dir(root / "train", allowed)
    held_out = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if held_out is None:
        raise PipelineError(f"data.root: {root} has no val/ or test/; allowed: {allowed}")
    try:
        probe = ImageFolder(str(root / "train"))
        height = probe[0][0].size[1]
        train_tf, eval_tf = _transforms(params, IMAGENET_MEAN, IMAGENET_STD, height)
        train_eval = ImageFolder(str(root / "train"), eval_tf)
        train = ImageFolder(str(root / "train"), train_tf)
        test = ImageFolder(str(held_out), eval_tf)
    except Exception as exc:  # PIL raises its own types too (DecompressionBombError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(
            f"data.root: {root} is not a readable image folder ({first}); allowed: {allowed}"
        ) from None
    if test.classes != train_eval.classes:
        raise PipelineError(f"data.root: {held_out.name}/ and train/ have different class folders")
    channels = 1 if probe[0][0].mode == "L" else 3
    return DatasetSplits(
        train_eval=train_eval,
        train=train,
        test=test,
        in_channels=channels,
        num_classes=len(train_eval.classes),
    )


def load_dataset(params: DataParams) -> DatasetSplits:
    return DATASETS[params.name](params)


def synthetic_inputs(like: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Zero-data calibration: standard-normal inputs (size, *like.shape) in the normalised
    input space, as in the paper."""
    return torch.randn(size, *like.shape, generator=torch.Generator().manual_seed(seed))


def calibration_subset(
    dataset: Dataset, size: int, seed: int, key: str = "calibrate.samples"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded sample of ``size`` distinct items: inputs (size, C, H, W) float32, labels (size,).

    ``key`` names the param that asked for ``size`` items, for the error when there are fewer.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if size > n:
        raise PipelineError(f"{key} = {size} exceeds the {n} training images; allowed: 1..{n}")
    indices = np.random.default_rng(seed).choice(n, size=size, replace=False)
    items = [dataset[int(i)] for i in indices]
    inputs = torch.stack([x for x, _ in items]).to(torch.float32)
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, labels


def _from_data(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return calibration_subset(dataset, size, seed)


def _synthetic(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return synthetic_inputs(dataset[0][0], size, seed), None  # no labels: zero-data


# calibrate.source -> (dataset, size, seed) -> (inputs (N, ...), labels (N,) or None)
CALIBRATION_SOURCES: dict[
    str, Callable[[Dataset, int, int], tuple[torch.Tensor, torch.Tensor | None]]
] = {
    "data": _from_data,
    "synthetic": _synthetic,
}
