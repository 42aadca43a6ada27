"""Export benchmark: on the public CIFAR ResNet-20 (../shared, else random weights, and said
so), pruned by global magnitude at each sparsity: the dense state_dict's bytes (torch.save),
the compact file's (float32 and float16 values), their ratios, the exact round trip, the
top-1 on the CIFAR-10 subset's test split as pruned and from the float16 file (no repair, no
fine-tuning), the ONNX model's largest logit difference from PyTorch under onnxruntime, and
onnxruntime's
CPU latency of the pruned model against the dense one (ONNX stores zeros densely, so a
speed-up is not expected from a dense runtime: this measures it).

Run: python benchmarks/bench_export.py [--sparsities 0.5,0.8,0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profile import SHARED, load_resnet20  # noqa: E402

from pipeline.config.sections import DataParams
from pipeline.edges.export import load_compact, onnx_bytes, save_compact
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.layers import prunable_numel
from pipeline.nn.models import build_model
from pipeline.pruning.masking import apply_masks


def global_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep the largest |w| over all prunable layers together."""
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach() for n in prunable_numel(model)}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    k = int(round(sparsity * flat.numel()))
    threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
    return {n: w.abs() > threshold for n, w in weights.items()}


def latency(session, name: str, x, reps: int = 20) -> float:
    for _ in range(3):
        session.run(None, {name: x})
    start = time.perf_counter()
    for _ in range(reps):
        session.run(None, {name: x})
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.5,0.8,0.9")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    loaded = load_resnet20(64, None)
    if loaded is None:
        print("../shared not found: random-weight ResNet-20")
        model, images = build_model("cifar_resnet20", 3, 10), torch.randn(64, 3, 32, 32)
    else:
        model, images = loaded
    model.eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    test = None
    if (SHARED / "data" / "cifar10-subset").is_dir():  # the preset's test split
        data = DataParams(
            name="imagefolder",
            root=str(SHARED / "data" / "cifar10-subset"),
            mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225],
        )
        test = load_dataset(data).test
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    x = images.numpy()
    print(
        f"{'sparsity':>8} {'dense B':>9} {'compact B':>10} {'ratio':>6} {'fp16 B':>8} "
        f"{'ratio':>6} {'exact':>5} {'top-1':>6} {'fp16':>6} {'onnx diff':>9}"
    )
    sessions = {}
    for sparsity in [0.0, *(float(s) for s in args.sparsities.split(","))]:
        model.load_state_dict(dense_state)
        apply_masks(model, global_masks(model, sparsity))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        packed = [f"{n}.weight" for n in prunable_numel(model)]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with tempfile.TemporaryDirectory() as tmp:
            full = save_compact(Path(tmp) / "a.safetensors", state, packed)
            half = save_compact(Path(tmp) / "b.safetensors", state, packed, torch.float16)
            back = load_compact(Path(tmp) / "a.safetensors")
            halved = load_compact(Path(tmp) / "b.safetensors")
        top1 = top1_half = float("nan")
        if test is not None:  # top-1 % as pruned (no repair, no fine-tuning) and from fp16
            top1 = 100 * accuracy(model, test)
            model.load_state_dict(halved)
            top1_half = 100 * accuracy(model, test)
            model.load_state_dict(state)
        exact = list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
        data = onnx_bytes(model, images[:2])
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        with torch.no_grad():
            diff = float(
                (torch.from_numpy(session.run(None, {name: x})[0]) - model(images)).abs().max()
            )
        sessions[sparsity] = (session, name)
        dense_bytes = buffer.getbuffer().nbytes
        print(
            f"{sparsity:>8.2f} {dense_bytes:>9} {full:>10} {dense_bytes / full:>6.2f} "
            f"{half:>8} {dense_bytes / half:>6.2f} {str(exact):>5} {top1:>6.2f} {top1_half:>6.2f} "
            f"{diff:>9.2e}",
            flush=True,
        )
    # latency: every model in turn, 7 rounds, the median (one model after another drifts)
    times = {s: [] for s in sessions}
    for _ in range(7):
        for s, (session, name) in sessions.items():
            times[s].append(latency(session, name, x, reps=10))
    print(f"onnxruntime {onnxruntime.__version__}, CPU, {args.threads} threads, batch {len(x)}:")
    for s, t in times.items():
        print(f"  sparsity {s:.2f}: median {np.median(t):.2f} ms (range {min(t):.2f}-{max(t):.2f})")


if __name__ == "__main__":
    main()
