"""The fuzzing harness shared by the loader fuzz tests: byte mutations, a hang watchdog and the outcome rules.

A loader passes a fuzz case when it either

- returns a result that ``validate`` accepts (a mutation can leave a file valid, e.g. a flipped pixel bit), or
- raises torchdrr's :class:`~torchdrr.errors.FileFormatError` (a ``ValueError``) whose message names the file,

within ``HANG_SECONDS``. Anything else (another exception type, a message without the file name, a hang, a result
that ``validate`` rejects: silent garbage) fails the test. The failing input is written to ``corpus/<kind>/`` first
when ``TORCHDRR_FUZZ_SAVE=1``, so that it can be committed as a regression case (see ``corpus_cases``).

Environment:
    TORCHDRR_FUZZ_EXAMPLES: hypothesis examples per fuzz test (default 100; CI uses the default).
    TORCHDRR_FUZZ_RANDOM=1: draw new random cases (default: derandomized, the same cases every run).
    TORCHDRR_FUZZ_SAVE=1: save failing inputs into the corpus folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from torchdrr.errors import FileFormatError

CORPUS = Path(__file__).parent / "corpus"
HANG_SECONDS = 10.0

#: the loader kinds of the coverage-guided fuzzer (atheris_loaders.py), named like the hypothesis tests' kinds
ATHERIS_LOADERS = (
    "nifti",
    "nifti_gz",
    "nrrd",
    "nrrd_gzip",
    "nhdr_header",
    "dicom_file",
    "dicom_series",
    "xray_png",
    "xray_tiff",
    "xray_dicom",
    "xray_npy",
)

#: outcome counts per loader kind, reported at the end of the session (conftest.py)
OUTCOMES: dict[str, Counter] = {}

FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("TORCHDRR_FUZZ_EXAMPLES", "100")),
    derandomize=os.environ.get("TORCHDRR_FUZZ_RANDOM", "0") != "1",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class LoaderHang(Exception):
    """A loader ran past ``HANG_SECONDS``."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raises ``LoaderHang`` in the main thread if the body runs longer than ``seconds`` (SIGALRM; POSIX only)."""

    def expire(signum, frame):
        raise LoaderHang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------------
# Mutations of a valid file
# ----------------------------------------------------------------------------------------------------------------
def truncations(seed: bytes) -> st.SearchStrategy[bytes]:
    """The file cut at a random length (0 .. len - 1), biased towards the header."""
    header_cut = st.integers(0, min(len(seed) - 1, 1024))
    any_cut = st.integers(0, len(seed) - 1)
    return st.one_of(header_cut, any_cut).map(lambda n: seed[:n])


def bit_flips(seed: bytes, region: int | None = None) -> st.SearchStrategy[bytes]:
    """1-8 random bits flipped, within the first ``region`` bytes (default: anywhere)."""
    limit = len(seed) if region is None else min(region, len(seed))

    def flip(positions: list[tuple[int, int]]) -> bytes:
        data = bytearray(seed)
        for index, bit in positions:
            data[index] ^= 1 << bit
        return bytes(data)

    return st.lists(st.tuples(st.integers(0, limit - 1), st.integers(0, 7)), min_size=1, max_size=8).map(flip)


def byte_overwrites(seed: bytes, region: int | None = None) -> st.SearchStrategy[bytes]:
    """1-4 runs of 1-8 bytes overwritten with extreme values (0x00, 0xFF, 0x7F, 0x80) or random bytes."""
    limit = len(seed) if region is None else min(region, len(seed))
    fill = st.one_of(
        st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80"]).flatmap(lambda b: st.integers(1, 8).map(lambda n: b * n)),
        st.binary(min_size=1, max_size=8),
    )

    def overwrite(runs: list[tuple[int, bytes]]) -> bytes:
        data = bytearray(seed)
        for index, value in runs:
            data[index : index + len(value)] = value[: max(0, len(data) - index)]
        return bytes(data)

    return st.lists(st.tuples(st.integers(0, limit - 1), fill), min_size=1, max_size=4).map(overwrite)


def splices(seed: bytes) -> st.SearchStrategy[bytes]:
    """A random slice deleted or duplicated in place."""

    def splice(args: tuple[int, int, bool]) -> bytes:
        start, length, duplicate = args
        end = start + length
        return seed[:end] + seed[start:end] + seed[end:] if duplicate else seed[:start] + seed[end:]

    return st.tuples(st.integers(0, len(seed) - 1), st.integers(1, 64), st.booleans()).map(splice)


def mutations(seed: bytes, header: int = 512) -> st.SearchStrategy[bytes]:
    """Every kind of damage to ``seed``: truncation, bit flips and overwrites (in the first ``header`` bytes or
    anywhere) and splices."""
    return st.one_of(
        truncations(seed),
        bit_flips(seed, header),
        bit_flips(seed),
        byte_overwrites(seed, header),
        byte_overwrites(seed),
        splices(seed),
    )


# ----------------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------------
def save_crasher(kind: str, data: bytes, suffix: str) -> Path | None:
    """Writes a failing input into ``corpus/<kind>/`` (only with ``TORCHDRR_FUZZ_SAVE=1``); returns its path."""
    if os.environ.get("TORCHDRR_FUZZ_SAVE", "0") != "1":
        return None
    folder = CORPUS / kind
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    target.write_bytes(data)
    return target


def check_loader(
    kind: str,
    load: Callable[[Path], Any],
    path: Path,
    validate: Callable[[Any], None] | None = None,
    crasher: tuple[bytes, str] | None = None,
) -> str:
    """Runs ``load(path)`` under the outcome rules (module docstring); returns "ok" or "rejected".

    Args:
        kind: the loader's name, for the counts and the corpus folder.
        load: the loader.
        path: the (damaged) file or folder.
        validate: called on a successful result; raises ``AssertionError`` for garbage.
        crasher: ``(bytes, suffix)`` to save into the corpus when the case fails.

    Raises:
        AssertionError: the case broke a rule (the message says which, with the original traceback).
    """
    counts = OUTCOMES.setdefault(kind, Counter())
    try:
        with watchdog():
            result = load(path)
        if validate is not None:
            validate(result)
    except FileFormatError as error:
        named = error.path is not None and Path(error.path) == Path(path) or str(path) in str(error)
        if not named:
            counts["unnamed"] += 1
            _fail(kind, crasher, f"{type(error).__name__} does not name {path}: {error}")
        counts["rejected"] += 1
        return "rejected"
    except AssertionError as error:
        counts["garbage"] += 1
        _fail(kind, crasher, f"silent garbage: {error}")
    except LoaderHang as error:
        counts["hang"] += 1
        _fail(kind, crasher, f"hang: {error}")
    except Exception as error:  # noqa: BLE001 - any other exception is what fuzzing looks for
        counts["crash"] += 1
        trace = "".join(traceback.format_exception(error))
        _fail(kind, crasher, f"raised {type(error).__name__} instead of FileFormatError:\n{trace}")
    counts["ok"] += 1
    return "ok"


def _fail(kind: str, crasher: tuple[bytes, str] | None, why: str) -> None:
    saved = save_crasher(kind, *crasher) if crasher is not None else None
    where = f" (saved as {saved})" if saved is not None else ""
    raise AssertionError(f"{kind}: {why}{where}")


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh temporary folder per hypothesis example (pytest's tmp_path is one per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="torchdrr-fuzz-") as folder:
        yield Path(folder)


def corpus_cases(kind: str) -> list[Path]:
    """The committed regression inputs of one loader kind, sorted (empty if none)."""
    folder = CORPUS / kind
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md") if folder.is_dir() else []
