"""Compact export: a pruned state_dict in a safetensors file where each pruned weight is a
packed bit mask plus its non-zero values.

A pruned network saved as a dense state_dict takes as much disk as the dense one. Here each
listed weight W (any floating dtype and shape) becomes two tensors:

- ``<name>.__mask__``: uint8, ceil(numel / 8) bytes: bit i (little-endian within each byte)
  of the row-major flattening is 1 where W is non-zero;
- ``<name>.__values__``: those entries in row-major order, in W's dtype or in ``dtype``;
- ``<name>.__negzero__`` (only where W holds a -0.0): one bit per zero entry, in order, set
  for -0.0, so that the zeros too come back bit for bit.

Every other tensor is stored as is. The file is a standard safetensors file (8-byte
little-endian header length, a JSON header, raw little-endian bytes): ``safetensors``
opens it, and ``load_compact`` here needs only torch and numpy. Reading parses JSON and
copies bytes, so nothing in the file can run code. The header's ``__metadata__`` holds the
format name, the original key order and each packed weight's shape and dtype, so that
``load_compact`` returns a state_dict equal, byte for byte and key for key, to the one
saved (with ``dtype`` None).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from pipeline.edges.io import write_bytes_atomic
from pipeline.errors import PipelineError
from pipeline.nn.evaluation import predict_logits

FORMAT = "rdprune-compact/1"
MASK, VALUES, NEGZERO = ".__mask__", ".__values__", ".__negzero__"
MAX_HEADER = 100 << 20  # bytes: far above any real header, far below a hostile length
# safetensors dtype names <-> torch dtypes (the ones a state_dict holds)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def compact_tensors(
    state_dict: Mapping[str, torch.Tensor],
    packed: Iterable[str],
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the compact form: each key in ``packed`` (a floating tensor)
    as mask + values (values cast to ``dtype`` if given), the rest as is."""
    packed = list(packed)
    if dtype is not None and dtype not in FLOATS:
        raise PipelineError(f"export: values dtype {dtype} is not allowed; allowed: {FLOATS}")
    for name in packed:
        if name not in state_dict or not state_dict[name].is_floating_point():
            raise PipelineError(f"export: {name!r} is not a floating tensor of the state_dict")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict] = {}
    for name, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        if name not in packed:
            tensors[name] = value
            continue
        flat = value.reshape(-1)
        keep = flat != 0
        tensors[name + MASK] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        values = flat[keep]
        tensors[name + VALUES] = values.to(dtype) if dtype is not None else values
        negative = torch.signbit(flat[~keep])
        if bool(negative.any()):
            bits = np.packbits(negative.numpy(), bitorder="little")
            tensors[name + NEGZERO] = torch.from_numpy(bits)
        shapes[name] = {"shape": list(value.shape), "dtype": NAMES[value.dtype]}
    metadata = {
        "format": FORMAT,
        "order": json.dumps(list(state_dict)),
        "packed": json.dumps(shapes),
    }
    return tensors, metadata


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors serialisation of ``tensors`` (contiguous CPU) with string metadata."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name, value in tensors.items():
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": NAMES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def save_compact(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    packed: Iterable[str],
    dtype: torch.dtype | None = None,
) -> int:
    """Write the compact file (atomically); returns its size in bytes."""
    data = safetensors_bytes(*compact_tensors(state_dict, packed, dtype))
    write_bytes_atomic(Path(path), data)
    return len(data)


def _fail(path: Path, why: str) -> PipelineError:
    return PipelineError(f"compact model file {path}: {why}; write it with the export stage")


def _ints(value: object, what: str) -> list[int]:
    """``value`` as a list of non-negative JSON integers (not bools, floats or strings)."""
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < 2**62 for v in value):
        raise ValueError(f"{what} is not a list of non-negative integers")
    return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: every length, offset and shape checked, the
    tensors' bytes disjoint and covering the data; anything else is one PipelineError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"compact model file not found: {path}") from None
    except OSError as exc:
        raise _fail(path, exc.strerror or type(exc).__name__) from None
    try:
        return _parse(path, data)
    except PipelineError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise _fail(path, f"malformed ({exc})") from None


def _parse(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) < 8:
        raise _fail(path, f"{len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER, len(data) - 8):
        raise _fail(path, f"header length {n} runs past the end of the {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + n], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ is not an object of strings")
    body = memoryview(data)[8 + n :]
    tensors: dict[str, torch.Tensor] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise _fail(path, f"tensor {name!r}: malformed entry or unknown dtype")
        dtype = DTYPES[entry["dtype"]]
        shape = _ints(entry.get("shape"), f"tensor {name!r}'s shape")
        offsets = _ints(entry.get("data_offsets"), f"tensor {name!r}'s offsets")
        if len(offsets) != 2:
            raise _fail(path, f"tensor {name!r}: offsets {offsets}")
        start, stop = offsets
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not start <= stop <= len(body) or stop - start != size:
            raise _fail(path, f"tensor {name!r}: offsets {start}..{stop} do not hold {shape}")
        spans.append((start, stop, name))
        raw = bytearray(body[start:stop])  # a copy: the tensor owns its memory
        empty = torch.empty(0, dtype=torch.uint8)
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else empty
        tensors[name] = flat.view(dtype).reshape(shape)
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:  # overlapping tensors, or bytes nobody owns
            raise _fail(path, f"tensor {name!r} starts at {start}, not at {end}")
        end = stop
    if end != len(body):
        raise _fail(path, f"{len(body) - end} bytes after the last tensor")
    return tensors, metadata


def load_compact(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict saved by ``save_compact``, keys in their original order: each packed
    weight rebuilt from its mask and values (in its original dtype). A truncated, corrupt or
    inconsistent file is one PipelineError naming it."""
    tensors, metadata = read_safetensors(path)
    try:
        return _unpack(Path(path), tensors, metadata)
    except PipelineError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise _fail(Path(path), f"malformed ({exc})") from None


def _unpack(path: Path, tensors: dict, metadata: dict) -> dict[str, torch.Tensor]:
    if metadata.get("format") != FORMAT:
        raise _fail(path, f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        order, packed = json.loads(metadata["order"]), json.loads(metadata["packed"])
    except (KeyError, json.JSONDecodeError):
        raise _fail(path, "metadata lacks the key order or the packed weights") from None
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        raise _fail(path, "the key order is not a list of names")
    if len(set(order)) != len(order) or not isinstance(packed, dict):
        raise _fail(path, "the key order repeats a name, or the packed weights are not an object")
    if not set(packed) <= set(order):
        raise _fail(path, "a packed weight is not in the key order")
    expected = {k for k in order if k not in packed}
    for name in packed:
        expected |= {name + MASK, name + VALUES}
        if name + NEGZERO in tensors:
            expected.add(name + NEGZERO)
    if set(tensors) != expected:
        raise _fail(path, f"tensors {sorted(set(tensors) ^ expected)} do not match the key order")
    out: dict[str, torch.Tensor] = {}
    for name in order:
        if name not in packed:
            out[name] = tensors[name]
            continue
        mask, values, info = tensors[name + MASK], tensors[name + VALUES], packed[name]
        if not isinstance(info, dict) or DTYPES.get(info.get("dtype")) not in FLOATS:
            raise _fail(path, f"packed weight {name!r}: not a floating tensor")
        dtype, shape = DTYPES[info["dtype"]], _ints(info.get("shape"), f"{name!r}'s shape")
        numel = math.prod(shape)
        if mask.dtype != torch.uint8 or mask.shape != ((numel + 7) // 8,):
            raise _fail(path, f"packed weight {name!r}: mask of {mask.numel()} bytes")
        bits = np.unpackbits(mask.numpy(), bitorder="little")
        if bits[numel:].any():
            raise _fail(path, f"packed weight {name!r}: mask bits set past its {numel} weights")
        keep = bits[:numel].astype(bool)
        if values.dim() != 1 or values.dtype not in FLOATS or int(keep.sum()) != len(values):
            raise _fail(path, f"packed weight {name!r}: {values.numel()} values for its mask")
        flat = torch.zeros(numel, dtype=dtype)
        flat[torch.from_numpy(keep)] = values.to(dtype)
        negzero = tensors.get(name + NEGZERO)
        if negzero is not None:
            zeros = numel - values.numel()
            if negzero.dtype != torch.uint8 or negzero.shape != ((zeros + 7) // 8,):
                raise _fail(path, f"packed weight {name!r}: sign bits of {negzero.numel()} bytes")
            sign = np.unpackbits(negzero.numpy(), bitorder="little")
            if sign[zeros:].any():
                raise _fail(path, f"packed weight {name!r}: sign bits set past its zeros")
            where = torch.from_numpy(~keep).nonzero().flatten()[torch.from_numpy(sign[:zeros] == 1)]
            flat[where] = -0.0
        out[name] = flat.reshape(shape)
    return out


ONNX_OPSET = 18


def onnx_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The model as an ONNX graph (opset ``ONNX_OPSET``, batch dimension dynamic), from
    torch.export; a model it cannot export is one PipelineError."""
    import logging

    batch = torch.export.Dim("batch", min=1)
    for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):  # progress, not news
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        proto = program.model_proto
    except Exception as exc:  # the exporter raises many types; any one means no ONNX model
        while exc.__cause__ is not None:  # the innermost names the operator
            exc = exc.__cause__
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise PipelineError(
            f"export: ONNX export of the model failed ({type(exc).__name__}: {first}); "
            "allowed: export.onnx: false to export the compact file alone"
        ) from None
    for graph in [proto.graph, *proto.functions]:
        _drop_stack_traces(graph.node)
    return proto.SerializeToString()


def _drop_stack_traces(nodes) -> None:
    """Remove the exporter's per-node source stack traces (they hold this checkout's absolute
    paths: the same model exported from another folder would differ in bytes), in subgraphs
    too."""
    for node in nodes:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attribute in node.attribute:
            for graph in [attribute.g, *attribute.graphs]:
                _drop_stack_traces(graph.node)


def onnx_check(model: torch.nn.Module, data: bytes, dataset, batch_size: int = 256) -> float:
    """Largest |ONNX logit - PyTorch logit| over ``dataset`` (onnxruntime on the CPU, the
    model on its device), batch by batch; raises unless within 1e-4 of max(1, |logits|)."""
    import onnxruntime
    from torch.utils.data import DataLoader

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst, scale = 0.0, 1.0
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        expected = predict_logits(model, x, batch_size)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
        worst = max(worst, float((got - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    if not worst <= 1e-4 * scale:
        raise PipelineError(
            f"export: the ONNX model's logits differ from PyTorch's by {worst:.3g} "
            f"(allowed: 1e-4 x {scale:.3g}); allowed: export.onnx: false"
        )
    return worst
