"""allocate: per-layer sparsities that minimise summed distortion under the budget, and the
Pareto front over a sweep of ratios."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.allocation.methods import pareto_front
from pipeline.config.params import Params
from pipeline.edges import io, tables
from pipeline.edges.choose import allocation_problem, choose_allocation, other_methods
from pipeline.edges.plots import allocations_figure, pareto_figure
from pipeline.edges.stage import load_model, log, run_stage
from pipeline.nn.layers import prunable_numel


def run(params: Params, paths: io.Paths) -> None:
    curves = tables.read_distortion(paths.distortion)
    meta = tables.read_table_metadata(paths.distortion)
    channels, classes = int(meta["rdprune.in_channels"]), int(meta["rdprune.num_classes"])
    model = load_model(params, paths.baseline, channels, classes, "baseline checkpoint")
    problem = allocation_problem(params, curves, model)
    chosen, allocation, measured = choose_allocation(params, paths, model, problem)
    allocation.check_matches(prunable_numel(model), str(paths.distortion))
    empty = [name for name, kept in allocation.kept_by_layer.items() if kept == 0]
    if empty:  # the network's output no longer depends on what comes before such a layer
        log.warning(
            "allocate: %d of %d layers keep no weight: %s",
            len(empty),
            len(allocation.layers),
            ", ".join(empty),
        )
    front, infeasible = pareto_front(params.allocate.method, problem, params.allocate.pareto_ratios)
    if infeasible:  # the sweep is a view; the limits the user set decide what can be met
        log.warning(
            "allocate: Pareto ratios %s cannot be met under the limits; skipped", infeasible
        )
    extra = {
        "rdprune.method": params.allocate.method,
        "rdprune.ratio": repr(params.prune.ratio),
        "rdprune.budget": params.allocate.budget,
        "rdprune.distortion": params.allocate.distortion,
        "rdprune.selected": chosen,
    }
    tables.write_allocation(paths.allocation, allocation, extra)
    tables.write_pareto(paths.pareto, front, extra)
    io.write_csv(
        paths.plot("allocation"),
        ["layer", "sparsity", "kept", "numel", "predicted_distortion"],
        list(
            zip(
                allocation.layers,
                allocation.sparsity.tolist(),
                allocation.kept.tolist(),
                allocation.numel.tolist(),
                allocation.predicted_distortion.tolist(),
                strict=True,
            )
        ),
    )
    columns = ["sparsity", "flops_reduction", "predicted_distortion"]
    rows = [(r, *(a.summary()[c] for c in columns)) for r, a in front]
    io.write_csv(paths.plot("pareto"), ["ratio", *columns], rows)
    compared = {chosen: allocation, **other_methods(problem, chosen)}
    io.write_figure(paths.figure("allocation"), allocations_figure(compared, params.prune.ratio))
    io.write_figure(
        paths.figure("pareto"),
        pareto_figure([r[0] for r in rows], [r[3] for r in rows], params.prune.ratio),
    )
    metrics = {
        **{
            name if name.startswith("refine.") else f"measured_distortion.{name}": value
            for name, value in measured.items()
        },
        **allocation.summary(),
        "ratio": params.prune.ratio,
        "pareto_infeasible": infeasible,
    }
    io.write_metrics(paths.metrics("allocate"), metrics)
    log.info(
        "allocate (%s, %s budget): sparsity %.4f, MACs removed %.4f, predicted distortion %.6g",
        params.allocate.method,
        params.allocate.budget,
        metrics["sparsity"],
        metrics["flops_reduction"],
        metrics["predicted_distortion"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(run, argv)


if __name__ == "__main__":
    sys.exit(main())
