"""torchdrr's own exception types, so that callers (and the command line) can tell a user's bad input from a bug.

All of them subclass ``ValueError``: code that caught ``ValueError`` from earlier versions keeps working.

- :class:`FileFormatError`: a file could not be read as what it claims to be; ``path`` names it.
  :class:`VolumeFormatError` (CT files and DICOM folders) and :class:`XRayFormatError` (X-ray images) refine it.
- :class:`MemoryBudgetError`: a render would need more memory than allowed, even split into chunks; the message
  gives the numbers, and nothing was allocated.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FileFormatError", "MemoryBudgetError", "VolumeFormatError", "XRayFormatError"]


class FileFormatError(ValueError):
    """A file (or folder) that cannot be read: truncated, corrupt, inconsistent or of an unsupported kind.

    Args:
        message: what is wrong. When ``path`` is given and the message does not already name it, the message is
            prefixed with ``"<path>: "``, so the file is always named.
        path: the file or folder at fault (None for an in-memory array: the message then names its source).

    Attributes:
        path: the file or folder, as a ``Path`` (or None).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None and str(self.path) not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)


class VolumeFormatError(FileFormatError):
    """A CT file, DICOM folder or array that cannot be turned into a volume."""


class XRayFormatError(FileFormatError):
    """An X-ray image file (PNG, TIFF, DICOM, .npy) that cannot be read as a grayscale X-ray."""


class MemoryBudgetError(ValueError):
    """A render that does not fit the memory budget even in the smallest chunks it can be split into.

    Attributes:
        needed_bytes: the memory the smallest possible split would still need.
        budget_bytes: the budget it was checked against.
    """

    def __init__(self, message: str, needed_bytes: int, budget_bytes: int) -> None:
        self.needed_bytes = int(needed_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(message)
