"""The errors raised for unreadable or inconsistent files (defined in :mod:`torchdrr.errors`, re-exported here)."""

from __future__ import annotations

from ..errors import FileFormatError, VolumeFormatError, XRayFormatError

__all__ = ["FileFormatError", "VolumeFormatError", "XRayFormatError"]
