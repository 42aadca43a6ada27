"""rdprune: layer-adaptive weight pruning by rate-distortion optimisation (Xu et al., ICCV 2023).

Pure modules (no ray / mlflow / file I/O): config, layers, masking, models, evaluation,
training, distortion, allocation, plots. Edge modules: ``io`` (formats), ``parallel`` (the only
importer of ray), ``tracking`` (the only importer of mlflow). ``data`` reads datasets that ship
with a dependency or live under ``data.root``.
"""

__version__ = "0.1.0"
