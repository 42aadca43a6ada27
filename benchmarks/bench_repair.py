"""Repair benchmark: wall time of the prune stage's repair walk (pipeline.pruning.repair) alone.

The public pretrained CIFAR ResNet-20 and the CIFAR-10 subset in ../shared (skipped, and said
so, when absent), global-magnitude masks at the given ratios, ``--images`` repair images drawn
as the prune stage draws them (seeded, evaluation transforms), the default objective, damping
and BatchNorm rule. Prints, per ratio: seconds of the walk, the layers repaired, and test
top-1 before (masks only) and after. Needs torch and torchvision alone.

Run: python benchmarks/bench_repair.py                      # CPU, 1,024 images, 80 / 90 %
     python benchmarks/bench_repair.py --device cuda --images 1024
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from pipeline.config.params import load_params
from pipeline.config.sections import DataParams
from pipeline.nn.data import calibration_subset, load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.layers import prunable_layers
from pipeline.nn.models import build_model, load_weights, normalize_state_dict
from pipeline.pruning.masking import apply_masks, magnitude_masks
from pipeline.pruning.repair import Recovery

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def global_masks(model: torch.nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold for the whole network (the ``global`` baseline)."""
    weights = {n: m.weight.detach() for n, m in prunable_layers(model)}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(ratio * flat.numel())
    threshold = torch.kthvalue(flat, k).values if k else -1.0
    kept = {n: int((w.abs() > threshold).sum()) for n, w in weights.items()}
    return magnitude_masks(model, kept)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="*", default=[0.8, 0.9])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared", type=Path, default=SHARED)
    args = p.parse_args()
    ckpt = args.shared / "models" / "resnet20_cifar10.th"
    if not ckpt.is_file():
        raise SystemExit(f"skipped: {args.shared} is absent (this benchmark needs it)")
    torch.set_num_threads(args.threads)
    defaults = load_params({}).prune
    recover = Recovery(
        defaults.bn_recalibration_mode, defaults.reconstruct, defaults.reconstruct_damping, 128
    )
    data = DataParams(
        name="imagefolder",
        root=str(args.shared / "data" / "cifar10-subset"),
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    splits = load_dataset(data)
    images, _ = calibration_subset(splits.train_eval, args.images, 2, "--images")
    dense = build_model("cifar_resnet20", 3, 10)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    load_weights(dense, normalize_state_dict(state, str(ckpt)), str(ckpt), "cifar_resnet20")
    dense = dense.to(args.device).eval()
    images = images.to(args.device)
    print(
        f"ResNet-20, {args.images} repair images, objective {recover.objective}, damping "
        f"{recover.damping}, BN {recover.bn_rule}, {args.device} "
        f"({args.threads} threads), torch {torch.__version__}"
    )
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        masks = global_masks(model, ratio)
        apply_masks(model, masks)
        before = accuracy(model, splits.test)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        report = recover(model, dense, masks, images)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(
            f"ratio {ratio}: repair {seconds:.1f} s ({len(report.layers)} layers, "
            f"{len(report.batchnorms)} BatchNorms); test top-1 {100 * before:.2f} -> "
            f"{100 * accuracy(model, splits.test):.2f} %",
            flush=True,
        )


if __name__ == "__main__":
    main()
