"""Tensor-parallel process management: rank state, process groups, and the control plane."""
