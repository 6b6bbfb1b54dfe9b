"""G3R checkpoints: one safetensors file holding the weights, the architecture and how it
was trained (JSON in the file's metadata), identified by the SHA-256 of its bytes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from recon.g3r.model import G3RConfig, G3RModel

#: The checkpoint that ships with the package (``drivesplat train`` makes new ones).
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "g3r_default.safetensors"
FORMAT = "drivesplat-g3r/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the G3R model (eval mode); info: training metadata (free-form JSON);
        sha256: hash of the file's bytes (lands in scene manifests); path: where from.
    """

    model: G3RModel
    info: dict
    sha256: str
    path: Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: G3RModel, path: str | Path, info: dict | None = None) -> str:
    """Write the model atomically; returns the file's SHA-256.

    Args:
        info: JSON-serialisable training metadata stored alongside the weights.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in
               model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_json()),
            "info": json.dumps(info or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shipped model is readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file_sha256(path)


def load_checkpoint(path: str | Path | None = None, device: torch.device | str = "cpu"
                    ) -> Checkpoint:
    """Load a checkpoint (default: the shipped one).

    Raises:
        CheckpointError: missing file, not a drivesplat G3R checkpoint, or weights that
            do not fit the architecture it declares.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a {FORMAT} checkpoint "
                                    f"(format {meta.get('format')!r})")
    try:
        config = G3RConfig.from_json(json.loads(meta["config"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"has unreadable metadata ({e})") from e
    model = G3RModel(config)
    weights = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(path, f"weights do not fit its architecture: {e}") from e
    model.to(device).eval()
    return Checkpoint(model, info, file_sha256(path), path)
