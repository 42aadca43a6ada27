"""Quality benchmark: one-shot top-1 of every allocation method at 50-90 % sparsity.

Runs the pipeline's own stages (baseline -> calibrate -> profile -> allocate -> prune) in a
temporary project on the CIFAR-10 subset in ../shared with the public pretrained ResNet-20.
It starts from presets/cifar10_subset_resnet20.yaml. Every method gets the same
post-processing: the prune stage's BatchNorm recalibration (prune.bn_recalibration and
prune.bn_recalibration_mode), and no fine-tuning. RD is run once per variant (the preset,
the paper's rd alone, ...); its cells show the predicted (summed) and the measured joint
output distortion on the calibration set, and the allocation chosen when it was not rd's
own. ``--seeds`` repeats everything per params seed (calibration and BN images); the last
lines give each variant's margin over the best baseline, mean over seeds, with its paired
standard error over the 1,017 test images. ``--half A|B`` draws the calibration and BN images
from one fixed random half of the training split only.

Run: python benchmarks/bench_quality.py --seeds 0 1 2   (about 25 minutes per seed on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from pipeline import io
from pipeline.batchnorm import BN_RULES
from pipeline.config import load_params
from pipeline.data import load_dataset
from pipeline.evaluation import output_distortion, predict_logits
from pipeline.stage import load_model
from stages import allocate, baseline, calibrate, profile, prune

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "cifar10_subset_resnet20.yaml"
METHODS = ("uniform", "global", "lamp", "erk", "uniform_plus")
RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
# RD variants: name -> overrides of the preset (the first is the preset itself)
PAPER = {"candidates": [], "refine": None}  # Xu et al.'s rd alone
VARIANTS = {
    "preset": {},
    "rd (paper)": {"allocate": PAPER},
    "rd + selection": {
        "allocate": {**PAPER, "candidates": ["uniform", "global", "lamp", "erk", "uniform_plus"]}
    },
    "rd + refine mse": {"allocate": {**PAPER, "refine": "mse"}},
    "rd + refine ce": {"allocate": {**PAPER, "refine": "ce"}},
    "rd, 256 calib. images": {"calibrate": {"samples": 256}, "allocate": PAPER},
    "rd, plain curves": {"profile": {"bn_correction": False}, "allocate": PAPER},
    "rd, 3 steps (21 levels)": {
        "profile": {"levels": 21},
        "allocate": {**PAPER, "steps": 3},
    },
}
DEFAULT_VARIANTS = ["preset", "rd (paper)"]
# variants that share the preset's calibration set and distortion table (no re-profiling)
SAME_TABLE = ("preset", "rd (paper)", "rd + selection", "rd + refine mse", "rd + refine ce")
BASELINE = {"allocate": PAPER}  # a baseline method alone, on the preset's setup


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def run(root: Path, params: dict, *stages) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in stages:
        if stage.main(["--root", str(root)]) != 0:
            raise SystemExit(f"stage {stage.__name__} failed")


def test_logits(root: Path, checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """(N, 10) logits of the model in ``checkpoint`` (this run's architecture) on the test set."""
    model = load_model(io.read_params(root / "params.yaml"), checkpoint, 3, 10, "checkpoint")
    return predict_logits(model, images, 256)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean accuracy difference of a over b in points with its paired standard error.

    a, b: (seeds, images) bool hits on the same test images. Per image, the difference is
    averaged over seeds; the standard error is that of the mean over images (so the seeds'
    shared test images are not counted as independent)."""
    z = (a.double() - b.double()).mean(0)
    se = float(z.std(unbiased=True)) / math.sqrt(len(z)) if len(z) > 1 else 0.0
    return 100 * float(z.mean()), 100 * se


def half_root(data_root: Path, half: str, workdir: Path) -> Path:
    """An ImageFolder root with test/ and one fixed random half (A or B) of train/ (symlinks)."""
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(data_root / "train"))
    perm = np.random.default_rng(12345).permutation(len(train.samples))
    keep = perm[: len(perm) // 2] if half == "A" else perm[len(perm) // 2 :]
    root = workdir / f"data_half_{half}"
    for c in train.classes:
        (root / "train" / c).mkdir(parents=True)
    for i in sorted(keep.tolist()):
        src = Path(train.samples[i][0])
        (root / "train" / src.parent.name / src.name).symlink_to(src)
    (root / "test").symlink_to(data_root / "test")
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument(
        "--variants", nargs="*", default=DEFAULT_VARIANTS, help=f"of {list(VARIANTS)}"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the baseline methods")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0], help="params seeds (calibration, BN images)"
    )
    parser.add_argument(
        "--half", choices=["A", "B"], default=None, help="draw from one half of train/ only"
    )
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument(
        "--device", default=None, help="device param (cuda: serial backend, GPU-sized passes)"
    )
    parser.add_argument(
        "--bn-mode", choices=sorted(BN_RULES), default=None, help="prune.bn_recalibration_mode"
    )
    args = parser.parse_args()
    ratios, seeds = args.ratios, args.seeds
    variants = {name: VARIANTS[name] for name in args.variants}
    methods = () if args.no_baselines else METHODS
    if not (args.shared / "models" / "resnet20_cifar10.th").is_file():
        raise SystemExit(f"skipped: {args.shared} is absent (this benchmark needs it)")
    base = yaml.safe_load(PRESET.read_text())
    base["model"]["checkpoint"] = str((args.shared / "models" / "resnet20_cifar10.th").resolve())
    base["data"]["root"] = str((args.shared / "data" / "cifar10-subset").resolve())
    if args.device is not None:  # in process on one device: no Ray needed
        base["device"] = args.device
        base["ray"]["backend"] = "serial"
        if args.device.startswith("cuda"):
            base["profile"].update(batch_size=128, memory_mb=1024)
    if args.bn_mode is not None:  # every method, the curves' correction included
        base["prune"]["bn_recalibration_mode"] = args.bn_mode
    started = time.perf_counter()
    rows: dict[str, dict[tuple[int, float], str]] = {}
    fidelity: dict[str, dict[tuple[int, float], str]] = {}  # agreement with the dense model
    hits: dict[str, dict[tuple[int, float], torch.Tensor]] = {}
    test = load_dataset(load_params(base).data).test
    images, labels = map(
        torch.cat, zip(*[(a, b) for a, b in DataLoader(test, batch_size=256)], strict=True)
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    if args.half is not None:
        base["data"]["root"] = str(half_root(Path(base["data"]["root"]), args.half, workdir))

    def prune_at(name: str, params: dict, method: str, seed: int, ratio: float) -> dict:
        run(
            root,
            merged(params, {"allocate": {"method": method}, "prune": {"ratio": ratio}}),
            allocate,
            prune,
        )
        logits = test_logits(root, io.Paths(root).pruned, images)
        hits.setdefault(name, {})[seed, ratio] = logits.argmax(1) == labels
        agree = float((logits.argmax(1) == dense_logits.argmax(1)).float().mean())
        mse = output_distortion(logits, dense_logits)[0]
        fidelity.setdefault(name, {})[seed, ratio] = f"{100 * agree:5.1f} / {mse:5.2f}"
        return io.read_metrics(io.Paths(root).metrics("prune"))

    try:
        root = workdir / "project"
        root.mkdir()
        run(root, base, baseline)
        dense_logits = test_logits(root, io.Paths(root).baseline, images)
        for seed in seeds:
            profiled = None  # the overrides of the last profiled variant's table
            for variant, overrides in variants.items():
                params = merged({**base, "seed": seed}, overrides)
                table = {k: params[k] for k in ("calibrate", "profile")}
                if variant not in SAME_TABLE or profiled != table:
                    run(root, params, calibrate, profile)
                    profiled = table if variant in SAME_TABLE else None
                rows.setdefault(variant, {})
                for ratio in ratios:
                    m = prune_at(variant, params, "rd", seed, ratio)
                    chosen = io.read_table_metadata(io.Paths(root).allocation)["rdprune.selected"]
                    rows[variant][seed, ratio] = (
                        f"{100 * m['accuracy']:5.1f} "
                        f"({m['predicted_distortion']:.3g}/{m['measured_distortion']:.3g})"
                        + ("" if chosen == "rd" else f" [{chosen}]")
                    )
            if methods and profiled != {k: base[k] for k in ("calibrate", "profile")}:
                run(root, {**base, "seed": seed}, calibrate, profile)
            for method in methods:  # the preset's calibration set and table
                rows.setdefault(method, {})
                for ratio in ratios:
                    params = merged({**base, "seed": seed}, BASELINE)
                    m = prune_at(method, params, method, seed, ratio)
                    rows[method][seed, ratio] = f"{100 * m['accuracy']:5.1f}"
        dense = io.read_metrics(io.Paths(root).metrics("calibrate"))["dense_accuracy"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    where = "" if args.half is None else f", calibration and BN images from half {args.half}"
    print(
        f"CIFAR-10 subset, pretrained ResNet-20 (dense {100 * dense:.2f} %), one-shot top-1 % "
        "after BN recalibration, no fine-tuning; rd cells: accuracy (predicted/measured "
        f"distortion) [the allocation chosen when not rd's own]{where}"
    )
    for seed in seeds:
        print(f"\nseed {seed}")
        print(f"{'method':<26}" + "".join(f"{int(round(r * 100)):>33}%" for r in ratios))
        for name, cells in rows.items():
            print(f"{name:<26}" + "".join(f"{cells[seed, r]:>34}" for r in ratios))
    acc = {
        name: {r: torch.stack([h[s, r] for s in seeds]).float().mean().item() for r in ratios}
        for name, h in hits.items()
    }
    print(f"\nmean over seeds {seeds}")
    print(f"{'method':<26}" + "".join(f"{int(round(r * 100)):>8}%" for r in ratios))
    for name in hits:
        print(f"{name:<26}" + "".join(f"{100 * acc[name][r]:9.2f}" for r in ratios))
    if not methods:
        print(f"wall time {time.perf_counter() - started:.0f} s")
        return
    print(
        "\nfidelity to the dense model on the test images: top-1 agreement % / logit MSE "
        "(what RD minimises, measured on images it never saw)"
    )
    for seed in seeds:
        for name, cells in fidelity.items():
            print(f"{name:<20} s{seed:<4}" + "".join(f"{cells[seed, r]:>16}" for r in ratios))
    best = {r: max(methods, key=lambda m: acc[m][r]) for r in ratios}
    print(
        "minus the best baseline (by mean accuracy) at each ratio, in points, mean over seeds "
        "(± paired standard error over the test images):"
    )
    for variant in variants:
        cells = []
        for r in ratios:
            a = torch.stack([hits[variant][s, r] for s in seeds])
            b = torch.stack([hits[best[r]][s, r] for s in seeds])
            diff, se = paired(a, b)
            cells.append(f"{diff:+.2f} ± {se:.2f} vs {best[r]}")
        print(f"  {variant:<26}" + "; ".join(cells))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
