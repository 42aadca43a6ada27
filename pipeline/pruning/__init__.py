"""Pruning itself: magnitude masks, patch statistics, BatchNorm after pruning, the repair of
kept weights and its ridge solvers, and the iterative schedule's rounds."""
