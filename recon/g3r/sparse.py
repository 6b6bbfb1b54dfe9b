"""Sparse-voxel network over fixed Gaussian anchors, in pure PyTorch (CPU and CUDA).

The G3R update network reads one feature row per Gaussian. Anchors never move, so the
voxel hierarchy (occupied voxels, their 3x3x3 neighbour tables, parent links) is built
once per scene with :func:`build_hierarchy` and reused for every unrolled step and every
training iteration on that scene.

Conventions (all index tensors are ``torch.long``):

* ``N`` points (Gaussian anchors), ``V_l`` occupied voxels at level ``l``; level 0 has
  voxels of edge ``voxel_size`` and the edge doubles per level.
* Voxel coordinates are ``floor(p / voxel_size)`` at level 0 and ``floor(c / 2)`` from
  level ``l`` to ``l + 1``; voxels of each level are sorted lexicographically by (x, y, z),
  so the structure depends only on the set of occupied voxels, not on point order.
* Neighbour slot ``k = (dx + 1) * 9 + (dy + 1) * 3 + (dz + 1)`` for offset
  ``(dx, dy, dz)`` in ``{-1, 0, 1}^3``; slot 13 is the voxel itself and slot ``26 - k``
  is the opposite offset. This is the flattened order of a dense ``conv3d`` kernel
  ``[..., 3, 3, 3]`` over a grid indexed ``[x, y, z]``.
* Child octant ``o = (cx % 2) * 4 + (cy % 2) * 2 + (cz % 2)``, the flattened order of a
  ``[..., 2, 2, 2]`` kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "VoxelHierarchy",
    "build_hierarchy",
    "scatter_mean",
    "KernelMap",
    "kernel_map",
    "sparse_conv3d",
    "SparseConv3d",
    "SparseDown",
    "SparseUp",
    "SparseResBlock",
    "SparseResUNet",
    "PointVoxelNet",
]

_BITS = 21  # bits per axis in the packed int64 key: 3 * 21 = 63 fits a signed int64
_MAX_EXTENT = (1 << _BITS) - 2  # keeps coords - origin + 1 (origin = min - 1) in range


# --------------------------------------------------------------------------------------
# Hierarchy
# --------------------------------------------------------------------------------------


@dataclass
class VoxelHierarchy:
    """Occupied voxels of a point cloud at ``levels`` resolutions, plus the index maps.

    Attributes:
        voxel_size: edge of a level-0 voxel (same units as the points); level ``l`` voxels
            have edge ``voxel_size * 2**l``.
        point_to_voxel: ``[N]`` level-0 voxel of each point.
        coords: ``levels`` tensors ``[V_l, 3]``, integer voxel coordinates, sorted
            lexicographically.
        neighbours: ``levels`` tensors ``[V_l, 27]``, index (into level ``l``) of the voxel
            at each 3x3x3 offset, or -1 where that voxel is empty. Symmetric:
            ``neighbours[l][i, k] == j`` iff ``neighbours[l][j, 26 - k] == i``.
        parent: ``levels - 1`` tensors ``[V_l]``, index into level ``l + 1`` of the voxel
            containing voxel ``i`` (``coords[l + 1][parent] == coords[l] // 2``).
        child_offset: ``levels - 1`` tensors ``[V_l]`` in ``0..7``, the octant of voxel ``i``
            within its parent (``coords % 2`` packed as ``x * 4 + y * 2 + z``).
        kernel_maps: ``levels`` :class:`KernelMap`, the occupied pairs of ``neighbours[l]``
            as the sparse conv consumes them.
    """

    voxel_size: float
    point_to_voxel: Tensor
    coords: list[Tensor]
    neighbours: list[Tensor]
    parent: list[Tensor]
    child_offset: list[Tensor]
    kernel_maps: list[KernelMap]

    @property
    def levels(self) -> int:
        return len(self.coords)

    @property
    def num_points(self) -> int:
        return int(self.point_to_voxel.shape[0])

    @property
    def num_voxels(self) -> list[int]:
        """``[V_0, ..., V_{levels-1}]``."""
        return [int(c.shape[0]) for c in self.coords]

    @property
    def device(self) -> torch.device:
        return self.point_to_voxel.device

    def to(self, device: torch.device | str) -> VoxelHierarchy:
        """A copy with every index tensor on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return VoxelHierarchy(
            voxel_size=self.voxel_size,
            point_to_voxel=self.point_to_voxel.to(device),
            coords=[t.to(device) for t in self.coords],
            neighbours=[t.to(device) for t in self.neighbours],
            parent=[t.to(device) for t in self.parent],
            child_offset=[t.to(device) for t in self.child_offset],
            kernel_maps=[m.to(device) for m in self.kernel_maps],
        )


def _offsets27(device: torch.device) -> Tensor:
    """``[27, 3]`` offsets in neighbour-slot order (x slowest, z fastest)."""
    r = torch.arange(-1, 2, device=device)
    return torch.cartesian_prod(r, r, r)


def _pack(rel: Tensor) -> Tensor:
    """``[..., 3]`` non-negative coords (< 2**21) -> ``[...]`` int64 keys, order-preserving."""
    return (rel[..., 0] << (2 * _BITS)) | (rel[..., 1] << _BITS) | rel[..., 2]


def _unique_voxels(cells: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dedupe integer cells ``[M, 3]``.

    Returns ``(coords [V, 3], inverse [M], keys [V], origin [3])``: sorted unique coords,
    the voxel of each cell, the sorted packed keys of ``coords`` and the packing origin.
    """
    # origin = min - 1 so that neighbour queries (coords - 1) still pack to >= 0.
    origin = cells.amin(0) - 1
    extent = cells.amax(0) - origin
    if int(extent.max()) > _MAX_EXTENT:
        raise ValueError(
            f"point cloud spans {int(extent.max())} voxels along one axis; at most "
            f"{_MAX_EXTENT} fit the int64 voxel key (increase voxel_size or crop the cloud)"
        )
    keys, inverse = torch.unique(_pack(cells - origin), sorted=True, return_inverse=True)
    mask = (1 << _BITS) - 1
    rel = torch.stack([keys >> (2 * _BITS), (keys >> _BITS) & mask, keys & mask], dim=1)
    return rel + origin, inverse, keys, origin


def _neighbour_table(coords: Tensor, keys: Tensor, origin: Tensor) -> Tensor:
    """``[V, 27]`` index of each 3x3x3 neighbour of ``coords`` or -1; sort-based hash."""
    query = _pack(coords[:, None, :] + _offsets27(coords.device) - origin)  # [V, 27]
    # Queries may reach max + 1 on an axis, which is still < 2**21 by the extent check.
    pos = torch.searchsorted(keys, query).clamp_max_(keys.shape[0] - 1)
    return torch.where(keys[pos] == query, pos, torch.full_like(pos, -1))


@torch.no_grad()
def build_hierarchy(points: Tensor, voxel_size: float, levels: int) -> VoxelHierarchy:
    """Voxelise ``points`` ``[N, 3]`` into a ``levels``-deep octree-like hierarchy.

    Runs on ``points.device`` with tensor ops only (no Python loop over voxels), and is
    deterministic: voxel order is the lexicographic order of voxel coordinates.

    Args:
        points: ``[N, 3]`` float anchor positions; ``N >= 1``.
        voxel_size: level-0 voxel edge (> 0); doubles per level.
        levels: number of levels (>= 1).

    Returns:
        :class:`VoxelHierarchy`. Shifting every point by a multiple of the coarsest edge
        ``voxel_size * 2**(levels - 1)`` leaves every index tensor unchanged (when the
        shifted coordinates are exact in floating point).
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ValueError("build_hierarchy needs at least one point (got N=0)")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel_size}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or inf")

    cells = torch.floor(points.detach() / voxel_size).long()
    coords, point_to_voxel, keys, origin = _unique_voxels(cells)
    all_coords, neighbours, parents, octants = [coords], [], [], []
    for level in range(levels):
        neighbours.append(_neighbour_table(coords, keys, origin))
        if level == levels - 1:
            break
        # floor division and a non-negative remainder, also for negative coordinates
        parent_cells = torch.div(coords, 2, rounding_mode="floor")
        bits = coords - 2 * parent_cells
        octants.append(bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2])
        coords, parent, keys, origin = _unique_voxels(parent_cells)
        parents.append(parent)
        all_coords.append(coords)
    return VoxelHierarchy(
        voxel_size=float(voxel_size),
        point_to_voxel=point_to_voxel,
        coords=all_coords,
        neighbours=neighbours,
        parent=parents,
        child_offset=octants,
        kernel_maps=[kernel_map(nb) for nb in neighbours],
    )


# --------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------


def scatter_mean(x: Tensor, index: Tensor, size: int) -> Tensor:
    """Average rows of ``x`` ``[N, C]`` into ``size`` bins by ``index`` ``[N]``.

    Returns ``[size, C]``; empty bins are 0. The reverse (voxels -> points) is plain
    indexing, ``v[index]``.
    """
    out = x.new_zeros(size, x.shape[1]).index_add_(0, index, x)
    # index_add rather than bincount: bincount reads index.max() back to the host on CUDA
    count = x.new_zeros(size).index_add_(0, index, x.new_ones(index.shape[0]))
    return out / count.clamp_min_(1)[:, None]


@dataclass
class KernelMap:
    """Occupied (input, output) voxel pairs of a 3x3x3 neighbour table, grouped by slot.

    Attributes:
        src: ``[P]`` input voxel of each pair (``neighbours[dst, k]``).
        dst: ``[P]`` output voxel of each pair; pairs sorted by slot, then by ``dst``.
        counts: 27 Python ints, pairs per slot; ``counts[13] == 0`` because the centre
            slot (every voxel with itself) is applied as one dense matmul.
        num_voxels: ``V``.

    Built once per level (:func:`kernel_map`, cached in :class:`VoxelHierarchy`), so the
    conv does not re-derive it (or sync a GPU for the counts) on every call.
    """

    src: Tensor
    dst: Tensor
    counts: tuple[int, ...]
    num_voxels: int

    def to(self, device: torch.device | str) -> KernelMap:
        return KernelMap(self.src.to(device), self.dst.to(device), self.counts, self.num_voxels)


def kernel_map(neighbours: Tensor) -> KernelMap:
    """``neighbours`` ``[V, 27]`` (-1 = empty) -> :class:`KernelMap` of the occupied pairs."""
    occupied = neighbours.T >= 0  # [27, V]; nonzero() then comes out sorted by slot
    occupied[13] = False
    k, dst = occupied.nonzero(as_tuple=True)
    src = neighbours[dst, k]
    counts = tuple(int(c) for c in occupied.sum(1).tolist())
    return KernelMap(src, dst, counts, int(neighbours.shape[0]))


def _pair_conv(x: Tensor, weight: Tensor, src: list[Tensor], dst: list[Tensor]) -> Tensor:
    """``out = x @ weight[13] + sum_k index_add(dst_k, x[src_k] @ weight[k])``."""
    out = x @ weight[13]
    for k, (s, d) in enumerate(zip(src, dst, strict=True)):
        if s.numel():
            out.index_add_(0, d, x.index_select(0, s) @ weight[k])
    return out


class _SparseConvFn(torch.autograd.Function):
    """Sparse conv over a kernel map that saves only ``x`` for backward.

    Autograd through the per-slot gathers would keep every gathered ``[P_k, cin]`` block
    alive (about 7x the input on a street scene) for each conv of each unrolled step;
    here they are recomputed. The input gradient is the same conv with ``src``/``dst``
    swapped and each slot's weight transposed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, src: list[Tensor], dst: list[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.pairs = (src, dst)
        return _pair_conv(x, weight, src, dst)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        src, dst = ctx.pairs
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # create_graph=True: through the Function again, so it stays differentiable
            wt = weight.transpose(1, 2)
            if torch.is_grad_enabled():
                grad_x = _SparseConvFn.apply(grad_out, wt, dst, src)
            else:
                grad_x = _pair_conv(grad_out, wt, dst, src)
        if ctx.needs_input_grad[1]:
            parts = [x.T @ grad_out if k == 13 else
                     x.index_select(0, s).T @ grad_out.index_select(0, d)
                     for k, (s, d) in enumerate(zip(src, dst, strict=True))]
            grad_w = torch.stack(parts)
        return grad_x, grad_w, None, None


def sparse_conv3d(x: Tensor, neighbours: Tensor | KernelMap, weight: Tensor) -> Tensor:
    """Submanifold 3x3x3 conv on occupied voxels (outputs only where inputs are).

    Args:
        x: ``[V, Ci]`` voxel features.
        neighbours: ``[V, 27]`` neighbour table (-1 = empty) or its :class:`KernelMap`
            (preferred: built once, see ``VoxelHierarchy.kernel_maps``). Empty neighbours
            contribute zero.
        weight: ``[27, Ci, Co]``; ``weight[k]`` applies to neighbour slot ``k``.

    Returns:
        ``[V, Co]``, equal to a dense cross-correlating ``conv3d`` (padding 1) restricted
        to the occupied voxels.

    Cost: one ``[V, Ci] @ [Ci, Co]`` for the centre plus one gather/matmul/index_add per
    slot over its occupied pairs only (street scenes: ~7 of 26 off-centre slots filled
    per voxel), rather than a ``[V, 27 * Ci]`` gather that multiplies mostly zeros.
    """
    kmap = neighbours if isinstance(neighbours, KernelMap) else kernel_map(neighbours)
    if x.shape[0] != kmap.num_voxels:
        raise ValueError(f"x has {x.shape[0]} rows, the neighbour table {kmap.num_voxels}")
    src, dst = list(kmap.src.split(kmap.counts)), list(kmap.dst.split(kmap.counts))
    return _SparseConvFn.apply(x, weight, src, dst)


def _kaiming_(w: Tensor, fan_in: int, gain: float = math.sqrt(2.0)) -> Tensor:
    """In-place normal init with std ``gain / sqrt(fan_in)`` (He init for ReLU-like acts)."""
    with torch.no_grad():
        return w.normal_(0.0, gain / math.sqrt(fan_in))


class SparseConv3d(nn.Module):
    """3x3x3 submanifold conv over one level: ``forward(x [V, cin], neighbours)`` ->
    ``[V, cout]`` with ``neighbours`` a ``[V, 27]`` table or its :class:`KernelMap`.
    Weight ``[27, cin, cout]``, init std ``sqrt(2 / (27 * cin))``."""

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(_kaiming_(torch.empty(27, cin, cout), 27 * cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: Tensor, neighbours: Tensor | KernelMap) -> Tensor:
        y = sparse_conv3d(x, neighbours, self.weight)
        return y + self.bias if self.bias is not None else y


class SparseDown(nn.Module):
    """Stride-2, kernel-2 conv from level ``l`` to ``l + 1``.

    ``forward(x [V_l, cin], parent [V_l], child_offset [V_l], size=V_{l+1})`` ->
    ``[V_{l+1}, cout]``: ``out[p] = sum_{i: parent[i] = p} x[i] @ weight[child_offset[i]]``,
    i.e. a dense ``conv3d(kernel=2, stride=2)`` on an even-aligned grid. Init std
    ``sqrt(2 / (8 * cin))``.
    """

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(_kaiming_(torch.empty(8, cin, cout), 8 * cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: Tensor, parent: Tensor, child_offset: Tensor, size: int) -> Tensor:
        # Each (parent, octant) slot holds at most one child, so scatter into a dense
        # [V_{l+1}, 8, cin] block (plain index copy, no accumulation) and do one matmul.
        slots = x.new_zeros(size * 8, x.shape[1])
        slots = slots.index_copy(0, parent * 8 + child_offset, x)
        y = slots.view(size, -1) @ self.weight.reshape(-1, self.weight.shape[-1])
        return y + self.bias if self.bias is not None else y


class SparseUp(nn.Module):
    """Transposed stride-2 conv from level ``l + 1`` back to level ``l``.

    ``forward(x [V_{l+1}, cin], parent [V_l], child_offset [V_l])`` -> ``[V_l, cout]``:
    ``out[i] = x[parent[i]] @ weight[child_offset[i]]`` (dense ``conv_transpose3d``, kernel
    2, stride 2, read at the occupied children). Init std ``sqrt(2 / cin)``.
    """

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(_kaiming_(torch.empty(8, cin, cout), cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: Tensor, parent: Tensor, child_offset: Tensor) -> Tensor:
        cout = self.weight.shape[-1]
        # All 8 octant outputs per parent in one matmul ([V_{l+1}, 8 * cout]), then pick.
        y = (x @ self.weight.permute(1, 0, 2).reshape(x.shape[1], -1)).view(-1, cout)
        y = y[parent * 8 + child_offset]
        return y + self.bias if self.bias is not None else y


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------


class SparseResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(act(norm(conv(act(norm(x))))))``.

    LayerNorm over channels per voxel: no statistics across voxels, so the output of a
    voxel does not depend on scene size or on far-away voxels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.conv1 = SparseConv3d(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.conv2 = SparseConv3d(channels, channels)
        # Second conv scaled down so a fresh block is close to the identity; keeps the
        # activation scale flat through depth.
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)

    def forward(self, x: Tensor, neighbours: Tensor | KernelMap) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), neighbours)
        h = self.conv2(F.silu(self.norm2(h)), neighbours)
        return x + h


class SparseResUNet(nn.Module):
    """Residual U-Net over a :class:`VoxelHierarchy`.

    ``len(widths)`` levels (needs ``hier.levels >= len(widths)``): linear stem to
    ``widths[0]``; per level ``blocks`` residual blocks, :class:`SparseDown` to the next
    level; on the way back :class:`SparseUp` added to the encoder skip, then ``blocks``
    residual blocks; LayerNorm, SiLU and a linear head to ``cout``.

    ``forward(x [V_0, cin], hier)`` -> ``[V_0, cout]``.
    """

    def __init__(
        self, cin: int, cout: int, widths: Sequence[int] = (32, 48, 64), blocks: int = 1
    ) -> None:
        super().__init__()
        if len(widths) < 1:
            raise ValueError("widths must name at least one level")
        self.widths = tuple(int(w) for w in widths)
        n = len(self.widths)
        self.stem = nn.Linear(cin, self.widths[0])
        self.enc = nn.ModuleList(
            nn.ModuleList(SparseResBlock(w) for _ in range(blocks)) for w in self.widths
        )
        self.down = nn.ModuleList(
            SparseDown(self.widths[i], self.widths[i + 1]) for i in range(n - 1)
        )
        self.up = nn.ModuleList(SparseUp(self.widths[i + 1], self.widths[i]) for i in range(n - 1))
        self.dec = nn.ModuleList(
            nn.ModuleList(SparseResBlock(self.widths[i]) for _ in range(blocks))
            for i in range(n - 1)
        )
        self.head_norm = nn.LayerNorm(self.widths[0])
        self.head = nn.Linear(self.widths[0], cout)

    def forward(self, x: Tensor, hier: VoxelHierarchy) -> Tensor:
        n = len(self.widths)
        if hier.levels < n:
            raise ValueError(f"hierarchy has {hier.levels} levels, the U-Net needs {n}")
        if x.shape[0] != hier.num_voxels[0]:
            raise ValueError(f"x has {x.shape[0]} rows, level 0 has {hier.num_voxels[0]} voxels")
        h = self.stem(x)
        skips = []
        for lvl in range(n):
            for block in self.enc[lvl]:
                h = block(h, hier.kernel_maps[lvl])
            if lvl < n - 1:
                skips.append(h)
                size = hier.num_voxels[lvl + 1]
                h = self.down[lvl](h, hier.parent[lvl], hier.child_offset[lvl], size)
        for lvl in range(n - 2, -1, -1):
            h = skips[lvl] + self.up[lvl](h, hier.parent[lvl], hier.child_offset[lvl])
            for block in self.dec[lvl]:
                h = block(h, hier.kernel_maps[lvl])
        return self.head(F.silu(self.head_norm(h)))


class PointVoxelNet(nn.Module):
    """Per-Gaussian update network: point MLP branch + sparse-voxel U-Net branch.

    Point branch: ``x`` ``[N, cin]`` -> MLP -> ``[N, point_hidden]``. Voxel branch: mean of
    ``x`` per level-0 voxel -> :class:`SparseResUNet` -> ``[V_0, voxel_widths[0]]`` ->
    gathered back to the points. Fusion: concat -> Linear -> SiLU -> Linear to ``cout``.
    The last layer is zero-initialised, so a fresh network returns exactly 0.

    ``forward(x [N, cin], hier)`` -> ``[N, cout]`` where ``hier`` was built on the same N
    points (``hier.point_to_voxel`` ``[N]``).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        voxel_widths: Sequence[int] = (32, 48, 64),
        point_hidden: int = 64,
    ) -> None:
        super().__init__()
        vw = int(voxel_widths[0])
        self.point_mlp = nn.Sequential(
            nn.Linear(cin, point_hidden), nn.SiLU(), nn.Linear(point_hidden, point_hidden)
        )
        self.unet = SparseResUNet(cin, vw, voxel_widths)
        self.fuse = nn.Sequential(nn.Linear(point_hidden + vw, point_hidden), nn.SiLU())
        self.out = nn.Linear(point_hidden, cout)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, hier: VoxelHierarchy) -> Tensor:
        if x.shape[0] != hier.num_points:
            raise ValueError(f"x has {x.shape[0]} rows, the hierarchy {hier.num_points} points")
        p2v = hier.point_to_voxel
        v = self.unet(scatter_mean(x, p2v, hier.num_voxels[0]), hier)
        h = self.fuse(torch.cat([self.point_mlp(x), v[p2v]], dim=1))
        return self.out(h)
