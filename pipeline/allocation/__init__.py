"""Allocation: per-layer sparsities under a network-level budget: the problem, rd (the exact
multiple-choice knapsack over the profiled curves) and the baselines, refinement on a
measured objective, candidate selection and progressive allocation."""
