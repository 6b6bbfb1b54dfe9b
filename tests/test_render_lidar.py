"""LiDAR-seeded Gaussians (recon.lidar_points) used by the renderer benchmark."""

from __future__ import annotations

import math

import torch

from recon.lidar_points import (
    gaussians_from_lidar,
    jitter_duplicate,
    neighbour_scales,
    voxel_downsample,
)
from scenes.synthetic import SyntheticConfig, generate_log


def test_neighbour_scales_on_a_grid():
    # A 10 x 10 x 1 grid of spacing 0.5: 3 nearest neighbours at 0.5 (interior points).
    ij = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij"), -1)
    pts = torch.cat([ij.reshape(-1, 2).float() * 0.5, torch.zeros(100, 1)], 1)
    s = neighbour_scales(pts, voxel_size=0.5).reshape(10, 10)
    assert torch.allclose(s[1:-1, 1:-1], torch.tensor(0.5))
    # Corners: two neighbours at 0.5 and one diagonal at 0.5 sqrt(2).
    assert math.isclose(float(s[0, 0]), math.sqrt((0.25 + 0.25 + 0.5) / 3), rel_tol=1e-5)
    # A lone point far away falls back to the voxel size.
    s2 = neighbour_scales(torch.cat([pts, torch.tensor([[50.0, 50.0, 0.0]])]), 0.5)
    assert s2[-1] == 0.5


def test_voxel_downsample_hits_the_budget():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(20000, 3, generator=g) * torch.tensor([20.0, 20.0, 0.2])
    frame = torch.randint(0, 4, (20000,), generator=g)
    c, f, size = voxel_downsample(pts, frame, 3000)
    assert len(c) == 3000 and len(f) == 3000 and 0.1 < size < 1.0
    # One centroid per voxel of the chosen size.
    keys = torch.floor(c / size).long()
    assert len(torch.unique(keys, dim=0)) == len(keys)
    c_all, _, _ = voxel_downsample(pts, frame, 10**6)
    assert len(c_all) <= 20000


def test_gaussians_from_synthetic_lidar():
    log = generate_log(SyntheticConfig(seed=0, frames=2, width=64, height=36))
    g = gaussians_from_lidar(log, 4000)
    assert len(g) == 4000
    assert g.means.shape == (4000, 3) and g.colors.shape == (4000, 3)
    assert torch.isfinite(g.scales).all() and (g.scales > 0).all()
    assert (g.scales < 5 * g.voxel_size).all()
    assert torch.all(g.quats == torch.tensor([1.0, 0, 0, 0]))
    assert torch.all(g.opacities == 0.7)
    assert (g.colors >= 0).all() and (g.colors <= 1).all()
    seen = (g.colors != 0.5).any(1)
    # Front cameras see part of a 360-degree sweep, and the depth test drops points hidden
    # behind nearer returns (at 64x36 a pixel spans many returns).
    assert 0.1 < seen.float().mean() < 1.0
    big = jitter_duplicate(g, 6000)
    assert len(big) == 6000
    assert math.isclose(float(big.scales[0, 0] / g.scales[0, 0]), math.sqrt(4000 / 6000),
                        rel_tol=1e-5)
