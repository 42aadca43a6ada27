"""Profiling benchmark: naive (a full forward per layer x level, the paper's algorithm) versus
fast (suffix-only recomputation, batched levels), same machine, same calibration set and grid.

Models:
  - the public pretrained CIFAR ResNet-20 with real CIFAR-10 calibration images from
    ../shared (skipped, and said so, when ../shared is absent);
  - torchvision ResNet-18, VGG-11, DenseNet-121, MobileNetV2 with random weights at 32x32;
  - ResNet-18, VGG-11 and MobileNetV2 at 224x224 (fewer images and levels, to fit a CPU run).

Per model: wall time of each engine, speed-up, peak RSS growth during each engine, the fraction
of the naive engine's FLOPs the fast engine executes (torch's FlopCounterMode on a separate,
smaller run), and the largest relative difference between the two tables.

Run: python benchmarks/bench_profile.py [--quick]   (about 10 minutes on 2 cores; --quick: 2)
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from pipeline.distortion import profile_layer, sparsity_grid
from pipeline.evaluation import predict_logits
from pipeline.layers import prunable_numel
from pipeline.models import build_model, load_weights, normalize_state_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
THREADS = 2


class PeakRss:
    """Peak resident memory growth of this process while the block runs (sampled)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def run_engine(model, inputs, reference, grid, engine, batch_size, memory_mb):
    return [
        profile_layer(
            name,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=grid,
            batch_size=batch_size,
            threads=THREADS,
            engine=engine,
            memory_mb=memory_mb,
        )
        for name in prunable_numel(model)
    ]


def flops(model, inputs, reference, grid, engine, batch_size, memory_mb) -> float:
    with FlopCounterMode(display=False) as counter:
        run_engine(model, inputs, reference, grid, engine, batch_size, memory_mb)
    return counter.get_total_flops()


def compare(name, model, inputs, levels, batch_size=32, memory_mb=64):
    grid = sparsity_grid(levels)
    reference = predict_logits(model, inputs, batch_size)
    results, seconds, peaks = {}, {}, {}
    for engine in ("naive", "fast"):
        with PeakRss() as rss:
            start = time.perf_counter()
            results[engine] = run_engine(
                model, inputs, reference, grid, engine, batch_size, memory_mb
            )
            seconds[engine] = time.perf_counter() - start
        peaks[engine] = rss.mb
    worst = 0.0
    for (mn, xn), (mf, xf) in zip(results["naive"], results["fast"], strict=True):
        for a, b in ((mn, mf), (xn, xf)):
            nz = a != 0
            worst = max(worst, float(np.max(np.abs(a - b)[nz] / np.abs(a[nz]), initial=0.0)))
            worst = max(worst, float(np.max(np.abs(b[~nz]), initial=0.0)))  # zeros stay zero
    small = inputs[: min(8, len(inputs))]
    ref_small = predict_logits(model, small, batch_size)
    fraction = flops(model, small, ref_small, grid, "fast", batch_size, memory_mb) / flops(
        model, small, ref_small, grid, "naive", batch_size, memory_mb
    )
    layers = len(prunable_numel(model))
    print(
        f"{name:<28} {layers:>6} {len(inputs):>6} {levels:>6} {seconds['naive']:>9.1f} "
        f"{seconds['fast']:>9.1f} {seconds['naive'] / seconds['fast']:>8.2f}x "
        f"{peaks['naive']:>9.0f} {peaks['fast']:>9.0f} {fraction:>9.3f} {worst:>10.1e}",
        flush=True,
    )


def cifar_resnet20(images: int):
    from torchvision import datasets, transforms

    ckpt, data = (
        SHARED / "models" / "resnet20_cifar10.th",
        SHARED / "data" / "cifar10-subset" / "train",
    )
    if not ckpt.is_file() or not data.is_dir():
        print(f"{'cifar_resnet20 (shared)':<28} skipped: {SHARED} is absent")
        return None
    model = build_model("cifar_resnet20", 3, 10)
    load_weights(
        model,
        normalize_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), str(ckpt)),
        str(ckpt),
        "cifar_resnet20",
    )
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    ds = datasets.ImageFolder(str(data), tf)
    idx = np.random.default_rng(0).choice(len(ds), size=images, replace=False)
    return model, torch.stack([ds[int(i)][0] for i in idx])


def torchvision_model(name: str, classes: int = 10):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=classes).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sets, for a smoke run")
    quick = parser.parse_args().quick
    torch.set_num_threads(THREADS)
    print(
        f"CPU, {THREADS} threads, torch {torch.__version__}; fast engine: batch 32, 64 MB per pass"
    )
    print(
        f"{'model':<28} {'layers':>6} {'images':>6} {'levels':>6} {'naive s':>9} {'fast s':>9} "
        f"{'speed-up':>9} {'naive MB':>9} {'fast MB':>9} {'FLOPs frac':>9} {'max rel diff':>10}"
    )
    gen = torch.Generator().manual_seed(0)
    loaded = cifar_resnet20(64 if quick else 256)
    if loaded is not None:
        compare("cifar_resnet20 (pretrained)", *loaded, levels=11 if quick else 41)
    for name in ("resnet18", "vgg11", "densenet121", "mobilenet_v2"):
        images = torch.randn(16 if quick else 64, 3, 32, 32, generator=gen)
        compare(f"{name} 32x32", torchvision_model(name), images, levels=6 if quick else 11)
    if not quick:
        for name in ("resnet18", "vgg11", "mobilenet_v2"):
            images = torch.randn(8, 3, 224, 224, generator=gen)
            compare(f"{name} 224x224", torchvision_model(name, 1000), images, levels=6)


if __name__ == "__main__":
    main()
