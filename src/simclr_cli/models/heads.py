"""Projection head g, SIMCLR.md section 2: z = g(h)."""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, layers: int, hidden_dim: int = 0, out_dim: int = 128) -> nn.Module:
    """Build g.

    Args:
        in_dim: width of h.
        layers: 0 identity; 1 linear; 2 the v1 MLP Linear-ReLU-Linear; 3 the v2 MLP
            with BN, Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN (no bias before BN).
        hidden_dim: hidden width, 0 means ``in_dim``.
        out_dim: width of z (128 in the paper).

    Returns:
        An ``nn.Sequential`` (or ``nn.Identity``); its children are the layers that
        ``--from-head-layer K`` counts (each Linear with its BN/ReLU is one layer).
    """
    hidden = hidden_dim or in_dim
    if layers == 0:
        return nn.Identity()
    if layers == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if layers == 2:
        return nn.Sequential(nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True)), nn.Linear(hidden, out_dim))
    if layers == 3:
        return nn.Sequential(
            nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Linear(hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=True)),
        )
    raise ValueError(f"proj_layers must be 0, 1, 2 or 3, got {layers}")
