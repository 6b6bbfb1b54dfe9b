"""A procedural street and its analytic, vectorised ray caster (numpy).

Everything here lives in the *road frame*: z up, ground at z = 0, the road centre line
starting at the origin heading +x and bending with constant curvature ``kappa``
(0 = straight, > 0 = curving left). Positions on the street are also addressed in road
coordinates (s, d): arc length along the centre line and signed lateral offset (left +).

The scene holds a carriageway with lane markings (and optional parking lanes), kerbs,
sidewalks with tiles, building facades with windows, poles and trees, vehicles (parked
or driving along lanes at constant speed) and a sky with clouds. Shading is Lambertian
under one sun plus ambient light and has no view-dependent terms, so what a camera sees
is a function of the surface point only.

Casting works on *bundles*: one origin, M unit directions, one time. Large surfaces are
tested against every ray; small objects are first culled with their bounding spheres
(one [M, G] matmul per bundle) so each is tested only on the rays that can hit it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenes.geometry import make_pose, rot_z

# Surface kinds of a hit.
SKY, ROAD, SIDEWALK, KERB, FACADE, VEHICLE, POLE, TRUNK, CANOPY = range(9)

KERB_HEIGHT = 0.15
LANE_WIDTH = 3.5
PARKING_WIDTH = 2.4

# LiDAR reflectivity per surface kind (scaled to 0-255 intensity on output).
_REFLECTIVITY = np.array([0.0, 0.12, 0.3, 0.35, 0.3, 0.5, 0.45, 0.2, 0.15])

_FACADE_PALETTE = np.array([
    [0.62, 0.32, 0.24], [0.72, 0.62, 0.48], [0.55, 0.55, 0.55], [0.82, 0.80, 0.74],
    [0.45, 0.36, 0.30], [0.70, 0.50, 0.35], [0.60, 0.64, 0.68], [0.78, 0.70, 0.58],
])
_VEHICLE_PALETTE = np.array([
    [0.85, 0.85, 0.85], [0.08, 0.08, 0.09], [0.55, 0.57, 0.60], [0.65, 0.08, 0.07],
    [0.10, 0.20, 0.50], [0.80, 0.78, 0.70], [0.15, 0.35, 0.20], [0.90, 0.70, 0.10],
])
# (label, length, width, height, weight)
VEHICLE_TYPES = (
    ("Car", 4.5, 1.8, 1.5, 0.6),
    ("Car", 4.9, 2.0, 1.8, 0.2),
    ("Pickup Truck", 5.4, 2.0, 1.9, 0.1),
    ("Bus", 11.0, 2.5, 3.2, 0.1),
)


# ----------------------------------------------------------------------------- noise


def _hash2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic hash of integer lattice points to [0, 1)."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263
         + np.asarray(seed, dtype=np.int64) * 1442695041) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return h.astype(np.float64) / 4294967296.0


def value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 2D value noise in [0, 1) (bilinear with smoothstep)."""
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = x - x0
    fy = y - y0
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    ix = x0.astype(np.int64)
    iy = y0.astype(np.int64)
    a = _hash2(ix, iy, seed)
    b = _hash2(ix + 1, iy, seed)
    c = _hash2(ix, iy + 1, seed)
    d = _hash2(ix + 1, iy + 1, seed)
    return (a + (b - a) * fx) + ((c + (d - c) * fx) - (a + (b - a) * fx)) * fy


def fbm(x: np.ndarray, y: np.ndarray, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal value noise, roughly in [0, 1)."""
    out = np.zeros_like(x, dtype=np.float64)
    amp, total, f = 0.5, 0.0, 1.0
    for o in range(octaves):
        out += amp * value_noise(x * f, y * f, seed + 17 * o)
        total += amp
        amp *= 0.5
        f *= 2.0
    return out / total


# ----------------------------------------------------------------------------- road


@dataclass(frozen=True)
class Road:
    """Centre-line geometry and cross-section of the street.

    Attributes:
        kappa: signed curvature (1/m), 0 for a straight road.
        lanes: lanes per direction (right-hand traffic: d < 0 drives along +s).
        parking: whether a parking lane lines each side.
        sidewalk: sidewalk width (m).
        s_min, s_max: extent of the built street along s.
    """

    kappa: float
    lanes: int
    parking: bool
    sidewalk: float
    s_min: float
    s_max: float

    @property
    def half_width(self) -> float:
        """Half width of the carriageway (kerb line), m."""
        return self.lanes * LANE_WIDTH + (PARKING_WIDTH if self.parking else 0.0)

    @property
    def facade_d(self) -> float:
        return self.half_width + self.sidewalk

    def lane_d(self, lane: int) -> float:
        """Lateral centre of a lane: lane >= 0 drives along +s (d < 0), lane < 0 against."""
        return -(lane + 0.5) * LANE_WIDTH if lane >= 0 else (-lane - 0.5) * LANE_WIDTH

    def to_xy(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Road coordinates -> road-frame xy: [..., 2]."""
        s = np.asarray(s, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        if self.kappa == 0.0:
            return np.stack([s, d + 0 * s], -1)
        R = 1.0 / self.kappa
        phi = s * self.kappa
        return np.stack([(R - d) * np.sin(phi), R - (R - d) * np.cos(phi)], -1)

    def heading(self, s: np.ndarray) -> np.ndarray:
        """Direction of +s at arc length s (radians from +x)."""
        return np.asarray(s, dtype=np.float64) * self.kappa

    def to_sd(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Road-frame xy -> road coordinates (s, d)."""
        if self.kappa == 0.0:
            return x, y
        R = 1.0 / self.kappa
        sgn = np.sign(R)
        vx, vy = x, y - R
        d = R - sgn * np.sqrt(vx * vx + vy * vy)
        s = np.arctan2(sgn * vx, -sgn * vy) / self.kappa
        return s, d

    def ray_to_d(self, o: np.ndarray, dirs: np.ndarray, d0: float) -> np.ndarray:
        """Smallest positive ray parameter where the ray meets the vertical surface d = d0.

        Args:
            o: [3] origin; dirs: [M, 3] unit directions.

        Returns:
            [M] distance, inf where the ray never meets it.
        """
        dx, dy = dirs[:, 0], dirs[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kappa == 0.0:
                t = (d0 - o[1]) / dy
                return np.where(t > 1e-6, t, np.inf)
            R = 1.0 / self.kappa
            rho = abs(R - d0)
            cx, cy = o[0], o[1] - R
            a = dx * dx + dy * dy
            b = 2 * (cx * dx + cy * dy)
            c = cx * cx + cy * cy - rho * rho
            disc = b * b - 4 * a * c
            sq = np.sqrt(np.maximum(disc, 0.0))
            t1 = (-b - sq) / (2 * a)
            t2 = (-b + sq) / (2 * a)
            t = np.where(t1 > 1e-6, t1, np.where(t2 > 1e-6, t2, np.inf))
            return np.where((disc >= 0) & (a > 1e-12), t, np.inf)


# ----------------------------------------------------------------------------- objects


@dataclass
class Vehicle:
    """A vehicle driving (or parked) along a fixed lateral offset at constant speed.

    Road-frame pose at time t: box centre at (s0 + v t, d), z = height / 2, heading along
    the road (+pi when driving against +s).
    """

    track_id: str
    label: str
    size: np.ndarray  # (length, width, height)
    s0: float
    d: float
    speed: float  # along +s (negative: against)
    reverse: bool
    color: np.ndarray

    def pose(self, road: Road, t: float | np.ndarray) -> np.ndarray:
        """Road-frame object_to_world: [4, 4] for scalar t, else [M, 4, 4]."""
        t = np.asarray(t, dtype=np.float64)
        s = self.s0 + self.speed * t
        xy = road.to_xy(s, np.full_like(s, self.d))
        yaw = road.heading(s) + (np.pi if self.reverse else 0.0)
        pos = np.concatenate([xy, np.full(s.shape + (1,), self.size[2] / 2)], -1)
        return make_pose(rot_z(yaw), pos)

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Boxes in the object frame: (centre [3], half extents [3], part id).

        Part 0 body, 1 cabin (glass sides), 2 wheels. All inside the track box.
        """
        L, W, H = self.size
        z0 = -H / 2
        body_bottom, body_top = z0 + 0.28, z0 + 0.55 * H
        boxes = [(np.array([0.0, 0.0, (body_bottom + body_top) / 2]),
                  np.array([L / 2, W / 2, (body_top - body_bottom) / 2]), 0)]
        is_bus = L > 8
        cab_x0, cab_x1 = (-0.48 * L, 0.48 * L) if is_bus else (-0.32 * L, 0.22 * L)
        boxes.append((np.array([(cab_x0 + cab_x1) / 2, 0.0, (body_top + H / 2) / 2]),
                      np.array([(cab_x1 - cab_x0) / 2, W / 2 - 0.06, (H / 2 - body_top) / 2]),
                      1))
        wr = 0.34
        for sx in (-1, 1):
            for sy in (-1, 1):
                boxes.append((np.array([sx * (L / 2 - 0.85), sy * (W / 2 - 0.14), z0 + wr]),
                              np.array([wr, 0.13, wr]), 2))
        return boxes


@dataclass
class Prop:
    """A static pole or tree at road-frame xy."""

    kind: int  # POLE or TRUNK (a tree: trunk + canopy)
    xy: np.ndarray
    radius: float
    height: float
    canopy_radius: float = 0.0
    canopy_z: float = 0.0


@dataclass
class Hits:
    """Result of casting a bundle.

    Attributes:
        t: [M] distance along each unit ray (inf = sky).
        rgb: [M, 3] float64 shaded colour in [0, 1].
        kind: [M] surface kind.
        instance: [M] vehicle index for VEHICLE hits, else -1.
        normal: [M, 3] surface normal (road frame; zeros for sky).
    """

    t: np.ndarray
    rgb: np.ndarray
    kind: np.ndarray
    instance: np.ndarray
    normal: np.ndarray


class Street:
    """The procedural scene: geometry, appearance, motion and the ray caster."""

    def __init__(self, road: Road, facade_blocks: dict[int, tuple[np.ndarray, np.ndarray,
                 np.ndarray]], props: list[Prop], vehicles: list[Vehicle], sun: np.ndarray,
                 seed: int) -> None:
        self.road = road
        # side (+1 left / -1 right) -> (block start s [B+1], heights [B], colours [B, 3])
        self.facade_blocks = facade_blocks
        self.props = props
        self.vehicles = vehicles
        self.sun = sun / np.linalg.norm(sun)
        self.seed = seed
        self._vehicle_parts = []
        for v in vehicles:
            parts = v.parts()
            self._vehicle_parts.append((np.stack([p[0] for p in parts]),
                                        np.stack([p[1] for p in parts]),
                                        np.array([p[2] for p in parts])))
        self._vehicle_radius = np.array([np.linalg.norm(v.size) / 2 for v in vehicles])
        if props:
            self._prop_centres = np.array([
                [p.xy[0], p.xy[1], p.height / 2] if p.kind == POLE
                else [p.xy[0], p.xy[1], (p.canopy_z + p.canopy_radius) / 2] for p in props])
            self._prop_radius = np.array([
                np.hypot(p.radius, p.height / 2) if p.kind == POLE
                else np.hypot(p.canopy_radius, (p.canopy_z + p.canopy_radius) / 2) + 0.1
                for p in props])
        else:
            self._prop_centres = np.zeros((0, 3))
            self._prop_radius = np.zeros(0)

    # ------------------------------------------------------------------ motion

    def vehicle_poses(self, t: float) -> np.ndarray:
        """Road-frame object_to_world of every vehicle at time t: [V, 4, 4]."""
        if not self.vehicles:
            return np.zeros((0, 4, 4))
        return np.stack([v.pose(self.road, t) for v in self.vehicles])

    def inside_vehicle(self, p: np.ndarray, t: float, margin: float = 0.3) -> bool:
        """Whether road-frame point p [3] is inside (or within margin of) a vehicle box."""
        for v, T in zip(self.vehicles, self.vehicle_poses(t), strict=True):
            local = T[:3, :3].T @ (p - T[:3, 3])
            if np.all(np.abs(local) <= v.size / 2 + margin):
                return True
        return False

    # ------------------------------------------------------------------ casting

    def cast(self, o: np.ndarray, dirs: np.ndarray, t: float, max_dist: float = 400.0) -> Hits:
        """Cast a bundle of rays from one origin at one time.

        Args:
            o: [3] road-frame origin.
            dirs: [M, 3] unit directions.
            t: time (seconds since segment start) that places the vehicles.
            max_dist: objects farther than this are ignored.
        """
        M = len(dirs)
        best = np.full(M, np.inf)
        kind = np.zeros(M, dtype=np.int8)
        inst = np.full(M, -1, dtype=np.int32)
        normal = np.zeros((M, 3))

        def take(idx: np.ndarray, tt: np.ndarray, k: int, n: np.ndarray,
                 i: np.ndarray | int = -1) -> None:
            better = tt < best[idx]
            if not better.any():
                return
            sel = idx[better]
            best[sel] = tt[better]
            kind[sel] = k
            inst[sel] = i if np.isscalar(i) else np.asarray(i)[better]
            normal[sel] = n if n.ndim == 1 else n[better]

        all_idx = np.arange(M)
        self._cast_ground(o, dirs, all_idx, take)
        self._cast_facades(o, dirs, all_idx, take)
        self._cast_objects(o, dirs, t, max_dist, take)
        best[best > max_dist] = np.inf
        kind[~np.isfinite(best)] = SKY
        inst[kind != VEHICLE] = -1
        rgb = self._shade(o, dirs, best, kind, inst, normal, t)
        return Hits(best, rgb, kind, inst, normal)

    def _cast_ground(self, o, dirs, idx, take) -> None:
        road = self.road
        W = road.half_width
        dz = dirs[:, 2]
        down = dz < -1e-9
        if not down.any():
            return
        ii = idx[down]
        dd = dirs[down]
        t_road = -o[2] / dd[:, 2]
        t_side = (KERB_HEIGHT - o[2]) / dd[:, 2]
        pr = o + t_road[:, None] * dd
        ps = o + t_side[:, None] * dd
        _, d_road = road.to_sd(pr[:, 0], pr[:, 1])
        _, d_side = road.to_sd(ps[:, 0], ps[:, 1])
        on_road = (np.abs(d_road) <= W) & (t_road > 0)
        on_side = (np.abs(d_side) > W) & (t_side > 0)
        # Above the sidewalk plane over the road but below it past the kerb line: the ray
        # meets the kerb face; d is near-linear along such a short stretch.
        kerb = ~on_side & ~on_road & (t_road > 0) & (np.abs(d_road) > W)
        up = np.array([0.0, 0.0, 1.0])
        if o[2] < KERB_HEIGHT:
            # Origin below the sidewalk top (never for our sensors): only the road counts.
            on_side &= False
            kerb &= False
        take(ii[on_road], t_road[on_road], ROAD, up)
        take(ii[on_side], t_side[on_side], SIDEWALK, up)
        if kerb.any():
            ad_s, ad_r = np.abs(d_side[kerb]), np.abs(d_road[kerb])
            frac = np.clip((W - ad_s) / np.maximum(ad_r - ad_s, 1e-9), 0, 1)
            tk = t_side[kerb] + frac * (t_road[kerb] - t_side[kerb])
            pk = o + tk[:, None] * dd[kerb]
            n = self._lateral_normal(pk, -np.sign(d_road[kerb]))
            take(ii[kerb], tk, KERB, n)

    def _lateral_normal(self, p: np.ndarray, sign: np.ndarray) -> np.ndarray:
        """Unit horizontal vectors along +d (times ``sign``) at points p [M, 3]."""
        s, _ = self.road.to_sd(p[:, 0], p[:, 1])
        h = self.road.heading(s)
        n = np.stack([-np.sin(h), np.cos(h), np.zeros_like(h)], -1)
        return n * sign[:, None]

    def _cast_facades(self, o, dirs, idx, take) -> None:
        road = self.road
        for side, (starts, heights, _) in self.facade_blocks.items():
            tt = road.ray_to_d(o, dirs, side * road.facade_d)
            ok = np.isfinite(tt)
            if not ok.any():
                continue
            p = o + tt[ok, None] * dirs[ok]
            s, _ = road.to_sd(p[:, 0], p[:, 1])
            b = np.searchsorted(starts, s, side="right") - 1
            inside = (b >= 0) & (b < len(heights))
            h = np.where(inside, heights[np.clip(b, 0, len(heights) - 1)], -1.0)
            hit = inside & (p[:, 2] >= 0) & (p[:, 2] <= h)
            if not hit.any():
                continue
            n = self._lateral_normal(p[hit], np.full(int(hit.sum()), -float(side)))
            take(idx[ok][hit], tt[ok][hit], FACADE, n)

    def _cast_objects(self, o, dirs, t, max_dist, take) -> None:
        poses = self.vehicle_poses(t)
        centres = np.concatenate([poses[:, :3, 3] if len(poses) else np.zeros((0, 3)),
                                  self._prop_centres])
        radii = np.concatenate([self._vehicle_radius, self._prop_radius])
        if len(centres) == 0:
            return
        rel = centres - o
        dist = np.linalg.norm(rel, axis=1)
        # Cull with the bundle's bounding cone first: most objects are outside the view.
        axis = dirs.mean(0)
        axis /= max(np.linalg.norm(axis), 1e-12)
        half_angle = np.arccos(np.clip((dirs @ axis).min(), -1.0, 1.0))
        inside = dist <= radii
        with np.errstate(invalid="ignore", divide="ignore"):
            ang = np.arccos(np.clip(rel @ axis / dist, -1.0, 1.0))
            ang_r = np.arcsin(np.clip(radii / dist, 0.0, 1.0))
        cand = np.nonzero(inside | ((dist - radii < max_dist) & (ang - ang_r <= half_angle)))[0]
        if len(cand) == 0:
            return
        # Per-object ray masks from bounding spheres, [G, M] so each row is contiguous.
        d32 = dirs.astype(np.float32)
        proj = rel[cand].astype(np.float32) @ d32.T
        r2 = (radii[cand] ** 2).astype(np.float32)[:, None]
        mask = (proj > -np.sqrt(r2)) & ((dist[cand] ** 2).astype(np.float32)[:, None]
                                        - proj * proj < r2)
        nv = len(self.vehicles)
        for j, g in enumerate(cand):
            rays = np.flatnonzero(mask[j])
            if len(rays) == 0:
                continue
            if g < nv:
                self._cast_vehicle(o, dirs, rays, g, poses[g], take)
            else:
                self._cast_prop(o, dirs, rays, self.props[g - nv], take)

    def _cast_vehicle(self, o, dirs, rays, vi, T, take) -> None:
        R, c = T[:3, :3], T[:3, 3]
        centres, halves, parts = self._vehicle_parts[vi]
        ol = R.T @ (o - c)  # origin in the object frame
        dl = dirs[rays] @ R  # == R.T @ d per ray
        tt, axis, sgn = _ray_boxes(ol - centres, dl, halves)  # [m, P]
        best = np.argmin(tt, axis=1)
        ar = np.arange(len(rays))
        tb = tt[ar, best]
        ok = np.isfinite(tb)
        if not ok.any():
            return
        nl = np.zeros((int(ok.sum()), 3))
        nl[np.arange(len(nl)), axis[ar, best][ok]] = sgn[ar, best][ok]
        take(rays[ok], tb[ok], VEHICLE, nl @ R.T, vi * 4 + parts[best[ok]])

    def _cast_prop(self, o, dirs, rays, prop: Prop, take) -> None:
        d = dirs[rays]
        tt, n = _ray_vcylinder(o, d, prop.xy, prop.radius, 0.0, prop.height)
        ok = np.isfinite(tt)
        if ok.any():
            take(rays[ok], tt[ok], POLE if prop.kind == POLE else TRUNK, n[ok])
        if prop.kind == TRUNK:
            centre = np.array([prop.xy[0], prop.xy[1], prop.canopy_z])
            tt, n = _ray_sphere(o, d, centre, prop.canopy_radius)
            ok = np.isfinite(tt)
            if ok.any():
                take(rays[ok], tt[ok], CANOPY, n[ok])

    # ------------------------------------------------------------------ shading

    def _shade(self, o, dirs, t, kind, inst, normal, time) -> np.ndarray:
        M = len(dirs)
        albedo = np.zeros((M, 3))
        hit = np.isfinite(t)
        p = np.zeros((M, 3))
        p[hit] = o + t[hit, None] * dirs[hit]
        s = np.zeros(M)
        d = np.zeros(M)
        s[hit], d[hit] = self.road.to_sd(p[hit, 0], p[hit, 1])
        seed = self.seed
        for k in np.unique(kind):
            m = kind == k
            if k == SKY:
                continue
            ss, dd, pz = s[m], d[m], p[m, 2]
            if k == ROAD:
                albedo[m] = self._road_albedo(ss, dd)
            elif k == SIDEWALK:
                n = fbm(ss * 3, dd * 3, seed + 5, 2)
                tile = (np.abs(((ss / 1.5) % 1) - 0.5) > 0.47) | (np.abs(((dd / 1.5) % 1) - 0.5)
                                                                  > 0.47)
                base = 0.55 + 0.12 * n - 0.12 * tile
                albedo[m] = base[:, None] * np.array([1.0, 0.97, 0.92])
            elif k == KERB:
                albedo[m] = (0.62 + 0.08 * fbm(ss * 4, pz * 4, seed + 6, 2))[:, None]
            elif k == FACADE:
                albedo[m] = self._facade_albedo(ss, dd, pz)
            elif k == VEHICLE:
                albedo[m] = self._vehicle_albedo(p[m], inst[m], normal[m], time)
            elif k == POLE:
                albedo[m] = (0.45 + 0.1 * fbm(pz * 2, ss, seed + 7, 2))[:, None] * np.array(
                    [0.95, 0.97, 1.0])
            elif k == TRUNK:
                n = fbm(pz * 6, (ss + dd) * 6, seed + 8, 2)
                albedo[m] = (0.25 + 0.15 * n)[:, None] * np.array([1.0, 0.75, 0.5])
            elif k == CANOPY:
                q = p[m]
                n = fbm(q[:, 0] * 2.5 + q[:, 2] * 1.7, q[:, 1] * 2.5 - q[:, 2] * 1.3,
                        seed + 9, 3)
                albedo[m] = np.stack([0.10 + 0.18 * n, 0.28 + 0.30 * n, 0.08 + 0.10 * n], -1)
        lambert = np.clip(normal @ self.sun, 0.0, 1.0)
        rgb = albedo * (0.5 + 0.6 * lambert)[:, None]
        sky = kind == SKY
        if sky.any():
            rgb[sky] = self._sky(dirs[sky])
        return np.clip(rgb, 0.0, 1.0)

    def _road_albedo(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        road, seed = self.road, self.seed
        n = fbm(s * 2.0, d * 2.0, seed + 1, 3)
        g = 0.30 + 0.10 * n + 0.03 * value_noise(s * 9, d * 9, seed + 2)
        col = g[:, None] * np.array([1.0, 1.0, 1.04])
        ad = np.abs(d)
        lanes_w = road.lanes * LANE_WIDTH
        white = np.zeros(len(s), dtype=bool)
        # Edge lines where driving lanes meet the parking lane / kerb.
        white |= np.abs(ad - (lanes_w - 0.1)) < 0.08
        # Dashed lane dividers: 3 m painted, 6 m gap.
        dash = ((s % 9.0) < 3.0)
        for k in range(1, road.lanes):
            white |= (np.abs(ad - k * LANE_WIDTH) < 0.08) & dash
        yellow = np.abs(ad - 0.15) < 0.06
        col[white] = 0.85 + 0.05 * n[white, None]
        col[yellow] = np.array([0.85, 0.68, 0.12])
        if road.parking:
            bay = (ad > lanes_w) & (np.abs(((s / 6.0) % 1.0) - 0.5) > 0.49)
            col[bay] = 0.8
        return col

    def _facade_albedo(self, s: np.ndarray, d: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = np.zeros((len(s), 3))
        for side, (starts, heights, colours) in self.facade_blocks.items():
            m = np.sign(d) == side
            if not m.any():
                continue
            ss, zz = s[m], z[m]
            b = np.clip(np.searchsorted(starts, ss, side="right") - 1, 0, len(heights) - 1)
            base = colours[b] * (0.85 + 0.3 * fbm(ss * 1.5, zz * 1.5, self.seed + 3 + b % 5,
                                                  3))[:, None]
            # Windows: floors of 3.2 m above a 4 m shop front, bays of 2.6 m along s.
            floor = np.floor((zz - 4.0) / 3.2)
            fz = ((zz - 4.0) / 3.2) % 1.0
            bay = np.floor((ss - starts[b]) / 2.6)
            fs = ((ss - starts[b]) / 2.6) % 1.0
            window = (zz > 4.0) & (zz < heights[b] - 1.0) & (fz > 0.25) & (fz < 0.8) & \
                (fs > 0.2) & (fs < 0.8)
            shade = _hash2(bay.astype(np.int64), floor.astype(np.int64) + 1000 * b, self.seed)
            glass = np.stack([0.12 + 0.15 * shade, 0.16 + 0.15 * shade, 0.22 + 0.18 * shade], -1)
            shop = (zz > 0.6) & (zz < 3.2) & (fs > 0.1) & (fs < 0.9)
            col = base
            col[window] = glass[window]
            col[shop] = 0.5 * glass[shop] + 0.05
            out[m] = col
        return out

    def _vehicle_albedo(self, p, inst, normal, time) -> np.ndarray:
        out = np.zeros((len(p), 3))
        vi = inst // 4
        part = inst % 4
        for v in np.unique(vi):
            m = vi == v
            veh = self.vehicles[v]
            col = np.repeat(veh.color[None], int(m.sum()), 0)
            T = veh.pose(self.road, time)
            local = (p[m] - T[:3, 3]) @ T[:3, :3]
            nl = normal[m] @ T[:3, :3]
            pm = part[m]
            glass = (pm == 1) & (np.abs(nl[:, 2]) < 0.5)
            col[glass] = np.array([0.10, 0.12, 0.15])
            col[pm == 2] = np.array([0.05, 0.05, 0.05])
            # Lights on the front (+x) and rear faces of the body.
            L, W, H = veh.size
            light = (pm == 0) & (np.abs(nl[:, 0]) > 0.5) & (np.abs(np.abs(local[:, 1])
                                                                   - (W / 2 - 0.3)) < 0.2)
            col[light & (nl[:, 0] > 0)] = np.array([0.95, 0.95, 0.85])
            col[light & (nl[:, 0] < 0)] = np.array([0.75, 0.05, 0.05])
            grain = 0.92 + 0.08 * value_noise(local[:, 0] * 6, local[:, 2] * 6 + local[:, 1],
                                              self.seed + 11 + v)
            out[m] = col * grain[:, None]
        return out

    def _sky(self, dirs: np.ndarray) -> np.ndarray:
        elev = np.clip(dirs[:, 2], -0.2, 1.0)
        u = np.clip(elev * 2.5, 0, 1)[:, None]
        horizon = np.array([0.80, 0.86, 0.93])
        zenith = np.array([0.30, 0.50, 0.85])
        col = horizon + (zenith - horizon) * u
        # Clouds on a plane high above: direction-only, so the sky sits at infinity.
        k = 1.0 / np.maximum(dirs[:, 2], 0.05)
        cx, cy = dirs[:, 0] * k, dirs[:, 1] * k
        cl = fbm(cx * 0.8, cy * 0.8, self.seed + 21, 4)
        cover = np.clip((cl - 0.5) * 3.0, 0, 1) * np.clip(elev * 6, 0, 1)
        return col * (1 - cover[:, None]) + 0.95 * cover[:, None]


def _ray_boxes(o: np.ndarray, d: np.ndarray, half: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test of M rays against P axis-aligned boxes centred at the origin.

    Args:
        o: [P, 3] ray origin in each box's frame; d: [M, 3] directions (shared frame
            orientation); half: [P, 3] half extents.

    Returns:
        t [M, P] (inf: miss, or origin inside), hit axis [M, P], normal sign [M, P].
    """
    inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)  # [M, 3]
    t1 = (-half[None] - o[None]) * inv[:, None]  # [M, P, 3]
    t2 = (half[None] - o[None]) * inv[:, None]
    tmin = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2).min(axis=2)
    axis = np.argmax(tmin, axis=2)
    tnear = np.take_along_axis(tmin, axis[..., None], 2)[..., 0]
    hit = (tnear <= tfar) & (tnear > 1e-6)
    sgn = -np.sign(np.take_along_axis(np.broadcast_to(d[:, None], tmin.shape),
                                      axis[..., None], 2)[..., 0])
    return np.where(hit, tnear, np.inf), axis, sgn


def _ray_vcylinder(o, d, xy, r, z0, z1) -> tuple[np.ndarray, np.ndarray]:
    """Ray vs vertical cylinder side wall: t [M] and outward normals [M, 3]."""
    ox, oy = o[0] - xy[0], o[1] - xy[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (ox * d[:, 0] + oy * d[:, 1])
    c = ox * ox + oy * oy - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    z = o[2] + t * d[:, 2]
    ok = (disc >= 0) & (a > 1e-12) & (t > 1e-6) & (z >= z0) & (z <= z1)
    t = np.where(ok, t, np.inf)
    n = np.zeros((len(d), 3))
    tt = np.where(ok, t, 0.0)
    n[:, 0] = (ox + tt * d[:, 0]) / r
    n[:, 1] = (oy + tt * d[:, 1]) / r
    return t, n


def _ray_sphere(o, d, centre, r) -> tuple[np.ndarray, np.ndarray]:
    """Ray vs sphere (first hit from outside): t [M] and normals [M, 3]."""
    oc = o - centre
    b = d @ oc
    c = oc @ oc - r * r
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    ok = (disc >= 0) & (t > 1e-6)
    t = np.where(ok, t, np.inf)
    tt = np.where(ok, t, 0.0)
    n = (oc + tt[:, None] * d) / r
    return t, n


# ----------------------------------------------------------------------------- building


def build_street(seed: int, *, length: float, kappa: float, traffic: float,
                 ego_lane: int, ego_s0: float, ego_speed: float, duration: float) -> Street:
    """Lay out a street for a drive of ``length`` metres (deterministic per seed).

    Args:
        seed: layout seed.
        length: how far along s the ego drives (buildings extend beyond).
        kappa: curvature of the road (1/m).
        traffic: vehicles per 100 m per lane (moving) and parked-car density scale.
        ego_lane: lane index the ego drives in (>= 0).
        ego_s0, ego_speed, duration: the ego's drive, so no vehicle starts on top of it.
    """
    rng = np.random.default_rng(seed)
    lanes = int(rng.integers(1, 3))
    parking = bool(rng.random() < 0.7)
    road = Road(kappa=kappa, lanes=lanes, parking=parking, sidewalk=float(rng.uniform(3, 5)),
                s_min=ego_s0 - 80.0, s_max=ego_s0 + length + 160.0)

    facade_blocks = {}
    for side in (1, -1):
        starts = [road.s_min]
        while starts[-1] < road.s_max:
            starts.append(starts[-1] + float(rng.uniform(8, 24)))
        nb = len(starts) - 1
        heights = rng.uniform(6, 24, nb)
        colours = _FACADE_PALETTE[rng.integers(0, len(_FACADE_PALETTE), nb)] * rng.uniform(
            0.85, 1.1, (nb, 1))
        facade_blocks[side] = (np.array(starts), heights, np.clip(colours, 0, 1))

    props: list[Prop] = []
    for side in (1, -1):
        s = road.s_min + float(rng.uniform(0, 10))
        while s < road.s_max:
            kind = POLE if rng.random() < 0.5 else TRUNK
            if kind == POLE:
                d = side * (road.half_width + 0.5)
                props.append(Prop(POLE, road.to_xy(s, d), 0.12, float(rng.uniform(5, 8))))
            else:
                d = side * (road.half_width + road.sidewalk * 0.5)
                cr = float(rng.uniform(1.4, 2.2))
                props.append(Prop(TRUNK, road.to_xy(s, d), 0.18, 3.0 + cr * 0.5, cr,
                                  float(rng.uniform(3.6, 4.6))))
            s += float(rng.uniform(12, 30))

    vehicles: list[Vehicle] = []
    types = VEHICLE_TYPES
    weights = np.array([t[4] for t in types])
    weights /= weights.sum()
    span0, span1 = ego_s0 - 50.0, ego_s0 + length + 120.0

    def new_vehicle(s: float, d: float, speed: float, reverse: bool, allow_bus: bool
                    ) -> Vehicle:
        while True:
            ti = int(rng.choice(len(types), p=weights))
            if allow_bus or types[ti][0] != "Bus":
                break
        label, L, W, H, _ = types[ti]
        size = np.array([L, W, H]) * rng.uniform(0.95, 1.05, 3)
        color = _VEHICLE_PALETTE[rng.integers(0, len(_VEHICLE_PALETTE))] * rng.uniform(0.9, 1.1)
        return Vehicle(f"veh-{seed}-{len(vehicles):03d}", label, size, s, d, speed, reverse,
                       np.clip(color, 0, 1))

    # Moving traffic: each lane has one speed, so vehicles in a lane never collide.
    for lane in [*range(lanes), *range(-lanes, 0)]:
        d = road.lane_d(lane)
        forward = lane >= 0
        if lane == ego_lane:
            speed = ego_speed
        elif forward:
            speed = ego_speed * float(rng.uniform(0.5, 1.4))
        else:
            speed = -float(rng.uniform(6, 13))
        # Vehicles travel |speed| * duration during the log: cover where they will be seen.
        lo = span0 - max(0.0, speed * duration)
        hi = span1 - min(0.0, speed * duration)
        s = lo + float(rng.exponential(100.0 / max(traffic, 1e-6)))
        while s < hi:
            v = new_vehicle(s, d, speed, not forward, allow_bus=lane != ego_lane)
            gap_ok = True
            if lane == ego_lane:
                # Same speed as the ego: keep it clear of the ego's own box.
                gap_ok = abs(s - ego_s0) > v.size[0] / 2 + 8.0
            if gap_ok:
                vehicles.append(v)
            s += v.size[0] + 3.0 + float(rng.exponential(100.0 / max(traffic, 1e-6)))

    if parking:
        for side in (1, -1):
            d = side * (lanes * LANE_WIDTH + PARKING_WIDTH / 2)
            s = span0 + float(rng.uniform(0, 8))
            while s < span1:
                if rng.random() < min(0.9, 0.45 * traffic + 0.1):
                    v = new_vehicle(s, d, 0.0, side > 0, allow_bus=False)
                    vehicles.append(v)
                    s += v.size[0] + float(rng.uniform(1.0, 3.0))
                else:
                    s += float(rng.uniform(4, 10))
    # Re-number so ids follow list order.
    for i, v in enumerate(vehicles):
        v.track_id = f"veh-{i:03d}"

    sun_az = float(rng.uniform(0, 2 * np.pi))
    sun_el = float(rng.uniform(0.5, 1.1))
    sun = np.array([np.cos(sun_az) * np.cos(sun_el), np.sin(sun_az) * np.cos(sun_el),
                    np.sin(sun_el)])
    return Street(road, facade_blocks, props, vehicles, sun, seed)
