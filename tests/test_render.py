"""The torch renderer against a brute-force dense reference (every pixel x every Gaussian).

The reference below is written independently of ``recon.render``: no extent boxes, no
chunks, no sorting of pairs; a Gaussian contributes wherever its alpha reaches 1/255.
It agreeing with the renderer also shows that the extent boxes never cut off a pixel
that should have been drawn.
"""

from __future__ import annotations

import math

import pytest
import torch

from recon.render import rasterize, resolve_backend

W, H = 32, 24


def _quat_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of unit quaternions (w, x, y, z) via R = I + 2w[v] + 2[v]^2."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, v = q[:, 0], q[:, 1:]
    z = torch.zeros_like(w)
    vx = torch.stack([z, -v[:, 2], v[:, 1], v[:, 2], z, -v[:, 0], -v[:, 1], v[:, 0], z],
                     -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=q.dtype).expand_as(vx)
    return eye + 2 * w[:, None, None] * vx + 2 * vx @ vx


def dense_reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                    near, far, backgrounds=None, counters=None, antialiased=False):
    """float64 render: returns rgb [C,H,W,D], alpha [C,H,W,1], depth [C,H,W,1].

    ``antialiased``: opacities scaled by sqrt(det(cov2d) / det(cov2d + 0.3 I)).

    ``counters`` (a dict), if given, receives ``stopped``: contributions dropped by the
    transmittance early stop.
    """
    rgbs, alphas, depths = [], [], []
    Rq = _quat_matrix(quats)
    cov_world = Rq @ torch.diag_embed(scales**2) @ Rq.transpose(1, 2)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means.dtype) + 0.5,
                            torch.arange(width, dtype=means.dtype) + 0.5, indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # [HW, 2]
    for c in range(viewmats.shape[0]):
        R, t, K = viewmats[c, :3, :3], viewmats[c, :3, 3], Ks[c]
        p = means @ R.T + t
        z = p[:, 2]
        inside = (z >= near) & (z <= far)
        zs = torch.where(inside, z, torch.ones_like(z))
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # Jacobian evaluated at the mean clamped to 1.3x the field of view.
        tx = 0.5 * width / fx
        ty = 0.5 * height / fy
        u = (p[:, 0] / zs).clamp(-(cx / fx + 0.3 * tx), (width - cx) / fx + 0.3 * tx)
        v = (p[:, 1] / zs).clamp(-(cy / fy + 0.3 * ty), (height - cy) / fy + 0.3 * ty)
        J = torch.zeros(len(z), 2, 3, dtype=means.dtype)
        J[:, 0, 0] = fx / zs
        J[:, 0, 2] = -fx * u / zs
        J[:, 1, 1] = fy / zs
        J[:, 1, 2] = -fy * v / zs
        sharp = J @ R @ cov_world @ R.T @ J.transpose(1, 2)
        cov2d = sharp + 0.3 * torch.eye(2, dtype=means.dtype)
        prec = torch.linalg.inv(cov2d)
        o = opacities * torch.sqrt(torch.linalg.det(sharp) / torch.linalg.det(cov2d)) \
            if antialiased else opacities
        m2d = torch.stack([fx * p[:, 0] / zs + cx, fy * p[:, 1] / zs + cy], -1)
        d = pix[None] - m2d[:, None]  # [N, HW, 2]
        q = torch.einsum("npi,nij,npj->np", d, prec, d)
        alpha = torch.clamp(o[:, None] * torch.exp(-0.5 * q), max=0.999)
        alpha = torch.where(inside[:, None] & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
        order = torch.argsort(torch.where(inside, z, torch.full_like(z, math.inf)))
        alpha, zo = alpha[order], z[order]
        col = colors[order] if colors.dim() == 2 else colors[c][order]
        t_incl = torch.cumprod(1 - alpha, 0)
        alive = (t_incl > 1e-4).to(alpha.dtype)  # stop before T reaches 1e-4
        t_excl = torch.cat([torch.ones_like(t_incl[:1]), t_incl[:-1]], 0)
        w = alpha * t_excl * alive  # [N, HW]
        if counters is not None:
            stopped = int(((alpha > 0) & (alive == 0)).sum())
            counters["stopped"] = counters.get("stopped", 0) + stopped
        acc = w.sum(0)
        rgb = w.T @ col
        if backgrounds is not None:
            rgb = rgb + (1 - acc)[:, None] * backgrounds[c]
        dep = (w * zo[:, None]).sum(0) / acc.clamp_min(1e-10)
        rgbs.append(rgb.reshape(height, width, -1))
        alphas.append(acc.reshape(height, width, 1))
        depths.append(dep.reshape(height, width, 1))
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)


def _look_at(eye, target) -> torch.Tensor:
    """world -> camera (OpenCV axes) for a camera at ``eye`` looking at ``target``, z up."""
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    fwd = target - eye
    fwd = fwd / fwd.norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])  # rows: camera axes in world
    V = torch.eye(4, dtype=torch.float64)
    V[:3, :3] = R
    V[:3, 3] = -R @ eye
    return V


def make_scene(seed: int, n: int = 50, d: int = 3, dtype=torch.float64):
    """A random scene seen by two cameras, with the awkward cases built in.

    Gaussians spread well beyond the frustum (crossing the image border), some behind
    the camera and between camera and near plane, some very flat (one scale 1e-4 of the
    others), and a cluster sharing nearly the same depth range.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # Cameras at the origin area looking along +x (world z up).
    viewmats = torch.stack([_look_at([0, 0, 0], [10, 0, 0]), _look_at([0, 1, 0.3], [10, -1, 0])])
    Ks = torch.tensor([[25.0, 0, 16.0], [0, 25.0, 12.0], [0, 0, 1]], dtype=torch.float64)
    Ks = torch.stack([Ks, Ks * torch.tensor([[1.1], [1.1], [1.0]], dtype=torch.float64)])
    n_front = n - 8
    x = 2 + 8 * r(n_front)
    means = torch.stack([x, (r(n_front) - 0.5) * 1.6 * x, (r(n_front) - 0.5) * 1.2 * x], -1)
    # Overlapping in depth: a third of them share x in [5, 5.3].
    k = n_front // 3
    means[:k, 0] = 5 + 0.3 * r(k)
    means[:k, 1:] = (r(k, 2) - 0.5) * 3
    behind = torch.stack([-1 - 3 * r(6), (r(6) - 0.5) * 2, (r(6) - 0.5) * 2], -1)
    too_near = torch.tensor([[0.05, 0.0, 0.0], [0.02, 0.01, 0.0]], dtype=torch.float64)
    means = torch.cat([means, behind, too_near])
    scales = 0.05 + 0.5 * r(n, 3)
    flat = torch.arange(n) % 5 == 0
    scales[flat, 2] = 1e-4  # nearly degenerate discs
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    opacities = 0.05 + 0.94 * r(n)
    # The depth cluster is large and nearly opaque, so pixels saturate (early stop) and
    # a few hit the 0.999 alpha clamp.
    scales[:k] = 0.3 + 0.5 * r(k, 3)
    opacities[:k] = 0.9 + 0.1 * r(k)
    opacities[:2] = 1.0
    colors = r(n, d)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return [cast(t) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


NEAR, FAR = 0.2, 100.0


@pytest.mark.parametrize("seed,mode", [(0, "classic"), (1, "classic"), (2, "classic"),
                                       (0, "antialiased"), (2, "antialiased")])
def test_forward_matches_dense_reference(seed, mode):
    scene = make_scene(seed, dtype=torch.float32)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    out = rasterize(*scene, W, H, NEAR, FAR, backgrounds=bg, backend="torch",
                    rasterize_mode=mode)
    counters: dict[str, int] = {}
    ref = dense_reference(*[t.double() for t in scene], W, H, NEAR, FAR,
                          backgrounds=bg.double(), counters=counters,
                          antialiased=mode == "antialiased")
    assert out.rgb.shape == (2, H, W, 3) and out.alpha.shape == (2, H, W, 1)
    # The scene exercises the cases: faint and saturated pixels, the early stop.
    assert out.stats["pairs_composited"] > 500
    assert ((ref[1] > 0) & (ref[1] < 0.5)).any()
    if mode == "classic":  # compensated opacities rarely saturate a pixel
        assert counters["stopped"] > 0
    for got, want in zip((out.rgb, out.alpha), ref[:2], strict=True):
        assert (got.double() - want).abs().max() < 1e-4
    # Expected depth is metres and divided by alpha; compare where something was drawn.
    drawn = ref[1] > 1e-3
    assert ((out.depth.double() - ref[2]).abs()[drawn] / ref[2][drawn]).max() < 1e-5


def test_culling_and_radii():
    means, quats, scales, opac, colors, viewmats, Ks = make_scene(0, dtype=torch.float32)
    out = rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H, NEAR, FAR,
                    backend="torch")
    assert out.radii.shape == (2, 50, 2) and out.radii.dtype == torch.int32
    # The last 8 are behind the first camera or closer than its near plane.
    assert not out.visible[0, -8:].any() and not out.visible[:, -8:-2].any()
    assert out.visible[:, :-8].sum() > 40
    # Beyond far: nothing is drawn.
    far_out = rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H, NEAR, 0.21,
                        backend="torch")
    assert not far_out.visible.any() and far_out.alpha.abs().max() == 0


def test_chunking_and_per_view_colors_do_not_change_the_image():
    means, quats, scales, opac, colors, viewmats, Ks = make_scene(3, d=5, dtype=torch.float32)
    one = rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H, NEAR, FAR,
                    backend="torch")
    many = rasterize(means, quats, scales, opac, colors[None].expand(2, -1, -1).clone(),
                     viewmats, Ks, W, H, NEAR, FAR, backend="torch", max_pairs_per_chunk=300)
    assert one.stats["chunks"] == 2 and many.stats["chunks"] > 10
    assert one.rgb.shape[-1] == 5
    torch.testing.assert_close(many.rgb, one.rgb, rtol=0, atol=1e-6)
    torch.testing.assert_close(many.depth, one.depth, rtol=1e-6, atol=1e-6)


def test_depth_batches_do_not_change_the_gradients():
    """Many small depth batches (skipping saturated pixels) give the one-batch gradients."""
    scene = make_scene(5, dtype=torch.float64)
    weights = _loss_weights(5, 3)

    def grads(budget):
        params = [t.clone().requires_grad_(True) for t in scene[:5]]
        out = rasterize(*params, *scene[5:], W, H, NEAR, FAR, backend="torch",
                        max_pairs_per_chunk=budget)
        loss = ((out.rgb * weights[0]).sum() + (out.alpha * weights[1]).sum()
                + 0.1 * (out.depth * weights[2]).sum())
        return out.stats, torch.autograd.grad(loss, params)

    one_stats, one = grads(1 << 20)
    many_stats, many = grads(200)
    assert one_stats["chunks"] == 2 and many_stats["chunks"] > 20
    assert many_stats["pairs_composited"] == one_stats["pairs_composited"]
    # Pixels saturated by earlier batches are not enumerated again.
    assert many_stats["pairs_enumerated"] < one_stats["pairs_enumerated"]
    for a, b in zip(many, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _loss_weights(seed: int, d: int):
    g = torch.Generator().manual_seed(seed + 100)
    return [torch.rand(2, H, W, k, generator=g, dtype=torch.float64) for k in (d, 1, 1)]


def _grads(render, scene, weights):
    params = [t.clone().requires_grad_(True) for t in scene[:5]]
    rgb, alpha, depth = render(params)
    loss = ((rgb * weights[0]).sum() + (alpha * weights[1]).sum()
            + 0.1 * (depth * weights[2]).sum())
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype,mode", [(torch.float64, "classic"), (torch.float32, "classic"),
                                        (torch.float64, "antialiased")])
def test_gradients_match_dense_reference(dtype, mode):
    scene = make_scene(4, dtype=torch.float64)
    weights = _loss_weights(4, 3)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]], dtype=torch.float64)

    def ours(p):
        out = rasterize(*[t.to(dtype) for t in p], *[t.to(dtype) for t in scene[5:]], W, H,
                        NEAR, FAR, backgrounds=bg.to(dtype), backend="torch",
                        rasterize_mode=mode)
        return out.rgb.double(), out.alpha.double(), out.depth.double()

    def ref(p):
        return dense_reference(*p, *scene[5:], W, H, NEAR, FAR, backgrounds=bg,
                               antialiased=mode == "antialiased")

    names = ("means", "quats", "scales", "opacities", "colors")
    for name, g, g_ref in zip(names, _grads(ours, scene, weights), _grads(ref, scene, weights),
                              strict=True):
        assert g_ref.abs().max() > 0, name
        rel = (g - g_ref).norm() / g_ref.norm()
        worst = (g - g_ref).abs().max() / g_ref.abs().max()
        assert rel < 1e-3 and worst < 1e-3, (name, float(rel), float(worst))


def test_gradcheck_tiny_float64():
    g = torch.Generator().manual_seed(7)
    means = torch.tensor([[0.0, 0.0, 4.0], [0.3, -0.2, 5.0], [-0.4, 0.3, 4.5]],
                         dtype=torch.float64)
    quats = torch.randn(3, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor([[0.3, 0.2, 0.25], [0.2, 0.4, 0.1], [0.25, 0.25, 0.3]],
                          dtype=torch.float64)
    opac = torch.tensor([0.6, 0.8, 0.5], dtype=torch.float64)
    colors = torch.rand(3, 2, generator=g, dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = torch.tensor([[[8.0, 0, 5.0], [0, 8.0, 4.0], [0, 0, 1]]], dtype=torch.float64)

    def fn(m, q, s, o, c):
        out = rasterize(m, q, s, o, c, viewmats, Ks, 10, 8, 0.1, 100.0, backend="torch")
        return out.rgb, out.alpha, out.depth

    inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_backend_selection():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("gsplat", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("vulkan", torch.device("cpu"))  # type: ignore[arg-type]
    scene = make_scene(0, dtype=torch.float32)
    with pytest.raises(ValueError, match="colors has shape"):
        rasterize(*scene[:4], scene[4][:10], *scene[5:], W, H, NEAR, FAR)


def test_antialiased_mode_keeps_subpixel_splats_to_their_true_size():
    """Classic mode swells a splat far smaller than a pixel to the 0.3 px^2 filter (its
    drawn coverage barely depends on its size); antialiased mode draws coverage in
    proportion to its projected area, as a camera integrating over the pixel would."""
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[20.0, 0, 16.0], [0, 20.0, 12.0], [0, 0, 1]]])
    means = torch.tensor([[1.25, 1.25, 50.0]])  # 1 px = 2.5 m; on a pixel centre
    quats = torch.tensor([[1.0, 0, 0, 0]])

    def coverage(scale: float, mode: str) -> float:
        out = rasterize(means, quats, torch.full((1, 3), scale), torch.tensor([0.9]),
                        torch.ones(1, 3), viewmats, Ks, W, H, 0.1, 1e3, backend="torch",
                        rasterize_mode=mode)
        return float(out.alpha.sum())

    big, small = 0.5, 0.25  # 0.2 and 0.1 px standard deviations
    classic = coverage(big, "classic") / coverage(small, "classic")
    aa = coverage(big, "antialiased") / coverage(small, "antialiased")
    assert classic < 1.15
    assert 3.0 < aa < 4.5
    # Large splats are untouched by the filter's compensation (det ratio ~ 1).
    near = torch.tensor([[0.0, 0.0, 5.0]])
    outs = [rasterize(near, quats, torch.full((1, 3), 2.0), torch.tensor([0.9]),
                      torch.ones(1, 3), viewmats, Ks, W, H, 0.1, 1e3, backend="torch",
                      rasterize_mode=m).alpha for m in ("classic", "antialiased")]
    assert (outs[0] - outs[1]).abs().max() < 0.01
    with pytest.raises(ValueError, match="rasterize_mode"):
        rasterize(near, quats, torch.ones(1, 3), torch.tensor([0.9]), torch.ones(1, 3),
                  viewmats, Ks, W, H, backend="torch", rasterize_mode="mip")


def test_antialiased_mode_culls_and_bounds_with_the_compensated_opacity():
    """As gsplat: a sub-pixel splat whose opacity x compensation is under 1/255 is culled
    (radii 0), though its raw opacity would pass; a brighter one gets a smaller box than
    in classic mode (its opacity-aware extent shrinks with the compensated opacity)."""
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[20.0, 0, 16.0], [0, 20.0, 12.0], [0, 0, 1]]])
    means = torch.tensor([[1.25, 1.25, 50.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]])
    scales = torch.full((1, 3), 0.25)  # 0.1 px: compensation ~ 0.03

    def radii(opacity: float, mode: str) -> torch.Tensor:
        return rasterize(means, quats, scales, torch.tensor([opacity]), torch.ones(1, 3),
                         viewmats, Ks, W, H, 0.1, 1e3, backend="torch",
                         rasterize_mode=mode).radii[0, 0]

    faint = 10 / 255
    assert (radii(faint, "classic") > 0).all()
    assert (radii(faint, "antialiased") == 0).all()
    assert (radii(0.9, "antialiased") > 0).all()
    assert (radii(0.9, "antialiased") <= radii(0.9, "classic")).all()
