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

import math
from typing import Any

import torch
from torch import fx, nn
from torch.func import functional_call

from pipeline.batchnorm import BN_TYPES
from pipeline.patches import Candidate, candidate_params


class NotTraceable(Exception):
    """torch.fx cannot trace the model, or the layer is not a traced module call."""


def _map(value: Any, fn) -> Any:
    return fx.node.map_aggregate(value, lambda v: fn(v) if isinstance(v, fx.Node) else v)


class SuffixRunner:
    """Evaluate the network with one prunable layer's weight replaced, recomputing only the
    operations downstream of that layer."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable Python
            raise NotTraceable(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
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
        self.last_use = {}
        for i, node in enumerate(self.order):
            for a in node.all_input_nodes:
                self.last_use[a] = i

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
            env[node] = value.repeat(groups, *([1] * (value.dim() - 1))) if tiled else value
        for i, node in enumerate(self.order):
            if node.op == "output":
                break
            if node in self.sites:
                (inp,) = _map(node.args, env.__getitem__)
                chunks = inp.chunk(groups) if inp.shape[0] == groups * n else [inp] * groups
                env[node] = torch.cat(
                    [
                        functional_call(self.module, candidate_params(w), (c,))
                        for w, c in zip(weights, chunks, strict=True)
                    ]
                )
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
