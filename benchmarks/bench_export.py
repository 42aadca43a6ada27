"""Export benchmark: on the public CIFAR ResNet-20 (../shared, else random weights, and said
so), pruned by global magnitude at each sparsity: the dense state_dict's bytes (torch.save),
the compact file's (float32 and float16 values), their ratios, the exact round trip, the
ONNX model's largest logit difference from PyTorch under onnxruntime, and onnxruntime's
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profile import load_resnet20  # noqa: E402

from pipeline.export import load_compact, onnx_bytes, save_compact  # noqa: E402
from pipeline.layers import prunable_numel  # noqa: E402
from pipeline.masking import apply_masks  # noqa: E402
from pipeline.models import build_model  # noqa: E402


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
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    x = images.numpy()
    print(
        f"{'sparsity':>8} {'dense B':>9} {'compact B':>10} {'ratio':>6} {'fp16 B':>8} "
        f"{'ratio':>6} {'exact':>5} {'onnx diff':>9} {'dense ms':>8} {'pruned ms':>9}"
    )
    sessions = {}
    for sparsity in [0.0, *(float(s) for s in args.sparsities.split(","))]:
        model.load_state_dict(dense_state)
        apply_masks(model, global_masks(model, sparsity))
        state = model.state_dict()
        packed = [f"{n}.weight" for n in prunable_numel(model)]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with tempfile.TemporaryDirectory() as tmp:
            full = save_compact(Path(tmp) / "a.safetensors", state, packed)
            half = save_compact(Path(tmp) / "b.safetensors", state, packed, torch.float16)
            back = load_compact(Path(tmp) / "a.safetensors")
        exact = list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
        data = onnx_bytes(model, images[:2])
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        with torch.no_grad():
            diff = float(
                (torch.from_numpy(session.run(None, {name: x})[0]) - model(images)).abs().max()
            )
        sessions[sparsity] = latency(session, name, x)
        dense_bytes = buffer.getbuffer().nbytes
        print(
            f"{sparsity:>8.2f} {dense_bytes:>9} {full:>10} {dense_bytes / full:>6.2f} "
            f"{half:>8} {dense_bytes / half:>6.2f} {str(exact):>5} {diff:>9.2e} "
            f"{sessions[0.0]:>8.2f} {sessions[sparsity]:>9.2f}",
            flush=True,
        )
    print(f"onnxruntime {onnxruntime.__version__}, CPU, {args.threads} threads, batch {len(x)}")


if __name__ == "__main__":
    main()
