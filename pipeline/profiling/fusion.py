"""Convolution + ReLU (and convolution + residual add + ReLU) as one oneDNN call on a CPU.

The fast engine's suffix passes on a CPU spend most of their time in 2-D convolutions, and
about a fifth more writing and re-reading every activation for the ReLU and the residual
addition that follow them. oneDNN applies both inside the convolution's own loop (post-ops,
what ``torch.compile``'s CPU backend calls); ``fuse_pointwise`` rewrites an fx graph so that
each such chain is one call of ``FusedConv``. The ReLU is exact and the add is the same single
float32 addition, so the values equal the separate ops' for channels-last inputs, as the
optimized model feeds them (tested); a 1x1 or depthwise convolution on an NCHW input may
differ in the last bit. The fast engine's self-check compares every layer's suffix with the
model as given. Anywhere else (a GPU, another dtype, autocast, a shape the post-op cannot
take) ``FusedConv`` runs the separate ops.

Pure: no I/O, no Ray.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn

_RELU_FUNCTIONS = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@functools.cache
def pointwise_op():
    """oneDNN's fused convolution (None where this torch build has none), looked up once."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def accumulating_op():
    """Its variant that adds the convolution into a given tensor (oneDNN's sum post-op),
    looked up once; None where missing."""
    if pointwise_op() is None:
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


class FusedConv(nn.Module):
    """``relu?(conv(x) [+ other])`` for a 2-D convolution with zero padding; one oneDNN call
    for float32 CPU tensors outside autocast, the separate ops otherwise.

    x: (N, C_in, H, W); other: (N, C_out, H_out, W_out), the residual added before the ReLU.
    """

    def __init__(self, conv: nn.Conv2d, add: bool, relu: bool) -> None:
        super().__init__()
        self.conv, self.add, self.relu = conv, add, relu
        # set by whoever runs the graph: ``other`` is a fresh tensor nothing reads afterwards,
        # so the sum may be written into it instead of into a copy
        self.consume = False

    def _fusable(self, x: torch.Tensor, other: torch.Tensor | None) -> bool:
        conv = self.conv
        if not (
            x.device.type == "cpu"
            and x.dtype == conv.weight.dtype == torch.float32
            and x.dim() == 4
            and not torch.is_autocast_enabled("cpu")
            and pointwise_op() is not None
        ):
            return False
        if other is None:
            return True
        if not torch.is_tensor(other):  # conv + a Python number (x.shape[1], say)
            return False
        n, _, h, w = x.shape
        size = [
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                (h, w), conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
            )
        ]
        # oneDNN's sum post-op adds a tensor of the output's own shape: no broadcasting
        return other.dtype == x.dtype and tuple(other.shape) == (n, conv.out_channels, *size)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if not self._fusable(x, other):
            y = conv(x)
            if other is not None:
                y = y + other
            return torch.relu(y) if self.relu else y
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        x = x.contiguous(memory_format=torch.channels_last)
        if other is None:
            return pointwise_op()(x, conv.weight, conv.bias, *geometry, "relu", [], "")
        unary = "relu" if self.relu else None
        args = (conv.weight, conv.bias, *geometry, "add", None, unary, [], "")
        if conv.groups != 1 or accumulating_op() is None:
            # grouped: oneDNN's sum post-op adds the bias after the residual (1-2 ulp off)
            other = other.contiguous(memory_format=torch.channels_last)
            return pointwise_op().binary(x, other, *args)
        # Accumulating into the residual (or a copy) beat oneDNN's binary-add post-op by up to
        # 15 % (one core, 16x32x32 maps), the copy included; the same float32 additions.
        in_place = self.consume and other.is_contiguous(memory_format=torch.channels_last)
        out = other if in_place else other.clone(memory_format=torch.channels_last)
        return accumulating_op()(out, x, *args)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        extra = set(node.kwargs) - {"inplace"}
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not extra
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU) and len(node.args) == 1
    return False


def _residual(node: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``conv + other`` (either order), else None."""
    if node.op != "call_function" or node.target not in _ADD_FUNCTIONS or node.kwargs:
        return None
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    a, b = node.args
    if a is conv and b is not conv:
        return b
    if b is conv and a is not conv:
        return a
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: a name no module, parameter or buffer of
    ``gm`` has (add_submodule would silently replace one: ``blk.conv`` and ``blk_conv``)."""
    taken = {name for name, _ in gm.named_modules()}
    taken |= {name for name, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    name, i = base, 0
    while name in taken or hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def fuse_pointwise(gm: fx.GraphModule, skip: str, calls: dict[str, int]) -> int:
    """Rewrite ``gm`` in place: each 2-D convolution (other than ``skip``, called once per
    ``calls``) whose output feeds only a ReLU, or only an addition that alone feeds a ReLU,
    becomes one ``FusedConv`` call. Returns the number of chains fused. Float addition
    commutes exactly, so ``other + conv`` fuses too."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target == skip or calls.get(node.target, 0) != 1:
            continue
        conv = gm.get_submodule(node.target)
        if (
            type(conv) is not nn.Conv2d
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
            or len(node.args) != 1
            or node.kwargs
        ):
            continue
        user = _only_user(node)
        if user is None:
            continue
        other = _residual(user, node)
        tail = _only_user(user) if other is not None else user
        relu = tail is not None and _is_relu(gm, tail)
        if other is None and not relu:
            continue
        last = tail if relu else user
        name = _free_name(gm, f"{node.target.replace('.', '_')}_fused")
        gm.add_submodule(name, FusedConv(conv, add=other is not None, relu=relu))
        with gm.graph.inserting_before(last):
            args = (node.args[0],) if other is None else (node.args[0], other)
            new = gm.graph.call_module(name, args)
        last.replace_all_uses_with(new)
        for dead in [last, user, node] if relu and other is not None else [last, node]:
            gm.graph.erase_node(dead)
        fused += 1
    return fused
