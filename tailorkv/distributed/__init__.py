"""Tensor-parallel process groups and the collectives the model needs (torch.distributed)."""
