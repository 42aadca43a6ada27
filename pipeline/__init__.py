"""The rdprune library: layer-adaptive weight pruning by rate-distortion optimisation (Xu et
al., ICCV 2023), grouped by what each part owns.

The core is pure (tensors and arrays in and out; no ray, mlflow, dvc or file I/O):

- ``nn``: the network and its data: device, model registry, datasets, prunable layers,
  forward passes and accuracy, training.
- ``pruning``: masks, patch statistics, BatchNorm after pruning, the repair and its ridge
  solvers, the iterative schedule's rounds.
- ``profiling``: the per-layer distortion curves and the engines that measure them.
- ``allocation``: the allocation problem, rd and the baselines, the exact MCKP solver,
  refinement, candidate selection, progressive allocation.

Around it:

- ``config``: the params dataclasses (the one home of each param's meaning and default),
  loading and validation, the generated params reference.
- ``edges``: what touches the world: file formats (``io``, ``tables``, ``export``), Ray
  (``parallel``, the only importer of ray), MLflow (``tracking``, the only importer of
  mlflow), figures, and the stage glue the scripts in ``stages/`` call.
"""

__version__ = "0.1.0"
