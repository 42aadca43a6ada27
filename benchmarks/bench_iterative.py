"""Iterative benchmark: the paper's protocol on the CIFAR-10 subset and public ResNet-20.

Every round removes ``--amount`` (20 %) of the weights still left and retrains ``--epochs``
(2) epochs of masked SGD on the 5,085 training images, the same recipe and the same BatchNorm
recalibration for every method (schedule.*, finetune.*, prune.bn_recalibration* of the
preset). Each (method, seed) runs the pipeline's own stages, baseline -> calibrate ->
schedule, in a temporary project of its own, several at once (``--jobs``). No Ray, DVC or
MLflow is needed: the stages run in process on the serial backend.

Prints, per round, the mean accuracy over seeds of every method against the sparsity
reached; at the report rounds (14: 95.6 %, 20: 98.85 %) each variant minus each other with
the paired standard error over the 1,017 test images (mean over seeds: the differences and
their variances averaged); and the wall time per round split into profile / allocate /
prune / retrain.

Run on a GPU (about 5 min on one H100 with --jobs 10):
  python benchmarks/bench_iterative.py --device cuda --jobs 10 --save results.jsonl
On 2 CPU cores one (method, seed) of 20 rounds takes about an hour; try --rounds 3 first.
Print saved results again: python benchmarks/bench_iterative.py --load results.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "cifar10_subset_resnet20.yaml"
# variant -> overrides of the preset (every variant: allocate.candidates [] unless given)
VARIANTS = {
    "rd": {"allocate": {"method": "rd"}},
    "rd_select": {"allocate": {"method": "rd", "candidates": ["global", "lamp", "erk", "uniform"]}},
    "lamp": {"allocate": {"method": "lamp"}},
    "global": {"allocate": {"method": "global"}},
    "uniform": {"allocate": {"method": "uniform"}},
    "erk": {"allocate": {"method": "erk"}},
}


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in overrides.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def job_params(args: argparse.Namespace, variant: str, seed: int) -> dict:
    import yaml

    base = yaml.safe_load(PRESET.read_text())
    shared = Path(args.shared).resolve()
    base["model"]["checkpoint"] = str(shared / "models" / "resnet20_cifar10.th")
    base["data"]["root"] = str(shared / "data" / "cifar10-subset")
    common = {
        "seed": seed,
        "device": args.device,
        "allocate": {"candidates": []},
        "schedule": {"rounds": args.rounds, "amount": args.amount, "epochs": args.epochs},
        "ray": {"backend": "serial"},
        "track": {"tracking_uri": None},
    }
    if args.device.startswith("cuda"):  # bigger passes: same curves up to float rounding
        common["profile"] = {"batch_size": 128, "memory_mb": 1024}
    if args.levels:
        common.setdefault("profile", {})["levels"] = args.levels
    if args.calibration_samples:
        common["calibrate"] = {"samples": args.calibration_samples}
    return merged(merged(base, common), VARIANTS[variant])


def run_job(job: tuple[argparse.Namespace, str, int]) -> dict:
    """One (variant, seed): the stages in a temporary project; returns round metrics, wall
    times and the test-set hits (a '0'/'1' string) of every round's model."""
    args, variant, seed = job
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from pipeline.edges import io, params_file
    from pipeline.edges.stage import load_model
    from pipeline.nn.data import load_dataset
    from pipeline.nn.evaluation import predict_logits
    from stages import baseline, calibrate, schedule

    params = job_params(args, variant, seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"iter_{variant}_{seed}_") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in (baseline, calibrate, schedule):
            if stage.main(["--root", str(root)]) != 0:
                raise SystemExit(f"{variant} seed {seed}: stage {stage.__name__} failed")
        paths = io.Paths(root)
        p = params_file.read_params(paths.params)
        test = load_dataset(p.data).test
        images = torch.stack([test[i][0] for i in range(len(test))])
        labels = torch.tensor([test[i][1] for i in range(len(test))])
        entries = io.read_json(paths.metrics("rounds"))
        hits = {}
        for entry in entries:
            k = entry["round"]
            model = load_model(p, paths.round(k) / "model.pt", 3, 10, "round checkpoint")
            right = predict_logits(model, images.to(next(model.parameters()).device), 256)
            right = (right.argmax(1).cpu() == labels).tolist()
            hits[str(k)] = "".join("1" if h else "0" for h in right)
        seconds = io.read_json(paths.timing("schedule_rounds"))
    result = {
        "variant": variant,
        "seed": seed,
        "rounds": entries,
        "seconds": seconds,
        "hits": hits,
        "wall": time.perf_counter() - started,
    }
    if args.save:  # one line per finished job: what finished survives a cut-off run
        import fcntl

        with open(args.save, "a") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(json.dumps(result) + "\n")
    return result


def paired(a: str, b: str) -> tuple[float, float]:
    """(accuracy of a minus b in points, its paired standard error) over the test images."""
    n = len(a)
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    diff = 100 * (only_a - only_b) / n
    se = 100 * math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    return diff, se


def report(results: list[dict], report_rounds: list[int]) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    by = {(r["variant"], r["seed"]): r for r in results}
    rounds = max(len(r["rounds"]) for r in results)
    print(
        f"accuracy % after each round's retraining, mean over seeds {seeds} "
        "(sparsity reached, % of prunable weights)"
    )
    print(f"{'round':>5} {'sparsity':>9}" + "".join(f"{v:>11}" for v in variants))
    for k in range(1, rounds + 1):
        cells, sparsity = [], []
        for v in variants:
            accs = [
                by[(v, s)]["rounds"][k - 1]["accuracy"]
                for s in seeds
                if (v, s) in by and len(by[(v, s)]["rounds"]) >= k
            ]
            sparsity += [
                by[(v, s)]["rounds"][k - 1]["sparsity"]
                for s in seeds
                if (v, s) in by and len(by[(v, s)]["rounds"]) >= k
            ]
            cells.append(f"{100 * sum(accs) / len(accs):11.2f}" if accs else f"{'-':>11}")
        print(f"{k:>5} {100 * sum(sparsity) / len(sparsity):9.2f}" + "".join(cells))
    for k in report_rounds:
        if k > rounds:
            continue
        print(f"\nround {k}: row minus column, points ± paired SE (mean over seeds)")
        print(f"{'':>11}" + "".join(f"{v:>16}" for v in variants))
        for a in variants:
            cells = []
            for b in variants:
                pairs = [
                    paired(by[(a, s)]["hits"][str(k)], by[(b, s)]["hits"][str(k)])
                    for s in seeds
                    if (a, s) in by and (b, s) in by
                ]
                if a == b or not pairs:
                    cells.append(f"{'':>16}")
                    continue
                diff = sum(d for d, _ in pairs) / len(pairs)
                se = math.sqrt(sum(e * e for _, e in pairs)) / len(pairs)
                cells.append(f"{diff:+8.2f} ± {se:4.2f}")
            print(f"{a:>11}" + "".join(cells))
    print("\nwall time per round, mean over rounds and seeds, seconds")
    steps = ("profile", "allocate", "prune", "retrain")
    print(f"{'variant':>11}" + "".join(f"{s:>10}" for s in steps) + f"{'job total':>11}")
    for v in variants:
        rows = [x for s in seeds if (v, s) in by for x in by[(v, s)]["seconds"]]
        walls = [by[(v, s)]["wall"] for s in seeds if (v, s) in by]
        if not rows:
            continue
        print(
            f"{v:>11}"
            + "".join(f"{sum(x[s] for x in rows) / len(rows):10.2f}" for s in steps)
            + f"{sum(walls) / len(walls):11.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="rd,lamp,global,uniform,erk")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--amount", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--levels", type=int, default=0, help="profile.levels (0: preset's)")
    parser.add_argument("--calibration-samples", type=int, default=0, help="0: preset's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="(variant, seed) runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--report-rounds", default="14,20")
    parser.add_argument("--save", help="append each finished job's raw results (JSON lines)")
    parser.add_argument("--load", nargs="*", help="print saved results instead of running")
    args = parser.parse_args()
    report_rounds = [int(k) for k in args.report_rounds.split(",")]
    if args.load:
        results = [
            json.loads(line) for f in args.load for line in Path(f).read_text().split("\n") if line
        ]
        report(results, report_rounds)
        return
    if not (Path(args.shared) / "models" / "resnet20_cifar10.th").is_file():
        raise SystemExit(f"skipped: {args.shared} lacks models/resnet20_cifar10.th")
    jobs = [(args, v, int(s)) for s in args.seeds.split(",") for v in args.variants.split(",")]
    for _, v, _ in jobs:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: {v!r} is unknown; allowed: {', '.join(VARIANTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_job, jobs, chunksize=1)
    else:
        results = [run_job(j) for j in jobs]
    report(results, report_rounds)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
