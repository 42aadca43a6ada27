"""A prunable layer as a matrix product over input patches, and the patch statistics both the
BatchNorm rules and the repair are computed from.

Every Conv1d/2d/3d and Linear computes, per group g, ``y = W_g p + b`` over input patches p of
length D = in_channels / groups x kernel elements (a Linear: one group, D = in_features, one
patch per row of its input). ``unfold`` gives those patches as float64 (G, D, M) columns in the
weight's own (channel-major) order, for any stride, padding (numbers, "same", "valid", any
padding mode), dilation and groups, and Linear inputs (N, F) or (N, ..., F).

``PatchMoments`` accumulates the patches' sum and Gram matrix over batches in float64. From
them alone come (a) the exact per-channel mean and variance of the layer's output for any
number of candidate weights (what a consuming BatchNorm receives, no pass per candidate) and
(b) the normal equations of the repair (repair.py). ``layer_patch_moments`` runs a model on a
calibration set just far enough to fill them.

Pure: no I/O, no Ray.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.nn.device import model_device

Moments = tuple[torch.Tensor, torch.Tensor]  # per-channel (mean, var), each (C,) float32
# A candidate for a layer's parameters: its weight, or {"weight": w, "bias": b} (a repair
# re-solves the bias too); parameters a dict leaves out are the module's own.
Candidate = torch.Tensor | dict[str, torch.Tensor]


def candidate_params(candidate: Candidate) -> dict[str, torch.Tensor]:
    """The parameters a candidate replaces, as ``functional_call`` takes them."""
    return candidate if isinstance(candidate, dict) else {"weight": candidate}


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def supported(module: nn.Module) -> bool:
    """Whether ``unfold`` covers the module (every prunable type: convs and Linear)."""
    return type(module) in (*CONV_TYPES, nn.Linear)


def patch_width(module: nn.Module) -> int:
    """D: the length of one patch (in_channels / groups x kernel elements; Linear: in_features)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, CONV_TYPES) else 1


def _conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, C_in * prod(kernel), positions) patches of a conv input x (n, C_in, *spatial)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice  # how the module pads ("same" included)
    if any(pad):
        x = nn.functional.pad(x, pad, mode=mode)
    if isinstance(module, nn.Conv2d):  # the fast path
        return nn.functional.unfold(x, module.kernel_size, module.dilation, 0, module.stride)
    dims = len(module.kernel_size)
    for d, (k, s, dil) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]  # window axis appended
    # (n, C, *out, *kernel) -> (n, C, *kernel, *out): channel-major like the weight
    n, c = x.shape[:2]
    order = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    x = x.permute(order)
    return x.reshape(n, c * math.prod(module.kernel_size), -1)


def unfold(module: nn.Module, inp: torch.Tensor, budget: int) -> Iterator[torch.Tensor]:
    """The patches of a batch of the layer's input as float64 (G, D, M) chunks, each bounded
    by about ``budget`` bytes (at least one sample per chunk)."""
    if isinstance(module, nn.Linear):
        rows = inp.reshape(-1, inp.shape[-1])  # (N, ..., F): one patch per row
        step = max(1, budget // (8 * 2 * rows.shape[1]))
        for i in range(0, len(rows), step):
            yield rows[i : i + step].to(torch.float64).T.unsqueeze(0)  # (1, D, m)
        return
    g, d = groups(module), patch_width(module)
    positions = math.prod(
        (size + sum(p) - dil * (k - 1) - 1) // s + 1
        for size, k, s, dil, p in zip(
            inp.shape[2:],
            module.kernel_size,
            module.stride,
            module.dilation,
            _pairs(module._reversed_padding_repeated_twice),
            strict=True,
        )
    )
    per_sample = max(1, g * d * positions)
    step = max(1, budget // (8 * 2 * per_sample))  # float64, and a transposed copy
    for i in range(0, len(inp), step):
        cols = _conv_patches(module, inp[i : i + step])  # (n, G * D, L)
        yield cols.to(torch.float64).transpose(0, 1).reshape(g, d, -1)


def _pairs(reversed_padding: list[int]) -> list[tuple[int, int]]:
    """Per spatial dim (first to last), (before, after) from F.pad's reversed layout."""
    pairs = [tuple(reversed_padding[i : i + 2]) for i in range(0, len(reversed_padding), 2)]
    return list(reversed(pairs))


class PatchMoments:
    """Sum and Gram matrix (float64) of a layer's input patches over batches.

    An output channel is w . p + b over patches p, so its mean over samples and positions is
    w . E[p] + b and its variance w^T Cov[p] w: the patch moments cost one pass over the
    inputs whatever the number of candidate weights; each then costs a (C_out x D x D)
    product instead of running the layer on the whole calibration set.
    """

    def __init__(self, module: nn.Module, budget: int) -> None:
        self.module, self.budget = module, budget
        self.input_dim: int | None = None  # of the inputs seen: (N, F) or (N, T, F) Linear
        self.total: torch.Tensor | None = None  # (G, D) sum of patches
        self.gram: torch.Tensor | None = None  # (G, D, D) sum of patch outer products
        self.count = 0  # patches per group: samples x output positions

    @classmethod
    def of(
        cls, module: nn.Module, inp: torch.Tensor, budget: int, for_bn: bool = True
    ) -> PatchMoments | None:
        """An accumulator for ``module`` fed inputs shaped like ``inp``, if ``unfold`` covers
        it; ``for_bn``: only where they give what a BatchNorm over dim 1 of the output
        receives (``channel_moments``)."""
        if not supported(module):
            return None
        moments = cls(module, budget)
        moments.input_dim = inp.dim()
        return moments if moments.channel_moments or not for_bn else None

    @property
    def channel_moments(self) -> bool:
        """Whether ``stats`` are per-channel moments of what a BatchNorm over dim 1 of the
        output receives: every conv, and a Linear on (N, features) only (on (N, T, F) a
        BatchNorm's channels are not its features)."""
        return not isinstance(self.module, nn.Linear) or self.input_dim in (None, 2)

    def add(self, inp: torch.Tensor) -> None:
        """Accumulate the patches of a batch of the layer's input (N, ...)."""
        self.input_dim = inp.dim()
        for cols in unfold(self.module, inp, self.budget):
            self.add_columns(cols)

    def add_columns(self, cols: torch.Tensor) -> None:
        """Accumulate patches already unfolded: (G, D, m) float64."""
        s, g = cols.sum(2), torch.bmm(cols, cols.transpose(1, 2))
        self.total = s if self.total is None else self.total + s
        self.gram = g if self.gram is None else self.gram + g
        self.count += cols.shape[2]

    def stats(self, candidates: list[Candidate]) -> list[Moments]:
        """Per candidate (a weight shaped like the layer's, or parameters), the output's
        (mean, var) float32 (C_out,)."""
        mean = self.total / self.count  # (G, D)
        cov = self.gram / self.count - mean.unsqueeze(2) * mean.unsqueeze(1)
        out = []
        for candidate in candidates:
            given = candidate_params(candidate)
            w, bias = given["weight"], given.get("bias", self.module.bias)
            w = w.to(torch.float64).reshape(mean.shape[0], -1, mean.shape[1])  # (G, C/G, D)
            m = torch.bmm(w, mean.unsqueeze(2)).flatten()
            v = (torch.bmm(w, cov) * w).sum(2).flatten().clamp_min(0)
            if bias is not None:
                m = m + bias.to(torch.float64)
            out.append((m.to(torch.float32), v.to(torch.float32)))
        return out


class StopForward(Exception):
    """Raised by a hook to stop a forward pass once the wanted input has been seen."""


@torch.no_grad()
def calls_per_forward(
    model: nn.Module, layers: list[nn.Module], probe: torch.Tensor
) -> tuple[list[int], list[int]]:
    """How often a forward pass of ``probe`` (1, ...) calls each of ``layers``, and the order in
    which they are first called: (counts in ``layers`` order, indices in first-call order;
    layers never called are left out of the order)."""
    counts = [0] * len(layers)
    order: list[int] = []

    def hook(i: int):
        def record(module: nn.Module, args: tuple) -> None:
            counts[i] += 1
            order.append(i)

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    model.eval()
    try:
        model(probe.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return counts, list(dict.fromkeys(order))


@torch.no_grad()
def layer_inputs(
    models: list[nn.Module], layers: list[nn.Module], batch: torch.Tensor, calls: int
) -> list[list[torch.Tensor]]:
    """What each ``layers[i]`` receives in ``models[i]`` on ``batch`` (N, ...), one tensor per
    call (``calls`` per forward), from forward passes stopped after the last call."""
    seen: list[list[torch.Tensor]] = []
    for model, layer in zip(models, layers, strict=True):
        got: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple, got=got) -> None:
            # several calls: a later in-place op must not change an input already recorded
            got.append(args[0].clone() if calls > 1 else args[0])
            if len(got) == calls:
                raise StopForward

        handle = layer.register_forward_pre_hook(record)
        model.eval()
        try:
            with contextlib.suppress(StopForward):
                model(batch.to(model_device(model)))
        finally:
            handle.remove()
        seen.append(got)
    return seen


@torch.no_grad()
def layer_patch_moments(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    batch_size: int,
    budget: int,
    for_bn: bool = True,
) -> PatchMoments | None:
    """``PatchMoments`` of what ``layer`` receives over ``inputs`` (N, ...) in ``model`` (every
    call of a forward pass), from passes stopped after its last call. ``for_bn``: None where
    the moments are not a BatchNorm's channels (``PatchMoments.of``). ``budget`` bounds the
    bytes of the patches held at once."""
    (calls,), _ = calls_per_forward(model, [layer], inputs[:1])
    if calls == 0:
        return None
    patches: PatchMoments | None = None
    for start in range(0, len(inputs), batch_size):
        (got,) = layer_inputs([model], [layer], inputs[start : start + batch_size], calls)
        if patches is None:
            patches = PatchMoments.of(layer, got[0], budget, for_bn=for_bn)
            if patches is None:
                return None
        for inp in got:
            patches.add(inp)
    return patches
