"""Compute kernels: Triton kernels beside plain-torch references with the same signatures."""
