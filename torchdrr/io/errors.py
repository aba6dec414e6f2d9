"""The error raised for unreadable or inconsistent CT files."""

from __future__ import annotations

__all__ = ["VolumeFormatError"]


class VolumeFormatError(ValueError):
    """A CT file, folder or array could not be turned into a volume: the message names the source and the problem.

    Subclasses ``ValueError`` so callers that caught ``ValueError`` from the older ``load_nifti`` keep working.
    """
