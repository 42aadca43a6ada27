"""Suffix-only recomputation: re-run only the operations a pruned layer can change.

Pruning layer l leaves everything upstream of l unchanged. ``SuffixRunner`` traces the model
with torch.fx once. It marks the nodes downstream of l's call sites, which are the only nodes
whose values change. It runs the dense graph on a calibration batch, keeping just the
upstream values the downstream nodes read. Then, for a chunk of G sparsity levels at once, it
executes only the downstream nodes on a batch G times larger. At each call site of l, every
level applies its own pruned weight to its share of the batch; every upstream tensor that
carries the batch dimension is tiled G times. Residual additions, concatenations and nodes
with several consumers are ordinary graph edges here, so they are handled exactly.

Pure: no I/O, no Ray.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from pipeline.profiling.fusion import FusedConv, fuse_pointwise
from pipeline.pruning.batchnorm import BN_TYPES, Moments
from pipeline.pruning.patches import CONV_TYPES, Candidate, candidate_params


class NotTraceable(Exception):
    """torch.fx cannot trace the model, or the layer is not a traced module call."""


def _map(value: Any, fn) -> Any:
    return fx.node.map_aggregate(value, lambda v: fn(v) if isinstance(v, fx.Node) else v)


class SuffixRunner:
    """Evaluate the network with one prunable layer's weight replaced, recomputing only the
    operations downstream of that layer."""

    def __init__(self, model: nn.Module, layer: str, optimize: bool = True) -> None:
        """``optimize``: run a copy of the model with every other BatchNorm folded into the
        convolution it follows and 2-D convolutions in channels-last layout (``optimized``);
        the layer's own BatchNorm is folded into each level's weight in ``run``. Same values
        up to float rounding, about twice the CPU throughput of the model as written."""
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable Python
            raise NotTraceable(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
        self.reference = traced  # the model as given (its parameters): what checks compare to
        self.gm = optimized(traced, layer) if optimize else traced
        self.layer = layer
        self.module = self.gm.get_submodule(layer)
        nodes = list(self.gm.graph.nodes)
        self.sites = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if not self.sites:
            raise NotTraceable(f"layer {layer!r} is not called as a module in the traced graph")
        self.downstream = self._descendants(self.sites)
        self.order = [n for n in nodes if n in self.downstream]
        (self.output,) = [n for n in nodes if n.op == "output"]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotTraceable("only models with a single input are supported")
        self.batched = self._descendants(placeholders)  # values that carry the batch dimension
        self.frontier = {
            a for n in self.order for a in n.all_input_nodes if a not in self.downstream
        }
        # The BatchNorm that alone consumes the layer's output (corrected while profiling).
        (site,) = self.sites if len(self.sites) == 1 else (None,)
        users = list(site.users) if site is not None else []
        self.bn_node = (
            users[0]
            if len(users) == 1
            and users[0].op == "call_module"
            and isinstance(self.gm.get_submodule(users[0].target), BN_TYPES)
            else None
        )
        bn = self.gm.get_submodule(self.bn_node.target) if self.bn_node is not None else None
        # the layer's BatchNorm folded into each level's weight: one op fewer per level
        self.fold_consumer = (
            optimize
            and bn is not None
            and foldable(self.module, bn)
            and len(self.bn_node.args) == 1
            and not self.bn_node.kwargs
        )
        self.mutates = any(_may_write_in_place(self.gm, n) for n in self.order)
        self.last_use = {}
        for i, node in enumerate(self.order):
            for a in node.all_input_nodes:
                self.last_use[a] = i
        self._consume_residuals()

    def _consume_residuals(self) -> None:
        """Let each fused conv + add downstream write into its residual where ``run`` made
        that tensor itself (a convolution's output, not a kept upstream value), the fused
        conv does not read it, and nothing can afterwards: its other readers are convolutions
        (never an alias of their input, as a view, ``nn.Identity`` or an eval-mode dropout
        would be) that run before. One copy fewer per block and level."""

        def conv_call(node: fx.Node) -> bool:
            return node.op == "call_module" and type(self.gm.get_submodule(node.target)) in (
                nn.Conv2d,
                FusedConv,
            )

        for i, node in enumerate(self.order):
            module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            if not isinstance(module, FusedConv) or not module.add:
                continue
            x, other = node.args
            module.consume = (
                other in self.downstream
                and other not in self.sites
                and conv_call(other)
                and x is not other
                and all(conv_call(user) for user in other.users if user is not node)
                and self.last_use.get(other) == i
            )

    @staticmethod
    def _descendants(roots: list[fx.Node]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.users)
        return seen

    def _exec(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = _map(node.args, env.__getitem__)
        kwargs = _map(node.kwargs, env.__getitem__)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "get_attr":
            return getattr(self.gm, node.target)
        raise NotTraceable(f"unsupported node {node.op}")

    @torch.no_grad()
    def upstream(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Dense values of the frontier (upstream values downstream nodes read) for batch x."""
        env: dict[fx.Node, Any] = {}
        keep = self.frontier
        remaining_users = {n: len(n.users) for n in self.gm.graph.nodes}
        for node in self.gm.graph.nodes:
            if node in self.downstream or node.op == "output":
                continue
            env[node] = x if node.op == "placeholder" else self._exec(node, env)
            for a in node.all_input_nodes:  # free upstream values nothing else needs
                remaining_users[a] -= 1
                if remaining_users[a] == 0 and a not in keep:
                    env.pop(a, None)
        return {n: env[n] for n in keep}

    def layer_input(self, frontier: dict[fx.Node, Any]) -> torch.Tensor:
        """The layer's input (N, ...) on the batch of ``frontier`` (single call site only)."""
        (inp,) = _map(self.sites[0].args, frontier.__getitem__)
        return inp

    @torch.no_grad()
    def layer_outputs(
        self, frontier: dict[fx.Node, Any], weights: list[Candidate]
    ) -> list[torch.Tensor]:
        """The layer's output (N, C, ...) for each candidate (a weight or parameters; single
        call site only)."""
        inp = self.layer_input(frontier)
        return [functional_call(self.module, candidate_params(w), (inp,)) for w in weights]

    def _apply(self, candidate: Candidate, x: torch.Tensor, stats: Moments | None) -> torch.Tensor:
        """The layer with ``candidate``'s parameters on x; with ``fold_consumer``, its
        BatchNorm too, by ``stats`` (mean, var) or its running statistics, folded into the
        weight and bias."""
        if not self.fold_consumer:
            return functional_call(self.module, candidate_params(candidate), (x,))
        given = candidate_params(candidate)
        weight, bias = given["weight"], given.get("bias", self.module.bias)
        bn = self.gm.get_submodule(self.bn_node.target)
        mean, var = stats if stats is not None else (bn.running_mean, bn.running_var)
        weight, bias = fold(weight, bias, bn, mean, var)
        return self.module._conv_forward(x, weight, bias)

    def _batch_norm(self, node: fx.Node, x: torch.Tensor, stats: list, groups: int) -> torch.Tensor:
        bn = self.gm.get_submodule(node.target)
        out = []
        for chunk, st in zip(x.chunk(groups), stats, strict=True):
            mean, var = st if st is not None else (bn.running_mean, bn.running_var)
            out.append(
                nn.functional.batch_norm(chunk, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
            )
        return torch.cat(out)

    @torch.no_grad()
    def run(
        self,
        frontier: dict[fx.Node, Any],
        weights: list[Candidate],
        bn_stats: list | None = None,
    ) -> torch.Tensor:
        """Logits (G * N, classes) for G candidates of the layer (a weight, or parameters:
        ``patches.Candidate``); rows g*N..(g+1)*N-1 belong to weights[g]. frontier: from
        ``upstream`` on a batch of N samples. bn_stats: per weight, (mean, var) replacing the
        running statistics of ``bn_node``, or None to keep them."""
        groups = len(weights)
        n = next(
            v.shape[0] for k, v in frontier.items() if k in self.batched and torch.is_tensor(v)
        )
        env: dict[fx.Node, Any] = {}
        for node, value in frontier.items():
            tiled = (
                node in self.batched
                and torch.is_tensor(value)
                and value.dim() > 0
                and value.shape[0] == n
            )
            # cat keeps the layout (repeat does not); one level reads the kept frontier
            # itself unless a downstream op may write into it (it is reused by later passes)
            fresh = tiled and (groups > 1 or self.mutates)
            env[node] = torch.cat([value] * groups) if fresh else value
        for i, node in enumerate(self.order):
            if node.op == "output":
                break
            if node in self.sites:
                (inp,) = _map(node.args, env.__getitem__)
                chunks = inp.chunk(groups) if inp.shape[0] == groups * n else [inp] * groups
                stats = bn_stats if bn_stats is not None else [None] * groups
                outs = [
                    self._apply(w, c, st) for w, c, st in zip(weights, chunks, stats, strict=True)
                ]
                env[node] = torch.cat(outs) if len(outs) > 1 else outs[0]
            elif node is self.bn_node and self.fold_consumer:
                env[node] = env[node.args[0]]  # already applied by _apply
            elif node is self.bn_node and bn_stats is not None:
                env[node] = self._batch_norm(node, env[node.args[0]], bn_stats, groups)
            else:
                env[node] = self._exec(node, env)
            for a in node.all_input_nodes:  # free what later nodes no longer read
                if self.last_use.get(a) == i:
                    env.pop(a, None)
        result = _map(self.output.args[0], env.__getitem__)
        if not torch.is_tensor(result):
            raise NotTraceable("the model's output is not a single tensor")
        return result

    def bytes_per_sample(self, frontier: dict[fx.Node, Any]) -> int:
        """Rough memory one sample of one level costs in ``run``: the frontier it tiles plus
        the widest downstream values (bounded by twice the frontier's size)."""
        n = next(
            v.shape[0] for k, v in frontier.items() if k in self.batched and torch.is_tensor(v)
        )
        tiled = sum(v.numel() * v.element_size() for v in frontier.values() if torch.is_tensor(v))
        return max(1, math.ceil(3 * tiled / max(n, 1)))


def _may_write_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may modify one of its inputs: ``x.add_(y)``, ``torch.relu_``,
    ``inplace=True``, ``x[i] = y``, ``+=`` (fx records it as ``iadd``), an ``nn.ReLU(inplace=
    True)``. Conservative: a name ending in one underscore counts."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in (operator.setitem, operator.iadd, operator.imul) or (
            name.endswith("_") and not name.endswith("__")
        )
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def consumer_batchnorm(model: nn.Module, layer: str) -> str | None:
    """Name of the BatchNorm that alone consumes ``layer``'s output, if any (None also when the
    model cannot be traced)."""
    try:
        runner = SuffixRunner(model, layer)
    except NotTraceable:
        return None
    return runner.bn_node.target if runner.bn_node is not None else None


def batchnorm_consumers(model: nn.Module) -> dict[str, str]:
    """``{module name: BatchNorm name}`` for every module called once whose output only a
    BatchNorm reads, from one trace (empty when the model cannot be traced)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # fx raises many types for untraceable Python
        return {}
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    out = {}
    for name, sites in calls.items():
        users = list(sites[0].users) if len(sites) == 1 else []
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(gm.get_submodule(users[0].target), BN_TYPES)
        ):
            out[name] = users[0].target
    return out


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` after ``conv`` is a fixed per-channel affine map (eval mode, running
    statistics) that ``fold`` can merge into the convolution's weight and bias."""
    return (
        type(conv) in CONV_TYPES
        and isinstance(bn, BN_TYPES)
        and not bn.training
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def fold(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: nn.Module,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's (weight (C_out, ...), bias (C_out,) or None) followed by ``bn`` with
    statistics (mean, var) (C_out,): the one convolution computing both."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale if bias is None else (bias - mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift


def optimized(traced: fx.GraphModule, layer: str) -> fx.GraphModule:
    """A copy of ``traced`` that computes the same function faster: each BatchNorm that alone
    consumes a convolution called once (other than ``layer``) folded into it, the ReLU (and
    residual addition) after such a convolution applied inside it on a CPU (fusion.py), and
    2-D convolutions' weights in channels-last layout (their outputs follow; oneDNN's fastest
    layout on a CPU, and tensor cores' on a GPU)."""
    gm = copy.deepcopy(traced)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        (src,) = node.args
        if not isinstance(src, fx.Node) or src.op != "call_module" or src.target == layer:
            continue
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        if not foldable(conv, bn) or len(src.users) != 1 or calls[src.target] > 1:
            continue
        if calls[node.target] > 1:
            continue
        weight, bias = fold(conv.weight, conv.bias, bn, bn.running_mean, bn.running_var)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    fuse_pointwise(gm, layer, calls)
    for name, module in gm.named_modules():
        if isinstance(module, nn.Conv2d) and name != layer:
            module.weight = nn.Parameter(
                module.weight.detach().contiguous(memory_format=torch.channels_last),
                requires_grad=False,
            )
    gm.graph.lint()
    gm.recompile()
    return gm
