"""Scene assets on disk: save a ``NeuralScene`` and load it back (DESIGN.md, Assets).

Layout of a scene directory::

    manifest.json        schema version, source log, world/time offsets, cameras, frames
                         (ego and camera poses), tracks (per-keyframe poses), actors (file,
                         Gaussian count), sky grid, rasterize mode, metrics, method, checkpoint
                         hash, counts
    static.ply           standard 3DGS PLY of the decoded static Gaussians, world frame
    actors/<track>.ply   one per actor, object frame (file names sanitised, see manifest)
    sky.ply              decoded sky Gaussians, world frame
    state.safetensors    every parameter and buffer of the NeuralScene (resume / refine)

The world is the re-centred world of the log (``world_offset`` in the manifest gives the
source-frame translation). Floats in the manifest are plain JSON numbers written with
Python's shortest round-trip repr, so float64 poses come back bit-exact.

Writes are atomic: everything goes into a hidden temporary sibling directory, each file
and the directory are fsynced, then the directory is renamed into place. An existing
scene is replaced only once the new one is complete; a failed write leaves the old scene
as it was and removes the temporary directory.

PLY properties (float32, binary little-endian), as 3DGS viewers expect::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3

with f_dc = (colour - 0.5) / SH_C0, opacity = logit(opacity), scale = log(scale) and rot
the unit quaternion (w, x, y, z). Normals are zero.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recon.neural import NeuralScene, SkyGrid, Splats
from recon.render.api import RASTERIZE_MODES
from scenes.geometry import invert_pose
from scenes.log import CameraModel, LogSegment, Track

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
#: Zeroth-order real spherical harmonic; 3DGS stores colour as (c - 0.5) / SH_C0.
SH_C0 = 0.28209479177387814
MANIFEST = "manifest.json"
STATIC_PLY = "static.ply"
SKY_PLY = "sky.ply"
STATE_FILE = "state.safetensors"
ACTORS_DIR = "actors"
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
# float32 opacities 0 and 1 have infinite logits; clamp into the representable open interval.
_OPACITY_EPS = 2.0 ** -24
# exp() of a very negative log-scale underflows to 0 in float32; keep the log finite.
_MIN_SCALE = 1e-30
_MAX_ACTOR_STEM = 96


class SceneFormatError(ValueError):
    """A scene directory or one of its files is missing or malformed.

    ``path`` names the offending file or directory and ``reason`` says what is wrong;
    ``str(err)`` reads ``"<path>: <reason>"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------- JSON helpers


def _jsonable(x: Any) -> Any:
    """Plain JSON data from numpy / torch / dataclass / Path values.

    Non-finite floats become None (JSON has no NaN); anything else unknown becomes its
    repr, so free-form ``log.meta`` never makes a save fail.
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Tensor):
        return _jsonable(x.detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if is_dataclass(x) and not isinstance(x, type):
        return _jsonable(asdict(x))
    return repr(x)


def _mat(a: np.ndarray) -> list:
    """float64 nested lists (exact through JSON)."""
    return np.asarray(a, dtype=np.float64).tolist()


# --------------------------------------------------------------------------- PLY


def splats_to_ply_array(s: Splats) -> np.ndarray:
    """Structured float32 array [N] of the standard 3DGS PLY properties.

    Args:
        s: decoded splats; means [N, 3], quats [N, 4] (w, x, y, z), scales [N, 3] (m),
            opacities [N] in [0, 1], colors [N, 3] in [0, 1].
    """
    with torch.no_grad():
        means = s.means.detach().cpu().double()
        q = s.quats.detach().cpu().double()
        norm = q.norm(dim=-1, keepdim=True)
        # A zero quaternion has no rotation to normalise; write the identity instead.
        ident = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).expand_as(q)
        q = torch.where(norm > 0, q / norm.clamp_min(1e-300), ident)
        o = s.opacities.detach().cpu().double().clamp(_OPACITY_EPS, 1.0 - _OPACITY_EPS)
        cols = torch.cat([
            means,
            torch.zeros_like(means),
            (s.colors.detach().cpu().double() - 0.5) / SH_C0,
            torch.log(o / (1.0 - o))[:, None],
            torch.log(s.scales.detach().cpu().double().clamp_min(_MIN_SCALE)),
            q,
        ], dim=1).float().numpy()
    out = np.empty(len(cols), dtype=[(p, "<f4") for p in PLY_PROPERTIES])
    for i, p in enumerate(PLY_PROPERTIES):
        out[p] = cols[:, i]
    return out


def write_ply(path: Path, s: Splats) -> None:
    """Write splats as a binary little-endian 3DGS PLY (fsynced)."""
    from plyfile import PlyData, PlyElement

    el = PlyElement.describe(splats_to_ply_array(s), "vertex")
    with open(path, "wb") as f:
        PlyData([el], text=False, byte_order="<").write(f)
        f.flush()
        os.fsync(f.fileno())


def read_ply(path: str | Path) -> Splats:
    """Read a 3DGS PLY back into activated splats (float32; inverse of :func:`write_ply`).

    Raises:
        SceneFormatError: missing file, not a PLY, or without the standard properties.
    """
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise SceneFormatError(path, "PLY file is missing.")
    try:
        v = PlyData.read(str(path))["vertex"].data
    except Exception as e:  # plyfile raises assorted errors on bad headers / short data
        raise SceneFormatError(path, f"is not a readable PLY with a 'vertex' element ({e}).") from e
    missing = [p for p in PLY_PROPERTIES if p not in (v.dtype.names or ())]
    if missing:
        raise SceneFormatError(path, f"PLY lacks 3DGS properties {missing}.")

    def col(*names: str) -> Tensor:
        return torch.from_numpy(np.stack([np.asarray(v[n], dtype=np.float32) for n in names], 1))

    return Splats(
        means=col("x", "y", "z"),
        quats=col("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=torch.exp(col("scale_0", "scale_1", "scale_2")),
        opacities=torch.sigmoid(col("opacity")[:, 0]),
        colors=col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    )


def _subset(s: Splats, mask: Tensor) -> Splats:
    return Splats(s.means[mask], s.quats[mask], s.scales[mask], s.opacities[mask],
                  s.colors[mask])


def actor_file_names(actor_ids: list[str]) -> dict[str, str]:
    """Safe, unique PLY file names for track ids (any characters, any length).

    Characters outside ``[A-Za-z0-9._-]`` become ``_`` and leading dots are dropped (no
    hidden files, no ``..``). Where that loses information (collisions, also
    case-insensitive ones, or an empty / shortened name) a short hash of the raw id is
    appended so distinct ids never share a file.
    """
    out: dict[str, str] = {}
    taken: set[str] = set()
    for tid in actor_ids:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", tid).lstrip(".")
        exact = stem == tid and 0 < len(stem) <= _MAX_ACTOR_STEM
        stem = stem[:_MAX_ACTOR_STEM] or "actor"
        if not exact or stem.lower() in taken:
            stem = f"{stem}-{hashlib.sha1(tid.encode()).hexdigest()[:10]}"
        k = 1
        base = stem
        while stem.lower() in taken:  # hash collision of sanitised names: number them
            stem = f"{base}-{k}"
            k += 1
        taken.add(stem.lower())
        out[tid] = f"{stem}.ply"
    return out


# --------------------------------------------------------------------------- manifest


def _track_json(tr: Track) -> dict:
    return {"id": tr.id, "label": tr.label, "size": _mat(tr.size),
            "timestamps": _mat(tr.timestamps), "poses": _mat(tr.poses),
            "frame_indices": [int(i) for i in tr.frame_indices]}


def _track_from_json(d: dict) -> Track:
    poses = np.asarray(d["poses"], dtype=np.float64).reshape(-1, 4, 4)
    return Track(str(d["id"]), str(d["label"]), np.asarray(d["size"], dtype=np.float64),
                 np.asarray(d["timestamps"], dtype=np.float64), poses,
                 np.asarray(d["frame_indices"], dtype=np.int64))


def _camera_json(c: CameraModel) -> dict:
    return {"width": int(c.width), "height": int(c.height), "K": _mat(c.K),
            "distortion": None if c.distortion is None else _mat(c.distortion)}


def build_manifest(scene: NeuralScene, log: LogSegment, actor_files: dict[str, str], *,
                   metrics: dict | None, method: str, checkpoint_hash: str | None,
                   state_sha256: str, recon_s: float | None, extra: dict | None) -> dict:
    """The manifest dict (see module docstring); everything a later render needs."""
    meta = log.meta or {}
    src_path = meta.get("path", meta.get("sequence_path"))
    counts = scene.num_gaussians
    per_actor = torch.bincount(scene.actor_index.detach().cpu(),
                               minlength=len(scene.actor_ids)).tolist()
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": {"name": log.name, "format": log.source_format,
                   "path": None if src_path is None else str(src_path),
                   "meta": _jsonable(meta)},
        "world_offset": _mat(log.world_offset),
        "time_offset": float(log.time_offset),
        "cameras": {name: _camera_json(c) for name, c in log.cameras.items()},
        "frames": [{"index": int(f.index), "timestamp": float(f.timestamp),
                    "ego_to_world": _mat(f.ego_to_world),
                    "cameras": {c: {"timestamp": float(im.timestamp),
                                    "cam_to_world": _mat(im.cam_to_world)}
                                for c, im in f.images.items()}}
                   for f in log.frames],
        "tracks": [_track_json(scene.tracks[tid]) for tid in scene.actor_ids],
        "actors": [{"id": tid, "file": f"{ACTORS_DIR}/{actor_files[tid]}",
                    "gaussians": int(per_actor[i])}
                   for i, tid in enumerate(scene.actor_ids)],
        "sky": scene.sky.to_json(),
        "rasterize_mode": scene.rasterize_mode,
        "latent": int(scene.latent),
        "channels": int(scene.channels),
        "counts": {**{k: int(v) for k, v in counts.items()},
                   "total": int(sum(counts.values()))},
        "files": {"static": STATIC_PLY, "sky": SKY_PLY, "state": STATE_FILE},
        "metrics": _jsonable(metrics or {}),
        "method": method,
        "recon_s": None if recon_s is None else float(recon_s),
        "checkpoint_hash": checkpoint_hash or state_sha256,
        "state_sha256": state_sha256,
        "extra": _jsonable(extra or {}),
    }


# --------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_tensors(scene: NeuralScene) -> dict[str, Tensor]:
    """state_dict on the CPU: floating tensors as float32, integer ones (indices) kept."""
    out = {}
    for k, v in scene.state_dict().items():
        v = v.detach().cpu()
        if v.layout != torch.strided:
            raise ValueError(f"state tensor {k!r} is {v.layout} (sparse); safetensors stores "
                             "dense tensors only")
        if v.is_floating_point():
            v = v.float()
        out[k] = v.contiguous()
    return out


def save_scene(scene: NeuralScene, out_dir: str | Path, *, log: LogSegment,
               metrics: dict | None = None, method: str = "adam",
               checkpoint_hash: str | None = None, recon_s: float | None = None,
               extra: dict | None = None, overwrite: bool = True) -> Path:
    """Write a scene directory atomically (see module docstring).

    Args:
        scene: the reconstruction; its tracks are the actors' tracks.
        out_dir: the scene directory to create (or replace when ``overwrite``).
        log: the source log (cameras, frames, offsets; no pixels are read).
        metrics: JSON-able quality numbers (non-finite values are stored as null).
        method: optimiser / pipeline name.
        checkpoint_hash: model checkpoint identifier; default the SHA-256 of
            state.safetensors.
        recon_s: reconstruction wall time (s).
        extra: more JSON-able details for the manifest.
        overwrite: replace an existing directory; else FileExistsError.

    Returns:
        The scene directory path.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: scene directory exists and overwrite=False")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    old: Path | None = None
    try:
        tmp.mkdir()
        (tmp / ACTORS_DIR).mkdir()
        with torch.no_grad():
            static, actors, sky = scene.decode_parts()
        write_ply(tmp / STATIC_PLY, static)
        write_ply(tmp / SKY_PLY, sky)
        files = actor_file_names(list(scene.actor_ids))
        index = scene.actor_index.detach().cpu()
        actors_cpu = Splats(*(getattr(actors, n).detach().cpu() for n in
                              ("means", "quats", "scales", "opacities", "colors")))
        for i, tid in enumerate(scene.actor_ids):
            write_ply(tmp / ACTORS_DIR / files[tid], _subset(actors_cpu, index == i))

        tensors = _state_tensors(scene)
        meta = {"schema_version": str(SCHEMA_VERSION),
                "actor_ids": json.dumps(list(scene.actor_ids))}
        save_file(tensors, str(tmp / STATE_FILE), metadata=meta)
        with open(tmp / STATE_FILE, "rb+") as f:
            os.fsync(f.fileno())
        state_sha = _sha256(tmp / STATE_FILE)

        manifest = build_manifest(scene, log, files, metrics=metrics, method=method,
                                  checkpoint_hash=checkpoint_hash, state_sha256=state_sha,
                                  recon_s=recon_s, extra=extra)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / ACTORS_DIR)
        _fsync_dir(tmp)

        if out_dir.exists():
            if not overwrite:  # appeared while we were writing
                raise FileExistsError(f"{out_dir}: scene directory exists and overwrite=False")
            # Two renames: the old scene survives under `old` until the new one is in place.
            old = parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                old = None
                raise
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- load


@dataclass
class LoadedScene:
    """A scene read back from disk.

    Attributes:
        path: the scene directory.
        scene: the rebuilt NeuralScene (CPU, float32); ``splats(t)`` is bit-identical to
            the saved scene's.
        manifest: the parsed manifest.json.
        cameras: name -> CameraModel.
        world_offset: [3] float64 translation removed from the source world frame.
    """

    path: Path
    scene: NeuralScene
    manifest: dict
    cameras: dict[str, CameraModel] = field(default_factory=dict)
    world_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def frame_indices(self) -> list[int]:
        """Source frame indices of the recorded frames, in time order."""
        return [int(f["index"]) for f in self.manifest["frames"]]

    def _frame(self, frame_index: int) -> dict:
        for f in self.manifest["frames"]:
            if int(f["index"]) == int(frame_index):
                return f
        raise ValueError(f"no frame {frame_index} in scene {self.path}; frames: "
                         f"{self.frame_indices}")

    def cam_to_world(self, frame_index: int, camera: str, shift_m: float = 0.0) -> np.ndarray:
        """[4, 4] float64 camera pose of a recorded view, shifted ``shift_m`` along ego +y."""
        f = self._frame(frame_index)
        if camera not in f["cameras"]:
            raise ValueError(f"no camera {camera!r} at frame {frame_index} in scene "
                             f"{self.path}; cameras there: {sorted(f['cameras'])}")
        T = np.array(f["cameras"][camera]["cam_to_world"], dtype=np.float64)
        if shift_m:
            ego_y = np.asarray(f["ego_to_world"], dtype=np.float64)[:3, 1]
            T[:3, 3] += float(shift_m) * ego_y
        return T

    def view(self, frame_index: int, camera: str, shift_m: float = 0.0
             ) -> tuple[Tensor, Tensor, int, int, float]:
        """A recorded view, optionally lane-shifted (> 0 moves left along ego +y).

        Args:
            frame_index: source frame index (``manifest["frames"][i]["index"]``).
            camera: camera name.
            shift_m: lateral shift in metres.

        Returns:
            viewmat [4, 4] float32 world -> camera (OpenCV axes), K [3, 3] float32,
            width, height, and the image timestamp (s since segment start).

        Raises:
            ValueError: unknown frame or camera (the message lists those that exist).
        """
        T = self.cam_to_world(frame_index, camera, shift_m)
        cam = self.cameras[camera]
        ts = float(self._frame(frame_index)["cameras"][camera]["timestamp"])
        viewmat = torch.from_numpy(invert_pose(T)).float()
        K = torch.from_numpy(np.asarray(cam.K, dtype=np.float64)).float()
        return viewmat, K, int(cam.width), int(cam.height), ts


def _require(manifest: dict, path: Path, *keys: str) -> None:
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise SceneFormatError(path, f"manifest lacks key(s) {missing}.")


def read_manifest(scene_dir: str | Path) -> dict:
    """Parse and check a scene's manifest.json (SceneFormatError on any problem)."""
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise SceneFormatError(scene_dir, "scene directory does not exist.")
    path = scene_dir / MANIFEST
    if not path.is_file():
        raise SceneFormatError(path, "manifest is missing.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SceneFormatError(path, f"manifest is not valid JSON ({e}).") from e
    if not isinstance(manifest, dict):
        raise SceneFormatError(path, "manifest is not a JSON object.")
    _require(manifest, path, "schema_version")
    v = manifest["schema_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v not in SUPPORTED_SCHEMA_VERSIONS:
        raise SceneFormatError(path, f"schema_version {v!r} is not supported (this version "
                                     f"reads {list(SUPPORTED_SCHEMA_VERSIONS)}).")
    _require(manifest, path, "world_offset", "cameras", "frames", "tracks", "actors", "sky",
             "files")
    mode = manifest.get("rasterize_mode", "classic")
    if mode not in RASTERIZE_MODES:
        raise SceneFormatError(path, f"rasterize_mode {mode!r} is not one of "
                                     f"{list(RASTERIZE_MODES)}.")
    return manifest


def load_scene(scene_dir: str | Path, *, verify: bool = True) -> LoadedScene:
    """Load a scene directory written by :func:`save_scene`.

    Args:
        scene_dir: the directory.
        verify: check state.safetensors against the SHA-256 in the manifest.

    Raises:
        SceneFormatError: missing directory, missing / corrupt / unsupported manifest,
            missing / corrupt state, or state that does not match the manifest.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    scene_dir = Path(scene_dir)
    manifest = read_manifest(scene_dir)
    mpath = scene_dir / MANIFEST
    files = manifest["files"]
    if not isinstance(files, dict) or not isinstance(files.get("state", STATE_FILE), str):
        raise SceneFormatError(mpath, "'files' must map part names to file names.")
    spath = scene_dir / files.get("state", STATE_FILE)
    if not spath.is_file():
        raise SceneFormatError(spath, "neural state file is missing.")
    if verify and manifest.get("state_sha256") and _sha256(spath) != manifest["state_sha256"]:
        raise SceneFormatError(spath, "content does not match the SHA-256 recorded in the "
                                      "manifest (corrupt or replaced).")
    try:
        state = load_file(str(spath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SceneFormatError(spath, f"is not a readable safetensors file ({e}).") from e

    try:
        tracks = {str(d["id"]): _track_from_json(d) for d in manifest["tracks"]}
        actor_ids = [str(a["id"]) for a in manifest["actors"]]
        sky = SkyGrid.from_json(manifest["sky"])
        cameras = {name: CameraModel(name, int(c["width"]), int(c["height"]),
                                     np.asarray(c["K"], dtype=np.float64).reshape(3, 3),
                                     None if c.get("distortion") is None else
                                     np.asarray(c["distortion"], dtype=np.float64))
                   for name, c in manifest["cameras"].items()}
        world_offset = np.asarray(manifest["world_offset"], dtype=np.float64).reshape(3)
    except (KeyError, TypeError, ValueError) as e:
        raise SceneFormatError(mpath, f"malformed manifest entry ({type(e).__name__}: {e}).") \
            from e
    missing = [a for a in actor_ids if a not in tracks]
    if missing:
        raise SceneFormatError(mpath, f"actors {missing} have no entry in 'tracks'.")

    need = ("static_anchors", "static_state", "actor_anchors", "actor_state", "actor_index",
            "sky_state")
    absent = [k for k in need if k not in state]
    if absent:
        raise SceneFormatError(spath, f"state lacks tensors {absent}.")
    index = state["actor_index"]
    if index.dtype != torch.int64 or index.dim() != 1:
        raise SceneFormatError(spath, f"actor_index must be a 1-D int64 tensor, got "
                                      f"{tuple(index.shape)} {index.dtype}.")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(actor_ids)):
        raise SceneFormatError(spath, f"actor_index values lie outside the manifest's "
                                      f"{len(actor_ids)} actors.")
    counts = torch.bincount(index, minlength=len(actor_ids)).tolist()
    expected = [int(a.get("gaussians", c)) for a, c in zip(manifest["actors"], counts, strict=True)]
    if counts != expected:
        raise SceneFormatError(spath, f"Gaussians per actor {counts} differ from the "
                                      f"manifest's {expected}.")
    try:
        # Tracks in actor order: the constructor takes actor_ids from the dict order.
        scene = NeuralScene(state["static_anchors"], state["static_state"],
                            state["actor_anchors"], state["actor_state"],
                            state["actor_index"], {a: tracks[a] for a in actor_ids}, sky,
                            state["sky_state"],
                            # Scenes written before the field existed were classic.
                            rasterize_mode=manifest.get("rasterize_mode", "classic"))
        # Overwrites everything the constructor derived (sky anchors, decoders) with the
        # saved values, so decoding is bit-identical.
        scene.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, IndexError) as e:
        raise SceneFormatError(spath, f"state does not match the manifest / this NeuralScene "
                                      f"({e}).") from e
    return LoadedScene(scene_dir, scene, manifest, cameras, world_offset)
