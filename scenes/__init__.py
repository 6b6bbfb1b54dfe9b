"""Reading driving logs: the data model, readers/writers and the synthetic generator.

``scenes`` imports neither ``recon`` nor ``service``.
"""

from scenes.errors import LogFormatError
from scenes.log import (
    CameraImage,
    CameraModel,
    Frame,
    GroundTruth,
    ImageSource,
    LidarSweep,
    LogSegment,
    ShiftedView,
    Track,
)

__all__ = [
    "CameraImage",
    "CameraModel",
    "Frame",
    "GroundTruth",
    "ImageSource",
    "LidarSweep",
    "LogFormatError",
    "LogSegment",
    "ShiftedView",
    "Track",
]
