"""Quality benchmark: one-shot top-1 of every allocation method at 50-90 % sparsity, with and
without the repair of the kept weights.

Runs the pipeline's own stages (baseline -> calibrate -> profile -> allocate -> prune) in a
temporary project on the CIFAR-10 subset in ../shared with the public pretrained ResNet-20.
It starts from presets/cifar10_subset_resnet20.yaml. Every method gets the same
post-processing per row: the prune stage's recovery, i.e. the repair (prune.reconstruct,
BatchNorm statistics set on the way) in "+ repair" rows and the BatchNorm recalibration alone
(prune.bn_recalibration_mode) in the others, and no fine-tuning. RD is run once per variant
(the preset, the paper's rd alone, ...); its cells show the predicted (summed) and the
measured joint output distortion on the calibration set, and the allocation chosen when it
was not rd's own. ``--seeds`` repeats everything per params seed (calibration, BN and repair
images); the last lines give each variant's margin over the best baseline of the same kind
(with or without repair), mean over seeds, with its paired standard error over the 1,017
test images, and each stage's mean wall time. ``--half A|B`` draws the images from one fixed
random half of the training split only.

Run: python benchmarks/bench_quality.py --seeds 0 1 2   (about 1 hour per seed on 2 cores)
     python benchmarks/bench_quality.py --seeds 1 --ratios 0.7 0.8 0.9 --results DIR
         (about 35 minutes; a later run naming DIR and the same settings reads seed 1 back)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from pipeline.config.params import load_params
from pipeline.edges import io, params_file
from pipeline.edges.stage import load_model
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import output_distortion, predict_logits
from pipeline.pruning.batchnorm import BN_RULES
from stages import allocate, baseline, calibrate, profile, prune

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "cifar10_subset_resnet20.yaml"
METHODS = ("uniform", "global", "lamp", "erk", "uniform_plus")
RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
# RD variants: name -> overrides of the preset (the first is the preset itself)
PAPER = {"candidates": [], "refine": None}  # Xu et al.'s rd alone
NO_REPAIR = {"prune": {"reconstruct": None}, "profile": {"reconstruct": False}}
VARIANTS = {
    "preset": {},
    "rd + repair": {"allocate": PAPER},
    "rd + repair, plain curves": {"allocate": PAPER, "profile": {"reconstruct": False}},
    "rd + repair layerwise": {"allocate": PAPER, "prune": {"reconstruct": "layerwise"}},
    "rd (paper)": {"allocate": PAPER, **NO_REPAIR},
    "rd + selection": {
        "allocate": {**PAPER, "candidates": ["uniform", "global", "lamp", "erk", "uniform_plus"]}
    },
    "rd + refine mse": {"allocate": {**PAPER, "refine": "mse"}, **NO_REPAIR},
    "rd + refine ce": {"allocate": {**PAPER, "refine": "ce"}, **NO_REPAIR},
    "rd, 256 calib. images": {"calibrate": {"samples": 256}, "allocate": PAPER},
    "rd, no BN-corrected curves": {
        "profile": {"bn_correction": False, "reconstruct": False},
        "allocate": PAPER,
        "prune": {"reconstruct": None},
    },
    "rd, 3 steps (21 levels)": {
        "profile": {"levels": 21},
        "allocate": {**PAPER, "steps": 3},
    },
}
DEFAULT_VARIANTS = ["rd + repair", "rd + repair, plain curves", "rd (paper)"]
# the baselines' rows: name suffix -> overrides of the preset (the same table as rd's)
BASELINE_KINDS = {" + repair": {"allocate": PAPER}, "": {"allocate": PAPER, **NO_REPAIR}}


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
    model = load_model(
        params_file.read_params(root / "params.yaml"), checkpoint, 3, 10, "checkpoint"
    )
    return predict_logits(model, images, 256)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean accuracy difference of a over b in points with its paired standard error.

    a, b: (seeds, images) bool hits on the same test images. Per image, the difference is
    averaged over seeds; the standard error is that of the mean over images (so the seeds'
    shared test images are not counted as independent)."""
    z = (a.double() - b.double()).mean(0)
    se = float(z.std(unbiased=True)) / math.sqrt(len(z)) if len(z) > 1 else 0.0
    return 100 * float(z.mean()), 100 * se


def _seed_file(folder: Path, seed: int) -> Path:
    return folder / f"seed{seed}.json"


def save_seed(folder, settings, seed, rows, fidelity, hits, seconds) -> None:
    """Write one seed's cells, hits (as 0/1 strings over the test images) and stage times."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)

    def of(table: dict) -> dict:
        return {n: {str(r): v for (s, r), v in c.items() if s == seed} for n, c in table.items()}

    hit_strings = {
        n: {str(r): "".join("1" if x else "0" for x in v.tolist()) for r, v in c.items()}
        for n, c in of(hits).items()
    }
    record = {
        "settings": settings,
        "rows": of(rows),
        "fidelity": of(fidelity),
        "hits": hit_strings,
        "seconds": seconds,
    }
    _seed_file(folder, seed).write_text(json.dumps(record))


def load_seed(folder, settings, seed, rows, fidelity, hits, seconds) -> bool:
    """Fill the tables with a saved seed's results; False when none saved with these settings."""
    if folder is None or not _seed_file(folder, seed).is_file():
        return False
    record = json.loads(_seed_file(folder, seed).read_text())
    if record["settings"] != settings:
        print(f"  seed {seed}: {folder} holds other settings; rerun", flush=True)
        return False
    for table, saved in ((rows, record["rows"]), (fidelity, record["fidelity"])):
        for name, cells in saved.items():
            table.setdefault(name, {}).update({(seed, float(r)): v for r, v in cells.items()})
    for name, cells in record["hits"].items():
        hits.setdefault(name, {}).update(
            {(seed, float(r)): torch.tensor([c == "1" for c in v]) for r, v in cells.items()}
        )
    for label, times in record["seconds"].items():
        seconds.setdefault(label, []).extend(times)
    return True


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
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder of per-seed results: a seed found there with the same settings is read, "
        "not rerun (so seeds can run in separate processes and be combined)",
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
    settings = {  # what a saved seed's results depend on besides the code
        "ratios": ratios,
        "variants": list(variants),
        "methods": list(methods),
        "half": args.half,
        "device": args.device,
        "bn_mode": args.bn_mode,
    }
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

    seconds: dict[str, list[float]] = {}  # stage (and kind) -> wall times

    def timed(params: dict, *stages) -> None:
        run(root, params, *stages)
        repaired = params["prune"]["reconstruct"] is not None
        for stage in stages:
            name = stage.__name__.rpartition(".")[2]
            kind = {"profile": params["profile"]["reconstruct"], "prune": repaired}.get(name)
            label = name + {True: " (repair)", False: " (no repair)", None: ""}[kind]
            t = io.read_metrics(io.Paths(root).timing(name))["seconds"]
            seconds.setdefault(label, []).append(t)

    tables: dict[str, Path] = {}  # what the table depends on -> a saved copy

    def table_for(params: dict) -> None:
        """Profile unless a table of the same calibration and profile params is saved."""
        prune_keys = ("bn_recalibration", "bn_recalibration_mode", "reconstruct_damping")
        key = json.dumps(
            [
                params["seed"],
                params["calibrate"],
                params["profile"],
                [params["prune"][k] for k in prune_keys],  # what the profile stage reads
            ],
            sort_keys=True,
        )
        paths = io.Paths(root)
        if key in tables:
            for f in (paths.calibration, paths.distortion):
                shutil.copy(tables[key] / f.name, f)
            return
        timed(params, calibrate, profile)
        tables[key] = workdir / f"table_{len(tables)}"
        tables[key].mkdir()
        for f in (paths.calibration, paths.distortion):
            shutil.copy(f, tables[key] / f.name)

    def prune_at(name: str, params: dict, method: str, seed: int, ratio: float) -> dict:
        timed(
            merged(params, {"allocate": {"method": method}, "prune": {"ratio": ratio}}),
            allocate,
            prune,
        )
        logits = test_logits(root, io.Paths(root).pruned, images)
        hits.setdefault(name, {})[seed, ratio] = logits.argmax(1) == labels
        agree = float((logits.argmax(1) == dense_logits.argmax(1)).float().mean())
        mse = output_distortion(logits, dense_logits)[0]
        fidelity.setdefault(name, {})[seed, ratio] = f"{100 * agree:5.1f} / {mse:5.2f}"
        metrics = io.read_metrics(io.Paths(root).metrics("prune"))
        print(f"  seed {seed} {name} {ratio}: {100 * metrics['accuracy']:.2f}", flush=True)
        return metrics

    try:
        root = workdir / "project"
        root.mkdir()
        run(root, base, baseline)
        dense_logits = test_logits(root, io.Paths(root).baseline, images)
        for seed in seeds:
            if load_seed(args.results, settings, seed, rows, fidelity, hits, seconds):
                print(f"  seed {seed}: read from {args.results}", flush=True)
                continue
            mark = {label: len(times) for label, times in seconds.items()}
            for variant, overrides in variants.items():
                params = merged({**base, "seed": seed}, overrides)
                table_for(params)
                rows.setdefault(variant, {})
                for ratio in ratios:
                    m = prune_at(variant, params, "rd", seed, ratio)
                    chosen = tables.read_table_metadata(io.Paths(root).allocation)[
                        "rdprune.selected"
                    ]
                    rows[variant][seed, ratio] = (
                        f"{100 * m['accuracy']:5.1f} "
                        f"({m['predicted_distortion']:.3g}/{m['measured_distortion']:.3g})"
                        + ("" if chosen == "rd" else f" [{chosen}]")
                    )
            for suffix, overrides in BASELINE_KINDS.items():
                params = merged({**base, "seed": seed}, overrides)
                table_for(params)  # the baselines read no curves: any table of this seed
                for method in methods:
                    rows.setdefault(method + suffix, {})
                    for ratio in ratios:
                        m = prune_at(method + suffix, params, method, seed, ratio)
                        rows[method + suffix][seed, ratio] = f"{100 * m['accuracy']:5.1f}"
            this_seed = {k: v[mark.get(k, 0) :] for k, v in seconds.items()}
            save_seed(args.results, settings, seed, rows, fidelity, hits, this_seed)
        dense = float((dense_logits.argmax(1) == labels).float().mean())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    where = "" if args.half is None else f", images from half {args.half} of train/"
    print(
        f"CIFAR-10 subset, pretrained ResNet-20 (dense {100 * dense:.2f} %), one-shot top-1 % "
        "after the prune stage's recovery (repair rows: prune.reconstruct with BatchNorm set "
        "during the repair; others: BN recalibration), no fine-tuning; rd cells: accuracy "
        f"(predicted/measured distortion) [the allocation chosen when not rd's own]{where}"
    )
    for seed in seeds:
        print(f"\nseed {seed}")
        print(f"{'method':<28}" + "".join(f"{int(round(r * 100)):>33}%" for r in ratios))
        for name, cells in rows.items():
            print(f"{name:<28}" + "".join(f"{cells[seed, r]:>34}" for r in ratios))
    acc = {
        name: {r: torch.stack([h[s, r] for s in seeds]).float().mean().item() for r in ratios}
        for name, h in hits.items()
    }
    print(f"\nmean over seeds {seeds}")
    print(f"{'method':<28}" + "".join(f"{int(round(r * 100)):>8}%" for r in ratios))
    for name in hits:
        print(f"{name:<28}" + "".join(f"{100 * acc[name][r]:9.2f}" for r in ratios))
    print(
        "\nmean wall time per stage run (s): "
        + ", ".join(f"{k} {np.mean(v):.1f} (x{len(v)})" for k, v in sorted(seconds.items()))
    )
    if not methods:
        print(f"wall time {time.perf_counter() - started:.0f} s")
        return
    print(
        "\nfidelity to the dense model on the test images: top-1 agreement % / logit MSE "
        "(what RD minimises, measured on images it never saw)"
    )
    for seed in seeds:
        for name, cells in fidelity.items():
            print(f"{name:<28} s{seed:<4}" + "".join(f"{cells[seed, r]:>16}" for r in ratios))

    def margins(title: str, rivals: list[str], names: list[str]) -> None:
        best = {r: max(rivals, key=lambda m: acc[m][r]) for r in ratios}
        print(f"\n{title}, in points, mean over seeds (± paired SE over the test images):")
        for name in names:
            cells = []
            for r in ratios:
                a = torch.stack([hits[name][s, r] for s in seeds])
                b = torch.stack([hits[best[r]][s, r] for s in seeds])
                diff, se = paired(a, b)
                cells.append(f"{diff:+.2f} ± {se:.2f} vs {best[r]}")
            print(f"  {name:<28}" + "; ".join(cells))

    repaired = [v for v in variants if merged(base, variants[v])["prune"]["reconstruct"]]
    plain = [v for v in variants if v not in repaired]
    with_repair = [m + " + repair" for m in methods]
    margins("minus the best baseline with the same repair", with_repair, repaired)
    margins("minus the best baseline without repair", list(methods), plain)
    margins(
        "minus the best method without repair (any baseline, and rd variants without it)",
        list(methods) + plain,
        repaired,
    )
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
