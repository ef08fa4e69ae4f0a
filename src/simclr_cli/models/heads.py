"""Projection head g, SIMCLR.md section 2: z = g(h)."""

from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, layers: int, hidden_dim: int = 0, out_dim: int = 128) -> nn.Module:
    """Build g.

    Args:
        in_dim: width of h.
        layers: 0 identity; 1 linear; 2 the v1 MLP Linear-ReLU-Linear; 3 the v2 MLP
            with BN, Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN (no bias before BN; the last BN
            has a scale but no shift, as the reference's ``center=False``).
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
            nn.Sequential(nn.Linear(hidden, out_dim, bias=False), _batchnorm_without_bias(out_dim)),
        )
    raise ValueError(f"proj_layers must be 0, 1, 2 or 3, got {layers}")


def _batchnorm_without_bias(dim: int) -> nn.BatchNorm1d:
    """BN with a learned scale and no learned shift (the reference's last head layer, ``center=False``).

    The shift stays a zero parameter that never trains (``requires_grad=False``), so the state_dict
    keys are those of a plain BN: checkpoints written before this change still load, and keep the
    shift they learned.
    """
    bn = nn.BatchNorm1d(dim, affine=True)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn
