"""Quality benchmark: one-shot top-1 of every allocation method at 50-90 % sparsity.

Runs the pipeline's own stages (baseline -> calibrate -> profile -> allocate -> prune) in a
temporary project on the CIFAR-10 subset in ../shared with the public pretrained ResNet-20.
It starts from presets/cifar10_subset_resnet20.yaml. Every method gets the same
post-processing: the prune stage's BatchNorm recalibration (prune.bn_recalibration and
prune.bn_recalibration_mode), and no fine-tuning. RD is run once per variant; its cells show
the predicted (summed) and the measured joint output distortion on the calibration set, and
the candidate measured selection picked when it was not RD's own allocation. The last lines
give each RD variant's margin over the best baseline with its paired standard error over
the 1,017 test images.

Run: python benchmarks/bench_quality.py   (about 25 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
import time
from pathlib import Path

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
VARIANTS = {
    "rd + selection (preset)": {},
    "rd, 256 calib. images": {"calibrate": {"size": 256}, "allocate": {"candidates": []}},
    "rd, plain curves": {"profile": {"bn_correction": False}, "allocate": {"candidates": []}},
    "rd, 3 steps (21 levels)": {
        "profile": {"levels": 21},
        "allocate": {"steps": 3, "candidates": []},
    },
}
DEFAULT_VARIANTS = list(VARIANTS)[:3]  # progressive steps re-profile: +25 minutes
BASELINE = {"allocate": {"candidates": []}}  # a baseline method alone, on the preset's setup


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


def paired(a: torch.Tensor, b: torch.Tensor) -> str:
    """Accuracy difference of a over b in points, with its paired standard error."""
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = 100 * (only_a - only_b) / n
    se = 100 * math.sqrt(only_a + only_b - (only_a - only_b) ** 2 / n) / n
    return f"{diff:+.1f} ± {se:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument(
        "--variants", nargs="*", default=DEFAULT_VARIANTS, help=f"of {list(VARIANTS)}"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the baseline methods")
    parser.add_argument(
        "--seed", type=int, default=None, help="params seed (calibration and BN images)"
    )
    parser.add_argument(
        "--bn-mode", choices=sorted(BN_RULES), default=None, help="prune.bn_recalibration_mode"
    )
    args = parser.parse_args()
    ratios = args.ratios
    variants = {name: VARIANTS[name] for name in args.variants}
    methods = () if args.no_baselines else METHODS
    if not (REPO.parent / "shared" / "models" / "resnet20_cifar10.th").is_file():
        raise SystemExit(f"skipped: {REPO.parent / 'shared'} is absent (this benchmark needs it)")
    base = yaml.safe_load(PRESET.read_text())
    for section, key in (("model", "checkpoint"), ("data", "root")):
        base[section][key] = str((REPO / base[section][key]).resolve())
    if args.seed is not None:
        base["seed"] = args.seed
    if args.bn_mode is not None:  # every method, the curves' correction included
        base["prune"]["bn_recalibration_mode"] = args.bn_mode
    base["mlflow"]["tracking_uri"] = "sqlite:///:memory:"  # no run is logged: no finetune stage
    started = time.perf_counter()
    rows: dict[str, dict[float, str]] = {}
    fidelity: dict[str, dict[float, str]] = {}  # agreement with the dense model, test MSE
    hits: dict[str, dict[float, torch.Tensor]] = {}
    test = load_dataset(load_params(base).data).test
    images, labels = map(
        torch.cat, zip(*[(a, b) for a, b in DataLoader(test, batch_size=256)], strict=True)
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench_quality_"))

    def prune_at(name: str, params: dict, method: str, ratio: float) -> dict:
        run(
            root,
            merged(params, {"allocate": {"method": method}, "prune": {"ratio": ratio}}),
            allocate,
            prune,
        )
        logits = test_logits(root, io.Paths(root).pruned, images)
        hits.setdefault(name, {})[ratio] = logits.argmax(1) == labels
        agree = float((logits.argmax(1) == dense_logits.argmax(1)).float().mean())
        mse = output_distortion(logits, dense_logits)[0]
        fidelity.setdefault(name, {})[ratio] = f"{100 * agree:5.1f} / {mse:5.2f}"
        return io.read_metrics(io.Paths(root).metrics("prune"))

    try:
        root = workdir / "project"
        root.mkdir()
        run(root, base, baseline)
        dense_logits = test_logits(root, io.Paths(root).baseline, images)
        for i, (variant, overrides) in enumerate(variants.items()):
            params = merged(base, overrides)
            run(root, params, calibrate, profile)
            rows[variant] = {}
            for ratio in ratios:
                m = prune_at(variant, params, "rd", ratio)
                chosen = io.read_table_metadata(io.Paths(root).allocation)["rdprune.selected"]
                rows[variant][ratio] = (
                    f"{100 * m['accuracy']:5.1f} "
                    f"({m['predicted_distortion']:.3g}/{m['measured_distortion']:.3g})"
                    + ("" if chosen == "rd" else f" [{chosen}]")
                )
            if i == 0:  # the baselines need the preset's calibration set and table only
                for method in methods:
                    rows[method] = {}
                    for ratio in ratios:
                        m = prune_at(method, merged(params, BASELINE), method, ratio)
                        rows[method][ratio] = f"{100 * m['accuracy']:5.1f}"
        dense = io.read_metrics(io.Paths(root).metrics("calibrate"))["dense_accuracy"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"CIFAR-10 subset, pretrained ResNet-20 (dense {100 * dense:.2f} %), one-shot top-1 % "
        "after BN recalibration, no fine-tuning; rd cells: accuracy (predicted/measured distortion)"
    )
    print(f"{'method':<26}" + "".join(f"{int(round(r * 100)):>29}%" for r in ratios))
    for name, cells in rows.items():
        print(f"{name:<26}" + "".join(f"{cells[r]:>30}" for r in ratios))
    if not methods:
        print(f"wall time {time.perf_counter() - started:.0f} s")
        return
    print(
        "\nfidelity to the dense model on the test images: top-1 agreement % / logit MSE "
        "(what RD minimises, measured on images it never saw)"
    )
    for name, cells in fidelity.items():
        print(f"{name:<26}" + "".join(f"{cells[r]:>30}" for r in ratios))
    best = {r: max(methods, key=lambda m: float(rows[m][r])) for r in ratios}
    print("minus the best baseline at each ratio, in points (± paired standard error):")
    for variant in variants:
        cells = [f"{paired(hits[variant][r], hits[best[r]][r])} vs {best[r]}" for r in ratios]
        print(f"  {variant:<26}" + "; ".join(cells))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
