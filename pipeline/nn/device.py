"""The one ``device`` param: which torch device every stage runs the model on.

``auto`` is the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda`` and
``cuda:N`` name one. Library functions never take this name: they take the model already on
its device and move each batch to it (``model_device``), so data follows the model.

Pure: imports torch alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import re
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.errors import PipelineError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
ALLOWED = "auto, cpu, cuda, cuda:N"


def check_device_name(name: object) -> None:
    """Raise unless ``name`` is spelled as the ``device`` param allows (availability aside)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise PipelineError(f"device = {name!r} is not allowed; allowed: {ALLOWED}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (the ``device`` param) means on this machine.

    Raises PipelineError (one line naming ``device``) for a bad spelling, for CUDA on a machine
    without it, and for a GPU index out of range. On CUDA, ``exact_cuda`` switches TF32 off so
    that matmuls and convolutions are true float32: fast and naive profiling then agree to
    1e-4 and GPU tables to CPU ones to 1e-3.
    """
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PipelineError(
            f"device = {name!r}: no CUDA GPU is available on this machine; allowed here: auto, cpu"
        )
    count = torch.cuda.device_count()
    device = torch.device(name if ":" in name else "cuda:0")
    if device.index >= count:
        raise PipelineError(
            f"device = {name!r}: this machine has {count} CUDA GPU(s); "
            f"allowed: auto, cpu, cuda, cuda:0 ... cuda:{count - 1}"
        )
    exact_cuda()
    return device


def exact_cuda() -> None:
    """True float32 matmuls and convolutions on CUDA (PyTorch's cuDNN default is TF32), and
    deterministic cuDNN algorithms, so that a rerun on the same GPU gives the same bytes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def device_identity(name: str) -> str:
    """What the ``device`` param runs on here, as results depend on it: ``cpu``, or ``cuda``
    with the GPU's model name (``auto`` resolves first, so a CPU's and a GPU's results are told
    apart)."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device.type
    return f"cuda ({torch.cuda.get_device_name(device)})"


# profile.precision: what the per-level passes compute in (sums stay float64)
PRECISIONS = ("fp32", "tf32", "bf16")
# (rtol, share of the largest logit) within which the fast engine's pass with the layer's own
# weight must reproduce the float32 model: a structural error is off by far more
CHECK_TOLERANCE = {"fp32": (1e-3, 1e-4), "tf32": (3e-2, 3e-2), "bf16": (1e-1, 1e-1)}


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Run the block's matmuls and convolutions in ``name`` on ``device``: fp32 exactly; tf32
    on a CUDA GPU's tensor cores (10-bit mantissa products, float32 sums); bf16 by autocast
    (CUDA, or a CPU with native bf16: AVX512-BF16 or AMX), outputs bfloat16."""
    if name not in PRECISIONS:
        raise PipelineError(f"profile.precision = {name!r} is not allowed; allowed: {PRECISIONS}")
    if name == "fp32":
        yield
        return
    if name == "tf32":
        if device.type != "cuda":
            raise PipelineError(
                f"profile.precision = tf32 needs a CUDA GPU (this task runs on {device}); "
                "allowed on a CPU: fp32, bf16 (on a CPU with native bf16)"
            )
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return
    if device.type == "cpu" and not cpu_bf16():
        raise PipelineError(
            "profile.precision = bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) would "
            "be slower than fp32; allowed here: fp32"
        )
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MB for reuse instead of handing them
    back to the OS (mmap threshold 32 MB, heap trimmed above 512 MB free), once per process.

    A CPU pass allocates activations of a few MB; by default each is a fresh mmap whose pages
    fault in on first touch. Measured on 2 cores (ResNet-20, 256 images x 41 levels, three
    layers): the naive engine 22.6 -> 19.6 s, the fast one 9.4 -> 8.3 s. False where the C
    library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        return bool(libc.mallopt(mmap_threshold, 32 << 20)) and bool(
            libc.mallopt(trim_threshold, 512 << 20)
        )
    except (OSError, AttributeError):
        return False
