"""Quality benchmark: one-shot top-1 of every allocation method at 50-90 % sparsity.

Runs the pipeline's own stages (baseline -> calibrate -> profile -> allocate -> prune) in a
temporary project on the CIFAR-10 subset in ../shared with the public pretrained ResNet-20.
It starts from presets/cifar10_subset_resnet20.yaml. Every method gets the same
post-processing: the prune stage's BatchNorm recalibration (prune.bn_recalibration), and no
fine-tuning. RD is run once per profiling variant. For RD, each row also shows the predicted
(summed) against the measured joint output distortion on the calibration set.

Run: python benchmarks/bench_quality.py   (about 20 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import io
from stages import allocate, baseline, calibrate, profile, prune

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "cifar10_subset_resnet20.yaml"
METHODS = ("uniform", "global", "lamp", "erk", "uniform_plus")
RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
# RD profiling variants: name -> overrides of the preset
VARIANTS = {
    "rd (bn-corrected curves)": {"profile": {"bn_correction": True}},
    "rd (plain curves)": {"profile": {"bn_correction": False}},
    "rd (bn-corr., 3 steps)": {
        "profile": {"bn_correction": True, "levels": 21},
        "allocate": {"steps": 3},
    },
    "rd (bn-corr., max curves)": {
        "profile": {"bn_correction": True},
        "allocate": {"distortion": "max"},
    },
    "rd (bn-corr., 101 levels)": {"profile": {"bn_correction": True, "levels": 101}},
    "rd + measured selection": {
        "profile": {"bn_correction": True},
        "allocate": {"candidates": list(METHODS)},
    },
}


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="rd variants to run")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baseline methods")
    args = parser.parse_args()
    ratios = args.ratios
    variants = {name: VARIANTS[name] for name in args.variants}
    methods = () if args.no_baselines else METHODS
    if not (REPO.parent / "shared" / "models" / "resnet20_cifar10.th").is_file():
        raise SystemExit(f"skipped: {REPO.parent / 'shared'} is absent (this benchmark needs it)")
    base = yaml.safe_load(PRESET.read_text())
    for section, key in (("model", "checkpoint"), ("data", "root")):
        base[section][key] = str((REPO / base[section][key]).resolve())
    base["mlflow"]["tracking_uri"] = "sqlite:///:memory:"  # no run is logged: no finetune stage
    started = time.perf_counter()
    rows: dict[str, dict[float, str]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    try:
        root = workdir / "project"
        root.mkdir()
        run(root, base, baseline, calibrate)
        dense = io.read_metrics(io.Paths(root).metrics("calibrate"))["dense_accuracy"]
        for variant, overrides in variants.items():
            params = merged(base, overrides)
            run(root, params, profile)
            rows[variant] = {}
            for ratio in ratios:
                run(
                    root,
                    merged(params, {"allocate": {"method": "rd"}, "prune": {"ratio": ratio}}),
                    allocate,
                    prune,
                )
                m = io.read_metrics(io.Paths(root).metrics("prune"))
                rows[variant][ratio] = (
                    f"{100 * m['accuracy']:5.1f} "
                    f"({m['predicted_distortion']:.3g}/{m['measured_distortion']:.3g})"
                )
            if variant == next(iter(variants)):  # the baselines need only one profile table
                for method in methods:
                    rows[method] = {}
                    for ratio in ratios:
                        run(
                            root,
                            merged(
                                params, {"allocate": {"method": method}, "prune": {"ratio": ratio}}
                            ),
                            allocate,
                            prune,
                        )
                        m = io.read_metrics(io.Paths(root).metrics("prune"))
                        rows[method][ratio] = f"{100 * m['accuracy']:5.1f}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"CIFAR-10 subset, pretrained ResNet-20 (dense {100 * dense:.2f} %), one-shot top-1 % "
        "after BN recalibration, no fine-tuning; rd cells: accuracy (predicted/measured distortion)"
    )
    print(f"{'method':<26}" + "".join(f"{int(round(r * 100)):>24}%" for r in ratios))
    for name, cells in rows.items():
        print(f"{name:<26}" + "".join(f"{cells[r]:>25}" for r in ratios))
    if not methods:
        print(f"wall time {time.perf_counter() - started:.0f} s")
        return
    best = {r: max(float(rows[m][r]) for m in methods) for r in ratios}
    for variant in variants:
        margin = [float(rows[variant][r].split()[0]) - best[r] for r in ratios]
        print(f"{variant} minus best baseline: " + ", ".join(f"{x:+.1f}" for x in margin))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
