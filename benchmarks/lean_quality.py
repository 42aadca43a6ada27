"""Lean quality exploration: every allocation evaluated in-process on the CIFAR-10 subset.

Loads the model and data once (a tensor blob made by ``--make-blob`` from ../shared), profiles
the curves once per seed (cached), and evaluates allocations in-process: prune, relative BN
recalibration on the prune stage's images, test accuracy. The calibration and BN images are
drawn exactly as the calibrate and prune stages draw them (``--half A|B``: from one half of
the training split only). Writes per-sample test hits to ``--out``/hits.pt for paired tables.

Run: python benchmarks/lean_quality.py --make-blob artifacts/lean/data.pt
     python benchmarks/lean_quality.py --blob artifacts/lean/data.pt --seeds 0 1 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.allocation.methods import allocate
from pipeline.allocation.problem import Problem, layer_bounds
from pipeline.allocation.refine import dense_moments, recalibrated_logits, refine_allocation
from pipeline.nn.layers import macs_per_weight, prunable_layers, prunable_numel
from pipeline.nn.models import build_model, load_weights, normalize_state_dict
from pipeline.profiling.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.pruning.batchnorm import BN_TYPES, batchnorms
from pipeline.pruning.masking import apply_masks, magnitude_masks

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BASELINES = ("global", "lamp", "erk", "uniform", "uniform_plus")


def make_blob(path: Path, shared: Path) -> None:
    from torchvision.datasets import ImageFolder

    out = {}
    for split in ("train", "test"):
        ds = ImageFolder(str(shared / "data" / "cifar10-subset" / split))
        imgs = np.stack([np.asarray(ds[i][0].convert("RGB")) for i in range(len(ds))])
        out[split] = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
        out[split + "_labels"] = torch.tensor(ds.targets)
    out["checkpoint"] = torch.load(
        shared / "models" / "resnet20_cifar10.th", map_location="cpu", weights_only=True
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def normalise(x: torch.Tensor) -> torch.Tensor:  # as ToTensor + Normalize
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float().div(255) - m) / s


def draw(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    return pool[np.random.default_rng(seed).choice(len(pool), size=n, replace=False)]


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    n = len(a)
    oa, ob = int((a & ~b).sum()), int((~a & b).sum())
    return 100 * (oa - ob) / n, 100 * math.sqrt(max(oa + ob - (oa - ob) ** 2 / n, 0)) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--make-blob", type=Path)
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--blob", type=Path)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--half", choices=["A", "B"], default=None)
    p.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, default=Path("/tmp/lean_cache"))
    p.add_argument("--out", type=Path, default=Path("/tmp/lean_out"))
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--levels", type=int, default=41)
    p.add_argument("--variants", nargs="*", default=["mse:150", "ce:150"])
    p.add_argument("--holdout", type=float, default=0.5)
    p.add_argument("--no-baselines", action="store_true")
    args = p.parse_args()
    if args.make_blob:
        make_blob(args.make_blob, args.shared)
        return
    torch.set_num_threads(1 if args.device == "cpu" else 8)
    dev = torch.device(args.device)
    blob = torch.load(args.blob, weights_only=True)
    train, test = normalise(blob["train"]), normalise(blob["test"]).to(dev)
    train_labels, test_labels = blob["train_labels"], blob["test_labels"].to(dev)
    dense = build_model("cifar_resnet20", 3, 10)
    load_weights(dense, normalize_state_dict(blob["checkpoint"], "ckpt"), "ckpt", "cifar_resnet20")
    dense = dense.to(dev).eval()
    pool = np.arange(len(train))
    if args.half:  # a fixed random half of the training split
        perm = np.random.default_rng(12345).permutation(len(train))
        pool = np.sort(perm[: len(train) // 2] if args.half == "A" else perm[len(train) // 2 :])
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    hits_path = args.out / "hits.pt"
    hits = torch.load(hits_path, weights_only=True) if hits_path.exists() else {}
    info = {}

    names = {m: n for n, m in dense.named_modules()}
    dense_bns = {names[b]: b for b in batchnorms(dense)}

    @torch.no_grad()
    def test_hits(kept: dict[str, int], bn_x: torch.Tensor) -> torch.Tensor:
        """Prune, recalibrate BN (relative) on bn_x (one batch: equal to recalibrate_bn up to
        rounding), test hits."""
        m = copy.deepcopy(dense)
        apply_masks(m, magnitude_masks(m, kept))
        own = {b: n for n, b in m.named_modules() if isinstance(b, BN_TYPES)}
        recalibrated_logits(m, bn_moments, own, dense_bns, bn_x, "relative")
        return (m(test).argmax(1) == test_labels).cpu()

    bn_moments = dense_moments(dense, train[:64].to(dev))
    dense_hits = test_hits({}, train[:64].to(dev))
    print(f"dense {100 * dense_hits.float().mean():.2f}", flush=True)
    for seed in args.seeds:
        tag = f"s{seed}{'' if args.half is None else args.half}"
        cal_ix, bn_ix = draw(pool, args.samples, seed), draw(pool, args.bn_images, seed + 1)
        x, y = train[cal_ix].to(dev), train_labels[cal_ix].to(dev)
        bn_x = train[bn_ix].to(dev)
        bn_moments = dense_moments(dense, bn_x)
        with torch.no_grad():
            ref = torch.cat([dense(x[i : i + 256]) for i in range(0, len(x), 256)])
        numel = prunable_numel(dense)
        cpath = args.cache / f"curves_{tag}_{args.samples}_{args.levels}.npz"
        if cpath.exists():  # tensors only: nothing read from disk runs code
            curves = DistortionCurves(
                **{
                    k: v.tolist() if k == "layers" else v
                    for k, v in np.load(cpath, allow_pickle=False).items()
                }
            )
        else:
            t = time.perf_counter()
            grid = sparsity_grid(args.levels)
            res = [
                profile_layer(
                    name,
                    model=dense,
                    inputs=x,
                    reference=ref,
                    sparsities=grid,
                    batch_size=256 if args.device != "cpu" else 32,
                    threads=1,
                    memory_mb=4096 if args.device != "cpu" else 64,
                    bn_correction="relative",
                )
                for name in numel
            ]
            curves = DistortionCurves.from_profiles(numel, grid, res, macs_per_weight(dense, x[:1]))
            np.savez(cpath, **{k: np.asarray(v) for k, v in vars(curves).items()})
            print(f"{tag}: profiled in {time.perf_counter() - t:.0f} s", flush=True)
        weights = {n: m.weight.detach() for n, m in prunable_layers(dense)}
        lo, hi = layer_bounds(curves.layers, {}, [])
        for ratio in args.ratios:
            problem = Problem(
                curves=curves,
                kind="mean",
                targets={"params": ratio},
                lo=lo,
                hi=hi,
                magnitudes=[weights[n].abs().flatten().cpu().numpy() for n in curves.layers],
                shapes=[tuple(weights[n].shape) for n in curves.layers],
            )
            methods = ["rd"] + ([] if args.no_baselines else list(BASELINES))
            for method in methods:
                key = (tag, method, ratio)
                if key in hits:
                    continue
                a = allocate(method, problem)
                hits[key] = test_hits(dict(zip(a.layers, a.kept.tolist(), strict=True)), bn_x)
                info[str(key)] = a.sparsity.round(3).tolist()
            rd = allocate("rd", problem)
            for variant in args.variants:
                obj, evals, *more = variant.split(":")
                evals, rounds = int(evals), int(more[0]) if more else 0
                key = (tag, f"rd+{variant}", ratio)
                if key in hits:
                    continue
                t = time.perf_counter()
                refined, r = refine_allocation(
                    dense, problem, rd, x, y, ref, "relative", obj, args.holdout, evals, rounds
                )
                kept = refined.kept
                assert kept.sum() <= problem.budgets()["params"]
                hits[key] = test_hits(dict(zip(curves.layers, kept.tolist(), strict=True)), bn_x)
                sp = (1 - kept / curves.numel).round(3).tolist()
                info[str(key)] = {"sparsity": sp, "start": r.start, "end": r.end}
                print(
                    f"{tag} {ratio} {variant}: {r.start[0]:.4g}/{r.start[1]:.4g} -> "
                    f"{r.end[0]:.4g}/{r.end[1]:.4g}, {r.accepted} moves, {r.evaluations} evals, "
                    f"{time.perf_counter() - t:.0f} s; acc {100 * hits[key].float().mean():.1f} "
                    f"(rd {100 * hits[(tag, 'rd', ratio)].float().mean():.1f})",
                    flush=True,
                )
            torch.save(hits, hits_path)
    (args.out / f"info_{'-'.join(map(str, args.seeds))}{args.half or ''}.json").write_text(
        json.dumps(info, indent=0)
    )
    report(hits, args.ratios)


def report(hits: dict, ratios: list[float]) -> None:
    tags = sorted({k[0] for k in hits})
    methods = list(dict.fromkeys(k[1] for k in hits))
    for tag in tags:
        print(f"\n== {tag}")
        for m in methods:
            cells = [hits.get((tag, m, r)) for r in ratios]
            print(
                f"{m:<16}"
                + "".join(
                    f"{100 * c.float().mean():7.1f}" if c is not None else "      -" for c in cells
                )
            )
    base = [m for m in methods if m in BASELINES]

    def half(t: str) -> str:
        return t[-1] if t[-1] in "AB" else ""

    for prefix in sorted({half(t) for t in tags}):
        group = [t for t in tags if half(t) == prefix]
        print(f"\n== mean over {group}")
        for m in methods:
            vals = [
                [100 * hits[(t, m, r)].float().mean().item() for t in group if (t, m, r) in hits]
                for r in ratios
            ]
            print(f"{m:<16}" + "".join(f"{np.mean(v):7.2f}" if v else "      -" for v in vals))
        if not base:
            continue
        best = {
            r: max(base, key=lambda b: np.mean([hits[(t, b, r)].float().mean() for t in group]))
            for r in ratios
        }
        print("paired (method - best baseline of the mean), points ± SE (seeds pooled):")
        for m in methods:
            if m in base:
                continue
            cells = []
            for r in ratios:
                if not all((t, m, r) in hits for t in group):
                    cells.append("-")
                    continue
                a = torch.cat([hits[(t, m, r)] for t in group])
                b = torch.cat([hits[(t, best[r], r)] for t in group])
                d, se = paired(a, b)
                cells.append(f"{d:+.2f}±{se:.2f} ({best[r]})")
            print(f"  {m:<16}" + "; ".join(cells))


if __name__ == "__main__":
    main()
