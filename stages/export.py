"""export: the final model as a compact safetensors file (packed masks + non-zero values)
and as ONNX checked against PyTorch with onnxruntime."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from pipeline.config.params import Params
from pipeline.edges import io
from pipeline.edges.export import ONNX_OPSET, load_compact, onnx_bytes, onnx_check, save_compact
from pipeline.edges.stage import load_model, log, run_stage
from pipeline.nn.data import load_dataset
from pipeline.nn.evaluation import accuracy
from pipeline.nn.layers import prunable_numel
from pipeline.pruning.masking import zero_count


def run(params: Params, paths: io.Paths) -> None:
    rounds = params.schedule.rounds
    source = paths.round(rounds) / "model.pt" if rounds > 0 else paths.finetuned
    splits = load_dataset(params.data)
    model = load_model(params, source, splits.in_channels, splits.num_classes, "final model")
    model.cpu().eval()
    state = model.state_dict()
    packed = [f"{name}.weight" for name in prunable_numel(model)]
    dtype = getattr(torch, params.export.dtype) if params.export.dtype else None
    compact = paths.export / "model.safetensors"
    compact_bytes = save_compact(compact, state, packed, dtype)
    restored = load_compact(compact)  # what a user gets back, read as they will read it
    if dtype is None and not all(torch.equal(restored[k], v) for k, v in state.items()):
        raise RuntimeError("export: the compact file does not restore the state_dict")
    before = accuracy(model, splits.test)
    model.load_state_dict(restored)
    # the restored weights are the model's own unless export.dtype rounded them
    after = accuracy(model, splits.test) if dtype is not None else before
    zeros, total = zero_count(model)
    dense_bytes = source.stat().st_size
    metrics = {
        "dense_bytes": dense_bytes,
        "compact_bytes": compact_bytes,
        "size_ratio": round(dense_bytes / compact_bytes, 4),
        "sparsity": zeros / total,
        "accuracy": after,
        "accuracy_change": after - before,  # 0 unless export.dtype rounds the values
    }
    if params.export.onnx:
        example = next(iter(torch.utils.data.DataLoader(splits.test, batch_size=2)))[0]
        data = onnx_bytes(model, example)
        io.write_bytes_atomic(paths.export / "model.onnx", data)
        diff = onnx_check(model, data, splits.test, params.calibrate.batch_size)
        metrics |= {"onnx_bytes": len(data), "onnx_opset": ONNX_OPSET, "onnx_max_abs_diff": diff}
    io.write_metrics(paths.metrics("export"), metrics)
    log.info(
        "export: %s %d bytes (dense state_dict %d, %.2fx smaller) at sparsity %.4f%s",
        compact,
        compact_bytes,
        metrics["dense_bytes"],
        metrics["size_ratio"],
        metrics["sparsity"],
        f"; ONNX logits within {diff:.2g} of PyTorch's" if params.export.onnx else "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
