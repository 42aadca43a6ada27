"""Dataset registry and the deterministic calibration subset.

A loader returns ``DatasetSplits``: the training split with evaluation transforms (what the
calibration subset is drawn from), the training split as the trainer sees it, and the test
split. Nothing is ever downloaded: `digits` ships inside scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pipeline.config import DataParams
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class DatasetSplits:
    train_eval: Dataset  # training images, evaluation transforms (never augmented)
    train: Dataset  # training images as the trainer sees them
    test: Dataset
    in_channels: int
    num_classes: int


DatasetLoader = Callable[[DataParams], DatasetSplits]
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
        raise PipelineError(f"data.mean = {params.mean} has {mean.numel()} channels; digits has 1")
    images = (images - mean) / std
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = round(params.test_fraction * len(labels))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    train = TensorDataset(images[train_idx], labels[train_idx])
    test = TensorDataset(images[test_idx], labels[test_idx])
    return DatasetSplits(train_eval=train, train=train, test=test, in_channels=1, num_classes=10)


def load_dataset(params: DataParams) -> DatasetSplits:
    return DATASETS[params.name](params)


def calibration_subset(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded sample of ``size`` distinct items: inputs (size, C, H, W) float32, labels (size,)."""
    n = len(dataset)  # type: ignore[arg-type]
    if size > n:
        raise PipelineError(
            f"calibrate.size = {size} exceeds the {n} training images; allowed: 1..{n}"
        )
    indices = np.random.default_rng(seed).choice(n, size=size, replace=False)
    items = [dataset[int(i)] for i in indices]
    inputs = torch.stack([x for x, _ in items]).to(torch.float32)
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, labels
