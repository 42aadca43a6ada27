"""The one ``device`` param: which torch device every stage runs the model on.

``auto`` is the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda`` and
``cuda:N`` name one. Library functions never take this name: they take the model already on
its device and move each batch to it (``model_device``), so data follows the model.

Pure: imports torch alone.
"""

from __future__ import annotations

import itertools
import re

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
