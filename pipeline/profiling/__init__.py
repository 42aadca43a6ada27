"""Profiling: each prunable layer's output distortion at every sparsity of the grid, measured
by the naive engine (a full forward pass per level) or the fast one (suffix-only
recomputation), cut into work units that run anywhere."""
