"""recon.g3r.sparse: voxel hierarchy, sparse ops against dense references, the networks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from recon.g3r.sparse import (
    PointVoxelNet,
    SparseConv3d,
    SparseDown,
    SparseResUNet,
    SparseUp,
    VoxelHierarchy,
    build_hierarchy,
    scatter_mean,
    sparse_conv3d,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead, and on a loaded 2-core machine
    OpenMP spin-waits made gradcheck ~20x slower (23 s vs 1 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cloud(seed: int, n: int = 300, extent: float = 3.0) -> torch.Tensor:
    """Random points around the origin (negative coords included), float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 2 * extent


def dense_grid(coords: torch.Tensor, feats: torch.Tensor, origin: torch.Tensor, pad: int = 0):
    """Scatter ``feats [V, C]`` at ``coords`` into a dense ``[1, C, X, Y, Z]`` grid."""
    rel = coords - origin + pad
    size = (rel.amax(0) + 1 + pad).tolist()
    grid = feats.new_zeros(feats.shape[1], *size)
    grid[:, rel[:, 0], rel[:, 1], rel[:, 2]] = feats.T
    return grid[None], rel


# ---- hierarchy ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_hierarchy_matches_brute_force(seed: int):
    pts = cloud(seed)
    hier = build_hierarchy(pts, voxel_size=0.5, levels=3)
    assert hier.levels == 3 and len(hier.parent) == 2 and len(hier.child_offset) == 2
    # level 0: every point lands in the voxel that floor(p / s) names
    cells = torch.floor(pts / 0.5).long()
    assert torch.equal(hier.coords[0][hier.point_to_voxel], cells)
    assert torch.equal(hier.coords[0], torch.unique(cells, dim=0))  # sorted, deduped
    offsets = list(itertools.product((-1, 0, 1), repeat=3))
    for lvl in range(hier.levels):
        coords = hier.coords[lvl]
        lookup = {tuple(c): i for i, c in enumerate(coords.tolist())}
        ref = torch.tensor(
            [[lookup.get((x + dx, y + dy, z + dz), -1) for dx, dy, dz in offsets]
             for x, y, z in coords.tolist()]
        )
        assert torch.equal(hier.neighbours[lvl], ref)
        assert torch.equal(hier.neighbours[lvl][:, 13], torch.arange(len(coords)))
        if lvl < hier.levels - 1:
            par = hier.parent[lvl]
            halved = torch.div(coords, 2, rounding_mode="floor")
            assert torch.equal(hier.coords[lvl + 1][par], halved)
            bits = coords % 2
            assert torch.equal(hier.child_offset[lvl], bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2])
            # no two children share a (parent, octant) slot; every parent has a child
            slots = par * 8 + hier.child_offset[lvl]
            assert slots.unique().numel() == slots.numel()
            assert par.unique().numel() == hier.num_voxels[lvl + 1]


def test_hierarchy_edge_cases():
    with pytest.raises(ValueError, match="at least one point"):
        build_hierarchy(torch.zeros(0, 3), 0.3, 3)
    with pytest.raises(ValueError):
        build_hierarchy(torch.zeros(4, 2), 0.3, 3)
    hier = build_hierarchy(torch.tensor([[1.0, -2.0, 3.0]]), 0.3, 4)
    assert hier.num_voxels == [1, 1, 1, 1]
    assert torch.equal(hier.neighbours[2], torch.tensor([[-1] * 13 + [0] + [-1] * 13]))
    assert hier.to("cpu") is hier
    # deterministic
    pts = cloud(3)
    a, b = build_hierarchy(pts, 0.4, 3), build_hierarchy(pts, 0.4, 3)
    for x, y in zip(a.neighbours + a.parent + [a.point_to_voxel],
                    b.neighbours + b.parent + [b.point_to_voxel], strict=True):
        assert torch.equal(x, y)


# ---- ops vs dense ---------------------------------------------------------------------


def test_scatter_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = scatter_mean(x, torch.tensor([2, 0, 2]), 4)
    assert torch.equal(out, torch.tensor([[3.0, 4.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))


@pytest.mark.parametrize("lvl", [0, 1])
def test_sparse_conv_equals_dense_conv3d(lvl: int):
    torch.manual_seed(0)
    hier = build_hierarchy(cloud(2, n=400), 0.5, 2)
    coords = hier.coords[lvl]
    conv = SparseConv3d(5, 7).double()
    x = torch.randn(len(coords), 5, dtype=torch.float64)
    grid, rel = dense_grid(coords, x, coords.amin(0), pad=1)
    # dense weight [cout, cin, 3, 3, 3]: slot k = (dx+1)*9 + (dy+1)*3 + (dz+1)
    w = conv.weight.detach().permute(2, 1, 0).reshape(7, 5, 3, 3, 3)
    ref = F.conv3d(grid, w, conv.bias.detach(), padding=1)[0][:, rel[:, 0], rel[:, 1], rel[:, 2]].T
    torch.testing.assert_close(conv(x, hier.neighbours[lvl]), ref, atol=1e-5, rtol=0)
    # the cached kernel map gives the same result
    torch.testing.assert_close(conv(x, hier.kernel_maps[lvl]), ref, atol=1e-5, rtol=0)


def test_sparse_down_up_equal_dense_stride2():
    torch.manual_seed(0)
    hier = build_hierarchy(cloud(4, n=400), 0.5, 2)
    c0, c1 = hier.coords
    origin = 2 * c1.amin(0)  # even-aligned so dense stride-2 windows match the octants
    x = torch.randn(len(c0), 4, dtype=torch.float64)
    down = SparseDown(4, 6).double()
    grid, _ = dense_grid(c0, x, origin)
    grid = F.pad(grid, [0, grid.shape[-1] % 2, 0, grid.shape[-2] % 2, 0, grid.shape[-3] % 2])
    w = down.weight.detach().permute(2, 1, 0).reshape(6, 4, 2, 2, 2)
    dense = F.conv3d(grid, w, down.bias.detach(), stride=2)[0]
    r1 = c1 - c1.amin(0)
    ref = dense[:, r1[:, 0], r1[:, 1], r1[:, 2]].T
    out = down(x, hier.parent[0], hier.child_offset[0], hier.num_voxels[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    up = SparseUp(6, 4).double()
    y = torch.randn(len(c1), 6, dtype=torch.float64)
    grid1, _ = dense_grid(c1, y, c1.amin(0))
    wt = up.weight.detach().permute(1, 2, 0).reshape(6, 4, 2, 2, 2)  # [cin, cout, 2, 2, 2]
    dense_up = F.conv_transpose3d(grid1, wt, up.bias.detach(), stride=2)[0]
    r0 = c0 - origin
    ref_up = dense_up[:, r0[:, 0], r0[:, 1], r0[:, 2]].T
    torch.testing.assert_close(up(y, hier.parent[0], hier.child_offset[0]), ref_up,
                               atol=1e-5, rtol=0)


def test_gradcheck_ops():
    torch.manual_seed(0)
    hier = build_hierarchy(cloud(5, n=20, extent=0.7), 0.5, 2)
    v0, v1 = hier.num_voxels
    assert 8 <= v0 <= 27  # small enough for gradgradcheck, dense enough to have neighbours
    nb = hier.neighbours[0]
    x = torch.randn(v0, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(27, 3, 2, dtype=torch.float64, requires_grad=True)
    conv = lambda a, b: sparse_conv3d(a, nb, b)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w))
    # create_graph path (differentiable backward); fast mode keeps it cheap
    assert torch.autograd.gradgradcheck(conv, (x, w), fast_mode=True)
    down, up = SparseDown(3, 2).double(), SparseUp(2, 3).double()
    par, off = hier.parent[0], hier.child_offset[0]
    assert torch.autograd.gradcheck(lambda a: down(a, par, off, v1), (x,))
    y = torch.randn(v1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: up(a, par, off), (y,))
    idx = hier.point_to_voxel
    p = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: scatter_mean(a, idx, v0), (p,))


# ---- networks -------------------------------------------------------------------------


def test_unet_scale_and_gradients():
    torch.manual_seed(0)
    hier = build_hierarchy(cloud(6, n=2000, extent=4.0).float(), 0.25, 3)
    net = SparseResUNet(8, 5)
    x = torch.randn(hier.num_voxels[0], 8)
    out = net(x, hier)
    assert out.shape == (hier.num_voxels[0], 5) and torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 20
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_translation_and_permutation_equivariance():
    torch.manual_seed(0)
    vs, levels = 0.25, 3
    pts = cloud(7, n=600, extent=2.0).float()
    pts = torch.round(pts * 64) / 64  # exact in float after the shift below
    net = PointVoxelNet(6, 4, voxel_widths=(8, 12, 16), point_hidden=16)
    torch.nn.init.normal_(net.out.weight)  # non-trivial output
    x = torch.randn(len(pts), 6)
    ref = net(x, build_hierarchy(pts, vs, levels))
    coarsest = vs * 2 ** (levels - 1)
    shift = torch.tensor([3.0, -5.0, 2.0]) * coarsest
    out = net(x, build_hierarchy(pts + shift, vs, levels))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    perm = torch.randperm(len(pts))
    out = net(x[perm], build_hierarchy(pts[perm], vs, levels))
    torch.testing.assert_close(out, ref[perm], atol=1e-5, rtol=1e-5)


def test_point_voxel_net_zero_init_then_learns():
    torch.manual_seed(0)
    pts = cloud(8, n=500, extent=2.0).float()
    hier = build_hierarchy(pts, 0.25, 3)
    net = PointVoxelNet(10, 3, voxel_widths=(8, 12, 16), point_hidden=16)
    x = torch.randn(len(pts), 10)
    target = torch.randn(len(pts), 3)
    out = net(x, hier)
    assert out.shape == (len(pts), 3) and torch.equal(out, torch.zeros_like(out))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss0 = F.mse_loss(out, target)
    loss0.backward()
    opt.step()
    out1 = net(x, hier)
    assert out1.abs().max() > 0
    assert F.mse_loss(out1, target) < loss0


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    pts = cloud(9, n=800, extent=2.0).float()
    hier = build_hierarchy(pts, 0.25, 3)
    hier_gpu = build_hierarchy(pts.cuda(), 0.25, 3)
    assert isinstance(hier_gpu, VoxelHierarchy) and hier_gpu.device.type == "cuda"
    for a, b in zip(hier.neighbours + hier.parent + hier.child_offset + [hier.point_to_voxel],
                    hier_gpu.neighbours + hier_gpu.parent + hier_gpu.child_offset
                    + [hier_gpu.point_to_voxel], strict=True):
        assert torch.equal(a, b.cpu())
    net = PointVoxelNet(6, 4, voxel_widths=(8, 12, 16), point_hidden=16)
    torch.nn.init.normal_(net.out.weight)
    x = torch.randn(len(pts), 6)
    ref = net(x, hier)
    out = net.cuda()(x.cuda(), hier.to("cuda"))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
