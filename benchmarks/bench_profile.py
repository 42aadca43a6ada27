"""Profiling benchmark: naive (a full forward per layer x level, the paper's algorithm) versus
fast (suffix-only recomputation, batched levels), same device, same calibration set and grid.

Needs torch and numpy alone (torchvision for its models, psutil for CPU memory, both
optional), so it runs on a bare GPU machine without ray, dvc or mlflow.

Models (``--models``, comma-separated):
  - resnet20: the public pretrained CIFAR ResNet-20 with real CIFAR-10 calibration images,
    from ../shared or from a file written by ``--save-calib`` (skipped, and said so, when
    neither is there);
  - resnet56: CIFAR ResNet-56, random weights, synthetic 32x32 inputs;
  - resnet50: torchvision ResNet-50 at 224x224, random weights, synthetic inputs (64 images,
    11 levels: small enough for the naive engine);
  - paper: the paper's ImageNet workload, ResNet-50, 54 layers x 101 levels x 256 images,
    fast engine only; the naive time is extrapolated from the resnet50 row (naive cost is
    linear in images x levels), and said so;
  - zoo: torchvision ResNet-18, VGG-11, DenseNet-121, MobileNetV2 at 32x32 and 224x224.

Per model: wall time of each engine, speed-up, peak memory during each engine (GPU: torch's
max_memory_allocated; CPU: sampled RSS growth), the fraction of the naive engine's FLOPs the
fast engine executes and the fast engine's achieved FLOP/s (torch's FlopCounterMode on an
8-image run, scaled by the number of images; convolutions and matrix products, 2 FLOPs per
multiply-accumulate), and the largest relative difference between the two tables.

``--stage params.yaml`` instead times the profile stage's own code path
(``profile_run.profile_curves``: the Ray backend and work units, BN correction, repair and
precision the params set) on the
artifacts a ``dvc repro -s calibrate`` left there, naive then fast in one process; ``--set
profile.precision=bf16`` overrides a param (``--set ray.backend=serial`` where Ray is absent).

Run:
  python benchmarks/bench_profile.py --stage params.yaml                       # the stage path
  python benchmarks/bench_profile.py --models resnet20 --bn-correction        # CPU
  python benchmarks/bench_profile.py --models resnet20 --bn-correction --reconstruct 0.01
  python benchmarks/bench_profile.py --device cuda --models resnet20,resnet56,resnet50,paper \
      --bn-correction --batch-size 128 --memory-mb 16384                        # one GPU
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from pipeline.nn.device import exact_cuda
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import prunable_numel
from pipeline.nn.models import build_model, load_weights, normalize_state_dict
from pipeline.profiling.distortion import profile_layer, sparsity_grid
from pipeline.profiling.fusion import accumulating_op, pointwise_op

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
H100_FP32_PEAK = 67e12  # H100 SXM, fp32 without tensor cores (TF32 is off), FLOP/s
FLOP_IMAGES = 8  # images of the FlopCounterMode run


class PeakMemory:
    """Peak memory growth (MB) while the block runs: GPU allocations on CUDA, sampled RSS on
    the CPU (nan without psutil)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        self.mb = float("nan")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import psutil
        except ImportError:
            self.proc = None
            return self
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.proc is not None:
            self.running = False
            self.thread.join()
            self.mb = (self.peak - self.base) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(model, inputs, reference, grid, engine, args, layers=None):
    return [
        profile_layer(
            name,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=grid,
            batch_size=args.batch_size,
            threads=args.threads,
            engine=engine,
            memory_mb=args.memory_mb,
            bn_correction="relative" if args.bn_correction else None,
            repair=args.reconstruct,
            precision=args.precision,
        )
        for name in layers or prunable_numel(model)
    ]


def stage_path(args) -> None:
    """Time exactly what ``dvc repro -f -s profile`` runs, engine by engine, in one process:
    ``profile_run.profile_curves`` on the params file's settings (Ray backend and work units, BN
    correction, repair, precision), on the baseline and calibration artifacts a previous
    ``dvc repro`` left in the project. Not timed: starting Python, reading the artifacts,
    writing the table and its figure."""
    import dataclasses

    import yaml

    from pipeline.config.params import load_params
    from pipeline.edges import io, params_file
    from pipeline.edges.profile_run import profile_curves
    from pipeline.edges.stage import load_model

    root = args.stage.resolve().parent
    paths = io.Paths(root)
    mapping = params_file.read_params_mapping(args.stage)
    for item in args.set:  # --set section.key=value (a YAML value)
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        mapping.setdefault(section, {})[name] = yaml.safe_load(value)
    params = load_params(mapping)
    inputs, _, reference = io.read_calibration(paths.calibration)
    model = load_model(params, paths.baseline, inputs.shape[1], reference.shape[1], "baseline")
    p = params.profile
    print(
        f"stage path: {root}; {len(inputs)} images x {p.levels} levels, {p.engine} -> "
        f"{args.engines}; batch {p.batch_size}, {p.memory_mb} MB, BN correction "
        f"{params.curve_bn_rule}, repair {params.curve_repair}, precision {p.precision}; "
        f"ray backend {params.ray.backend}, work_units {params.ray.work_units}",
        flush=True,
    )
    seconds = {}
    for engine in args.engines.split(","):
        run = dataclasses.replace(params, profile=dataclasses.replace(p, engine=engine))
        start = time.perf_counter()
        profile_curves(run, model, inputs, reference)
        seconds[engine] = time.perf_counter() - start
        print(f"  {engine:<6} {seconds[engine]:8.1f} s", flush=True)
    if {"naive", "fast"} <= seconds.keys():
        print(f"  speed-up (naive / fast): {seconds['naive'] / seconds['fast']:.2f}x")


def timed(model, inputs, reference, grid, engine, args, device):
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        result = run_engine(model, inputs, reference, grid, engine, args)
        sync(device)
        seconds = time.perf_counter() - start
    return result, seconds, mem.mb


# the fast engine's fused convolutions (fusion.py: oneDNN's ops, which torch's counter does
# not know) count as the convolutions they are. Shapes: (X, W, B, ...) for conv + ReLU;
# (out, X, W, B, ...) for the convolution added into ``out`` (+ ReLU).
def _fused_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _accumulated_conv_flop(out, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out, transposed=False)


if pointwise_op() is not None:  # a torch build without oneDNN fuses nothing
    register_flop_formula(pointwise_op())(_fused_conv_flop)
if accumulating_op() is not None:
    register_flop_formula(accumulating_op().overloadpacket)(_accumulated_conv_flop)


def flops(model, inputs, grid, engine, args) -> float:
    """FLOPs of one engine on all of ``inputs`` (counted on the first FLOP_IMAGES, scaled)."""
    small = inputs[:FLOP_IMAGES]
    reference = predict_logits(model, small, args.batch_size)
    with FlopCounterMode(display=False) as counter:
        run_engine(model, small, reference, grid, engine, args)
    return counter.get_total_flops() * len(inputs) / len(small)


def max_rel_diff(naive, fast) -> float:
    worst = 0.0
    for (mn, xn), (mf, xf) in zip(naive, fast, strict=True):
        for a, b in ((mn, mf), (xn, xf)):
            nz = a != 0
            worst = max(worst, float(np.max(np.abs(a - b)[nz] / np.abs(a[nz]), initial=0.0)))
            worst = max(worst, float(np.max(np.abs(b[~nz]), initial=0.0)))  # zeros stay zero
    return worst


def row(name, layers, images, levels, naive_s, fast_s, naive_mb, fast_mb, frac, tflops, diff):
    naive = f"{naive_s:>9.1f}" if isinstance(naive_s, float) else f"{naive_s:>9}"
    speed = f"{naive_s / fast_s:>8.1f}x" if isinstance(naive_s, float) else f"{'':>9}"
    print(
        f"{name:<28} {layers:>6} {images:>6} {levels:>6} {naive} {fast_s:>9.1f} {speed} "
        f"{naive_mb:>9.0f} {fast_mb:>9.0f} {frac:>9.3f} {tflops:>8.2f} {diff:>10.1e}",
        flush=True,
    )


def compare(name, model, inputs, levels, args, device):
    """Both engines on the whole model; returns the naive seconds."""
    model, inputs = model.to(device).eval(), inputs.to(device)
    grid = sparsity_grid(levels)
    reference = predict_logits(model, inputs, args.batch_size)
    naive, naive_s, naive_mb = timed(model, inputs, reference, grid, "naive", args, device)
    fast, fast_s, fast_mb = timed(model, inputs, reference, grid, "fast", args, device)
    fast_flops = flops(model, inputs, grid, "fast", args)
    frac = fast_flops / flops(model, inputs, grid, "naive", args)
    layers = len(prunable_numel(model))
    row(name, layers, len(inputs), levels, naive_s, fast_s, naive_mb, fast_mb, frac,
        fast_flops / fast_s / 1e12, max_rel_diff(naive, fast))  # fmt: skip
    return naive_s


def paper(args, device, naive_row_s: float | None):
    """ResNet-50, 54 layers x 101 levels x 256 images at 224x224, fast engine end to end."""
    model = torchvision_model("resnet50", 1000).to(device)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 3, 224, 224, generator=gen).to(device)
    grid = sparsity_grid(101)
    reference = predict_logits(model, inputs, args.batch_size)
    _, fast_s, fast_mb = timed(model, inputs, reference, grid, "fast", args, device)
    fast_flops = flops(model, inputs, grid, "fast", args)
    naive_flops = flops(model, inputs[:FLOP_IMAGES], sparsity_grid(2), "naive", args)
    naive_flops *= (256 / FLOP_IMAGES) * 100  # per non-zero level, linear in levels
    # the resnet50 row: 64 images x 10 non-zero levels; naive cost is linear in both
    naive = f"~{naive_row_s * (256 / 64) * (100 / 10):.0f}" if naive_row_s else "n/a"
    row("resnet50 paper (naive extrap.)", len(prunable_numel(model)), 256, 101, naive, fast_s,
        float("nan"), fast_mb, fast_flops / naive_flops, fast_flops / fast_s / 1e12,
        float("nan"))  # fmt: skip
    if device.type == "cuda":
        print(
            f"paper workload: fast {fast_s:.1f} s, {fast_flops:.3g} FLOPs executed "
            f"({naive_flops:.3g} naive), {fast_flops / fast_s / 1e12:.1f} TFLOP/s = "
            f"{100 * fast_flops / fast_s / H100_FP32_PEAK:.0f} % of the H100's fp32 peak "
            f"({H100_FP32_PEAK / 1e12:.0f} TFLOP/s, no tensor cores)",
            flush=True,
        )


def load_resnet20(images: int, calib: Path | None):
    """(model, inputs) of the pretrained CIFAR ResNet-20, or None when its files are absent."""
    if calib is not None and calib.is_file():
        saved = torch.load(calib, map_location="cpu", weights_only=True)
        state, inputs = saved["state_dict"], saved["inputs"][:images]
    else:
        from torchvision import datasets, transforms

        ckpt = SHARED / "models" / "resnet20_cifar10.th"
        data = SHARED / "data" / "cifar10-subset" / "train"
        if not ckpt.is_file() or not data.is_dir():
            print(f"{'cifar_resnet20 (pretrained)':<28} skipped: {SHARED} is absent")
            return None
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        tf = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        ds = datasets.ImageFolder(str(data), tf)
        idx = np.random.default_rng(0).choice(len(ds), size=images, replace=False)
        inputs = torch.stack([ds[int(i)][0] for i in idx])
    model = build_model("cifar_resnet20", 3, 10)
    load_weights(model, normalize_state_dict(state, "resnet20"), "resnet20", "cifar_resnet20")
    return model, inputs


def torchvision_model(name: str, classes: int = 10):
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=classes).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--models", default="resnet20,zoo", help="resnet20,resnet56,resnet50,paper,zoo"
    )
    parser.add_argument("--bn-correction", action="store_true", help="relative BN-corrected curves")
    parser.add_argument(
        "--reconstruct",
        type=float,
        default=None,
        metavar="DAMPING",
        help="repaired curves (profile.reconstruct) with this prune.reconstruct_damping",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="profile.batch_size")
    parser.add_argument("--memory-mb", type=int, default=64, help="profile.memory_mb")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="smaller sets, for a smoke run")
    parser.add_argument("--calib", type=Path, help="ResNet-20 weights + images from --save-calib")
    parser.add_argument("--save-calib", type=Path, help="write ResNet-20 weights + 256 images")
    parser.add_argument("--precision", default="fp32", help="profile.precision (in process)")
    parser.add_argument(
        "--stage",
        type=Path,
        metavar="PARAMS",
        help="time the profile stage's own code path on this params.yaml's project instead",
    )
    parser.add_argument("--engines", default="naive,fast", help="--stage: engines, in order")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="--stage: a param"
    )
    args = parser.parse_args()
    if args.stage:
        stage_path(args)
        return
    if args.save_calib:
        model, inputs = load_resnet20(256, None)
        torch.save({"state_dict": model.state_dict(), "inputs": inputs}, args.save_calib)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        exact_cuda()  # TF32 off, as the pipeline's device param does
        where = f"{torch.cuda.get_device_name(device)}"
    else:
        torch.set_num_threads(args.threads)
        where = f"CPU, {args.threads} threads"
    print(
        f"{where}, torch {torch.__version__}; fast engine: batch {args.batch_size}, "
        f"{args.memory_mb} MB per pass; BN correction: "
        f"{'relative' if args.bn_correction else 'off'}; repair: "
        f"{'off' if args.reconstruct is None else f'damping {args.reconstruct}'}"
    )
    print(
        f"{'model':<28} {'layers':>6} {'images':>6} {'levels':>6} {'naive s':>9} {'fast s':>9} "
        f"{'speed-up':>9} {'naive MB':>9} {'fast MB':>9} {'FLOPs frac':>9} {'TFLOP/s':>8} "
        f"{'max rel diff':>10}",
        flush=True,
    )
    models = args.models.split(",")
    quick = args.quick
    gen = torch.Generator().manual_seed(0)
    naive_r50 = None
    if "resnet20" in models:
        loaded = load_resnet20(64 if quick else 256, args.calib)
        if loaded is not None:
            compare("cifar_resnet20 (pretrained)", *loaded, 11 if quick else 41, args, device)
    if "resnet56" in models:
        model = build_model("cifar_resnet56", 3, 10)
        images = torch.randn(64 if quick else 256, 3, 32, 32, generator=gen)
        compare("cifar_resnet56 (random)", model, images, 11 if quick else 41, args, device)
    if "resnet50" in models:
        images = torch.randn(8 if quick else 64, 3, 224, 224, generator=gen)
        naive_r50 = compare(
            "resnet50 224x224 (random)", torchvision_model("resnet50", 1000), images,
            6 if quick else 11, args, device,
        )  # fmt: skip
    if "paper" in models:
        paper(args, device, naive_r50)
    if "zoo" in models:
        for name in ("resnet18", "vgg11", "densenet121", "mobilenet_v2"):
            images = torch.randn(16 if quick else 64, 3, 32, 32, generator=gen)
            compare(f"{name} 32x32", torchvision_model(name), images, 6 if quick else 11, args,
                    device)  # fmt: skip
        if not quick:
            for name in ("resnet18", "vgg11", "mobilenet_v2"):
                images = torch.randn(8, 3, 224, 224, generator=gen)
                compare(f"{name} 224x224", torchvision_model(name, 1000), images, 6, args, device)


if __name__ == "__main__":
    main()
