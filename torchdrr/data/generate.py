"""Write a ``DRRDataset`` to disk: images, per-sample metadata and a manifest, resumable and shareable across ranks.

Layout of ``OUT_DIR``:

* ``config.json``: everything that defines the dataset (CTs with the sha256 of their files, seed, count, pose and
  physics ranges, detector, output, image format and its value mapping, torchdrr version). No timestamps.
* ``images/``: ``000000.png`` ... (``png16``), ``000000.tiff`` ... (``tiff``: float32, one page per channel) or
  ``shard_000.h5`` ... (``hdf5``: float32 ``images`` ``[n, K, H, W]`` and int64 ``index`` ``[n]``; shard ``s`` holds the
  samples ``[s * shard_size, (s + 1) * shard_size)``).
* ``metadata.jsonl``: one JSON object per line, sorted by index: the sample's parameters, ``K``, ``R``, ``t``, ``P`` as
  nested lists, the landmark projections and visibility, and its image ``file`` (and ``shard_row`` for hdf5). Floats
  are written with ``repr`` so that they read back exactly.
* ``manifest.json``: sha256 and size of every image file or shard and of ``metadata.jsonl``. It is written last: its
  presence means the dataset is complete.

png16 mapping (the same for every image, recorded in ``config.json``): ``level = round(clip(value * scale, 0, 65535))``
and back ``value = level / scale``, with ``scale`` 4096 for line integrals (0-16 in steps of 1/4096) and 32768 for
flat fields (I/I0 in 0-2). Intensities (keV per pixel) have no fixed range: write them as ``tiff`` or ``hdf5``.

Every file is written under a temporary name in its folder and renamed into place. While rendering, each written
batch leaves a small JSON part in ``OUT_DIR/.parts/`` listing its samples' metadata and the checksums of their image
files (for hdf5, of the batch's ``.npy`` chunk). A rerun with the same config first deletes the parts whose files no
longer verify, then skips the samples the remaining parts list, so a killed run loses at most its batches in flight.
Under ``torch.distributed`` (initialised here from torchrun's environment variables when needed) rank ``r`` of ``W``
renders the samples ``r, r + W, ...``; rank 0 then merges the parts and writes the manifest. The files do not depend
on the number of ranks or the batch size.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchdrr.io import Volume
from torchdrr.io.writers import atomic_write, encode_png, encode_tiff

from .dataset import DRRDataset

__all__ = ["FORMATS", "PNG16_SCALES", "DatasetError", "dataset_config", "generate_dataset"]

FORMATS = ("png16", "tiff", "hdf5")
#: png16 levels per unit of the output: level = round(clip(value * scale, 0, 65535)).
PNG16_SCALES = {"line_integral": 4096.0, "flat_field": 32768.0}
LAYOUT_VERSION = 1
_PNG16_MAX = 65535
_SUFFIX = {"png16": ".png", "tiff": ".tiff"}


class DatasetError(ValueError):
    """The output folder or the request cannot make the dataset (a clear, one-line reason)."""


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------
#: Threads that encode and write images while the next batches render. Most of the work releases the interpreter lock
#: (zlib, hashing, numpy, file writes); a 256 x 256 16-bit PNG costs about 2 ms of one core. Measured on the 16-core
#: H100 machine: 6 threads wrote 1,100 PNGs/s, 12 threads 970/s (more threads contend with the thread that queues the
#: GPU work); writer processes were slower still (handing them the images through pipes capped them at ~430/s).
_WRITE_THREADS = max(1, min(6, (os.cpu_count() or 2) - 2))
#: Batches handed to the writers and not yet written (bounds the memory of images waiting to be written).
_BATCHES_IN_FLIGHT = 8
#: Worker processes that prepare batches (parameters, geometry, spectra) while the GPU renders.
_PREPARE_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_ct(path: Path) -> str:
    """sha256 of a CT file, or of a DICOM folder (every file's relative path and contents, in sorted order)."""
    if path.is_file():
        return _sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + _sha256_file(file).encode())
    return digest.hexdigest()


def _ct_entry(ct: str | Path | Volume) -> dict:
    if isinstance(ct, Volume):
        digest = hashlib.sha256(ct.data.detach().cpu().contiguous().numpy().tobytes())
        digest.update(ct.affine.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
        return {"path": None, "volume_sha256": digest.hexdigest(), "shape": list(ct.shape)}
    path = Path(ct)
    if not path.exists():
        raise FileNotFoundError(f"CT not found: {ct}")
    return {"path": str(path.resolve()), "sha256": _sha256_ct(path)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def dataset_config(dataset: DRRDataset, image_format: str = "png16", shard_size: int = 1000) -> dict:
    """Everything that defines the dataset written by ``generate_dataset`` (JSON-ready, no timestamps)."""
    import torchdrr

    png16 = None
    if image_format == "png16":
        scale = PNG16_SCALES.get(dataset.output)
        png16 = {
            "scale": scale,
            "encode": "level = round(clip(value * scale, 0, 65535)) as uint16",
            "decode": "value = level / scale",
            "step": None if scale is None else 1.0 / scale,
            "max_value": None if scale is None else _PNG16_MAX / scale,
        }
    config = {
        "layout": "torchdrr-generate",
        "layout_version": LAYOUT_VERSION,
        "torchdrr_version": torchdrr.__version__,
        "count": dataset.length,
        "seed": dataset.seed,
        "cts": [_ct_entry(ct) for ct in dataset.cts],
        "ct_weights": list(dataset.ct_weights),
        "poses": _plain(dataset.poses),
        "physics": _plain(dataset.physics),
        "detector": {
            "rows": dataset.height,
            "cols": dataset.width,
            "pixel_spacing_mm": list(dataset.pixel_spacing_mm),
        },
        "landmarks_mm": None if dataset.landmarks is None else [p.tolist() for p in dataset.landmarks],
        "output": dataset.output,
        "dtype": str(dataset.dtype),
        "noise": repr(dataset.noise),
        "drr_options": _plain(dataset.drr_options),
        "device_type": dataset.device.type,  # the noise streams of CPU and CUDA generators differ
        "image_format": image_format,
        "png16": png16,
        "shard_size": shard_size if image_format == "hdf5" else None,
    }
    return json.loads(json.dumps(config))  # tuples -> lists, exactly as read back from disk


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def _differing_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------------
def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) or int(env["WORLD_SIZE"]) <= 1:
        return 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size(), True


def _collective(world: int, rank: int, step: Callable[[], Any]) -> list[Any]:
    """Runs ``step`` on every rank and gathers the results; if any rank failed, every rank raises its message."""
    if world == 1:
        return [step()]
    import torch.distributed as dist

    try:
        result, error = step(), None
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        result, error = None, f"{exc}" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (error, result))
    for other, (message, _) in enumerate(gathered):
        if message is not None:
            raise DatasetError(message if other == rank or world == 1 else f"rank {other}: {message}")
    return [r for _, r in gathered]


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def _write_json(path: Path, value: Any, **options: Any) -> None:
    _write_bytes(path, (json.dumps(value, **options) + "\n").encode())


def _clean_temporaries(*folders: Path) -> None:
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)


def _name_width(count: int) -> int:
    return max(6, len(str(max(count - 1, 0))))


def _png16_levels(image: np.ndarray, scale: float) -> np.ndarray:
    values = image.astype(np.float64) * scale
    return np.round(np.clip(np.nan_to_num(values, nan=0.0), 0, _PNG16_MAX)).astype(np.uint16)


class _Writer:
    """Writes batches of samples and reads back what earlier runs wrote.

    A part file ``.parts/batch-<first index>-<unique>.json`` lists the samples of one written batch: each sample's
    metadata record, its image file (png16/tiff: ``images/<index>.<suffix>``; hdf5: a chunk
    ``.parts/chunk-<first index>-<unique>.npy`` holding the batch's float32 images, one row per sample) and the
    sha256 and size of that file. A part is written after the files it lists, so a part on disk lists whole files;
    ``_setup`` deletes the parts whose files no longer verify (``verify_parts``).
    """

    def __init__(self, out: Path, config: dict, count: int) -> None:
        self.out = out
        self.images = out / "images"
        self.parts = out / ".parts"
        self.format = config["image_format"]
        self.scale = (config["png16"] or {}).get("scale")
        self.shard_size = config["shard_size"]
        self.width = _name_width(count)

    def name(self, index: int) -> str:
        return f"{index:0{self.width}d}"

    def shard_name(self, shard: int) -> str:
        return f"shard_{shard:03d}.h5"

    def record(self, params: dict, geometry: dict) -> dict:
        """A sample's metadata line: its parameters, geometry, landmarks and image file."""
        record: dict[str, Any] = {"index": int(params["index"])}
        record.update({key: _plain(value) for key, value in params.items() if key != "index"})
        record.update(geometry)
        index = record["index"]
        if self.format == "hdf5":
            shard = index // self.shard_size
            record["file"] = f"images/{self.shard_name(shard)}"
            record["shard_row"] = index - shard * self.shard_size
        else:
            record["file"] = f"images/{self.name(index)}{_SUFFIX[self.format]}"
        return record

    def write_images(self, records: list[dict], images: np.ndarray) -> list[dict]:
        """png16/tiff: one file per sample (``images`` ``[n, K, H, W]`` float32); returns the part entries."""
        if self.format == "png16" and images.shape[1] != 1:
            raise DatasetError(f"png16 holds one channel; these images have {images.shape[1]}: use tiff or hdf5")
        levels = _png16_levels(images[:, 0], self.scale) if self.format == "png16" else None
        entries = []
        for j, record in enumerate(records):
            data = encode_png(levels[j], bit_depth=16, fast=True) if levels is not None else encode_tiff(images[j])
            _write_bytes(self.out / record["file"], data)
            entries.append({"record": record, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        return entries

    def write_chunk(self, records: list[dict], images: np.ndarray) -> list[dict]:
        """hdf5: the batch's images in one ``.npy`` chunk (merged into shards at the end); returns the part entries."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(images, dtype=np.float32), allow_pickle=False)
        data = buffer.getvalue()
        chunk = f"chunk-{self.name(records[0]['index'])}-{uuid.uuid4().hex[:12]}.npy"
        _write_bytes(self.parts / chunk, data)
        digest = hashlib.sha256(data).hexdigest()
        return [
            {"record": record, "sha256": digest, "bytes": len(data), "chunk": chunk, "row": row}
            for row, record in enumerate(records)
        ]

    def write_part(self, entries: list[dict]) -> None:
        first = self.name(entries[0]["record"]["index"])
        _write_json(self.parts / f"batch-{first}-{uuid.uuid4().hex[:12]}.json", {"entries": entries})

    def read_parts(self) -> dict[int, dict]:
        """Every sample listed by a part: index -> entry."""
        done = {}
        for path in sorted(self.parts.glob("batch-*.json")):
            for entry in json.loads(path.read_text())["entries"]:
                done[int(entry["record"]["index"])] = entry
        return done

    def verify_parts(self) -> int:
        """Deletes the parts that cannot be read or whose files are missing or changed (their samples are rendered
        again); returns the number of samples the remaining parts list."""
        if not self.parts.is_dir():
            return 0
        paths = sorted(self.parts.glob("batch-*.json"))

        def check(path: Path) -> int:
            try:
                entries = json.loads(path.read_text())["entries"]
                files = {}
                for entry in entries:
                    name = self.parts / entry["chunk"] if "chunk" in entry else self.out / entry["record"]["file"]
                    files[name] = (entry["sha256"], entry["bytes"])
                ok = all(
                    name.is_file() and name.stat().st_size == size and _sha256_file(name) == digest
                    for name, (digest, size) in files.items()
                )
            except (OSError, ValueError, KeyError, TypeError):
                ok, entries = False, []
            if not ok:
                path.unlink(missing_ok=True)
                return 0
            return len(entries)

        with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:  # hashing releases the GIL
            return sum(pool.map(check, paths))


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------
def _prepare_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create output folder {out}: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DatasetError(f"output folder {out} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".probe", dir=out)  # not a .tmp: no rank cleans it
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise DatasetError(f"output folder {out} is not writable: {error.strerror or error}") from None


def _bytes_per_sample(config: dict) -> int:
    pixels = config["detector"]["rows"] * config["detector"]["cols"]
    landmarks = 0 if config["landmarks_mm"] is None else 80 * len(config["landmarks_mm"][0])
    metadata = 2 * (2048 + landmarks)  # the part file and the metadata line
    # hdf5: the .npy part and the shard both exist until the end
    image = {"png16": 2 * pixels, "tiff": 4 * pixels, "hdf5": 2 * 4 * pixels}[config["image_format"]]
    return image + 1024 + metadata


def _check_disk(out: Path, config: dict, missing: int) -> None:
    need = missing * _bytes_per_sample(config)
    free = shutil.disk_usage(out).free
    if need > free:
        raise DatasetError(
            f"not enough free disk space in {out}: {missing} samples need about {need / 1e9:.3g} GB, "
            f"{free / 1e9:.3g} GB free"
        )


def _verify_manifest(out: Path, manifest: dict, config_bytes: bytes) -> list[str]:
    """The files of a finished dataset that no longer match its manifest (empty: complete and intact)."""
    bad = []
    if manifest.get("config_sha256") != hashlib.sha256(config_bytes).hexdigest():
        bad.append("config.json")
    for name, entry in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
            bad.append(name)
    return bad


def _setup(out: Path, config: dict) -> str:
    """Rank 0: checks OUT_DIR against the config, writes the config; returns "complete" or "render"."""
    config_path, manifest_path = out / "config.json", out / "manifest.json"
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise DatasetError(f"{config_path} is not a torchdrr dataset config ({error}); nothing written") from None
        if not isinstance(old, dict) or old.get("layout") != "torchdrr-generate":
            raise DatasetError(f"{config_path} is not a torchdrr dataset config; nothing written")
        keys = _differing_keys(old, config)
        if keys:
            raise DatasetError(
                f"{out} holds a different dataset (differing config keys: {', '.join(keys)}); choose another "
                "OUT_DIR or delete it; nothing written"
            )
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                manifest = {}
            bad = _verify_manifest(out, manifest, config_path.read_bytes())
            if not bad:
                return "complete"
            raise DatasetError(
                f"{out} is a finished dataset whose files no longer match manifest.json ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}); delete manifest.json to re-render what is missing"
            )
    else:
        clash = [n for n in ("images", "metadata.jsonl", "manifest.json", ".parts") if (out / n).exists()]
        if clash:
            raise DatasetError(
                f"{out} has no config.json but holds {', '.join(clash)}: not a dataset made by torchdrr generate; "
                "nothing written"
            )
    parts = out / ".parts"
    done = _Writer(out, config, config["count"]).verify_parts()
    _check_disk(out, config, max(config["count"] - done, 0))
    if not config_path.exists():
        _write_bytes(config_path, config_bytes)
    (out / "images").mkdir(exist_ok=True)
    parts.mkdir(exist_ok=True)
    _clean_temporaries(out, out / "images", parts)
    return "render"


# ----------------------------------------------------------------------------------------------------------------------
# Finishing (rank 0)
# ----------------------------------------------------------------------------------------------------------------------
def _finish(out: Path, writer: _Writer, config: dict) -> None:
    count = config["count"]
    listed = writer.read_parts()
    missing = [index for index in range(count) if index not in listed]
    if missing:
        raise DatasetError(f"{len(missing)} samples were not written (e.g. {missing[0]}); run again to resume")
    entries = [listed[index] for index in range(count)]
    files: dict[str, dict] = {}
    if writer.format == "hdf5":
        import h5py

        size = writer.shard_size
        chunks: dict[str, np.ndarray] = {}
        for shard in range((count + size - 1) // size):
            indices = range(shard * size, min((shard + 1) * size, count))
            rows = []
            for index in indices:
                entry = entries[index]
                if entry["chunk"] not in chunks:
                    chunks[entry["chunk"]] = np.load(writer.parts / entry["chunk"], mmap_mode="r", allow_pickle=False)
                rows.append(chunks[entry["chunk"]][entry["row"]])
            images = np.stack(rows)
            target = writer.images / writer.shard_name(shard)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=writer.images)
            os.close(fd)
            try:
                with h5py.File(tmp, "w", track_order=False) as handle:
                    handle.create_dataset("images", data=images, track_times=False)
                    handle.create_dataset("index", data=np.asarray(indices, dtype=np.int64), track_times=False)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            files[f"images/{target.name}"] = {"sha256": _sha256_file(target), "bytes": target.stat().st_size}
        chunks.clear()
    else:
        for entry in entries:
            files[entry["record"]["file"]] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    lines = "".join(json.dumps(entry["record"]) + "\n" for entry in entries).encode()
    _write_bytes(out / "metadata.jsonl", lines)
    files["metadata.jsonl"] = {"sha256": hashlib.sha256(lines).hexdigest(), "bytes": len(lines)}
    manifest = {
        "count": count,
        "config_sha256": hashlib.sha256((out / "config.json").read_bytes()).hexdigest(),
        "files": dict(sorted(files.items())),
    }
    _write_json(out / "manifest.json", manifest, indent=1)
    shutil.rmtree(writer.parts, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------
def generate_dataset(
    out_dir: str | Path,
    dataset: DRRDataset,
    *,
    image_format: str = "png16",
    batch_size: int = 16,
    progress: bool = True,
    shard_size: int = 1000,
) -> dict:
    """Renders every sample of ``dataset`` into ``out_dir`` (see the module docstring for the layout).

    Resumes an interrupted run with the same config, refuses a folder that holds a different dataset, and does
    nothing for a dataset that is already complete. Under ``torch.distributed`` every rank must call it with the same
    arguments; each renders its share and rank 0 writes the metadata and the manifest.

    Args:
        out_dir: the dataset folder (created if needed).
        dataset: the samples to write (its ``length`` is the count).
        image_format: "png16" (16-bit PNG with the fixed mapping of ``PNG16_SCALES``), "tiff" (float32) or "hdf5"
            (float32 shards; needs h5py).
        batch_size: samples rendered per ``render_batch`` call (does not change the files).
        progress: show a tqdm bar (samples/s, ETA) on rank 0 when stderr is a terminal.
        shard_size: samples per hdf5 shard.

    Returns:
        A summary: ``out_dir``, ``count``, ``rendered`` (samples rendered now, all ranks), ``skipped`` (already
        there), ``already_complete``, ``seconds``, ``samples_per_second``, ``image_format``, ``world_size``, and on
        a run that rendered: ``phase_seconds`` (this rank's ``setup``, ``first_batch`` (start-up of the workers up to
        the first batch), ``rendering`` (rendering and writing after the first batch arrived) and ``finishing``
        (metadata table, shards, manifest)) and ``rendering_samples_per_second`` (this rank's steady rate: what it
        rendered over ``rendering`` seconds).

    Raises:
        DatasetError (a ValueError): bad arguments, unwritable folder, not enough disk, a different dataset there.
    """
    if image_format not in FORMATS:
        raise DatasetError(f"image_format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise DatasetError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        raise DatasetError(f"shard_size must be a whole number >= 1, got {shard_size!r}")
    if image_format == "png16" and dataset.output not in PNG16_SCALES:
        raise DatasetError(
            f"png16 has a fixed mapping for {' and '.join(PNG16_SCALES)} only, not {dataset.output!r} (no fixed "
            "range): use tiff or hdf5"
        )
    if image_format == "hdf5":
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise DatasetError("the hdf5 format needs h5py: pip install 'torchdrr[hdf5]'") from None
    out = Path(out_dir)
    config = dataset_config(dataset, image_format, int(shard_size))
    rank, world, created = _init_distributed(dataset.device)
    try:
        return _generate(out, dataset, config, rank, world, int(batch_size), progress)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _generate(
    out: Path, dataset: DRRDataset, config: dict, rank: int, world: int, batch_size: int, progress: bool
) -> dict:
    start = time.perf_counter()
    count = config["count"]

    def setup() -> str:
        _prepare_folder(out)
        return _setup(out, config) if rank == 0 else "?"

    state = _collective(world, rank, setup)[0]
    phases = {"setup": time.perf_counter() - start, "first_batch": 0.0, "rendering": 0.0, "finishing": 0.0}
    summary = {
        "out_dir": str(out),
        "count": count,
        "rendered": 0,
        "skipped": count,
        "already_complete": state == "complete",
        "seconds": 0.0,
        "samples_per_second": 0.0,
        "image_format": config["image_format"],
        "world_size": world,
    }
    if state == "complete":
        summary["seconds"] = time.perf_counter() - start
        return summary

    writer = _Writer(out, config, count)

    def render() -> int:
        done = writer.read_parts()  # verified by rank 0 in setup
        todo = [i for i in range(rank, count, world) if i not in done]
        bar = _progress_bar(len(todo), progress and rank == 0, world)
        cuda = dataset.device.type == "cuda"
        # Encoding and writing run in the writers while the next batches render; a batch's part file is written
        # (here) once all its images are, and at most _BATCHES_IN_FLIGHT batches wait, which bounds memory.
        in_flight: collections.deque = collections.deque()

        def finish_oldest() -> None:
            futures, n = in_flight.popleft()
            writer.write_part([entry for future in futures for entry in future.result()])
            bar.update(n)

        def submit(prepared: dict, host_images: torch.Tensor, copied: torch.cuda.Event | None) -> None:
            if copied is not None:
                copied.synchronize()  # this batch's images are on the host; the GPU goes on with the next one
            geometry = {key: value.tolist() for key, value in prepared["geometry"].items()}
            records = [
                writer.record(params, {key: value[j] for key, value in geometry.items()})
                for j, params in enumerate(prepared["params"])
            ]
            images = host_images.numpy()
            if writer.format == "hdf5":
                futures = [pool.submit(writer.write_chunk, records, images)]
            else:
                step = -(-len(records) // _WRITE_THREADS)
                futures = [
                    pool.submit(writer.write_images, records[a : a + step], images[a : a + step])
                    for a in range(0, len(records), step)
                ]
            in_flight.append((futures, len(records)))
            while len(in_flight) > _BATCHES_IN_FLIGHT:
                finish_oldest()

        clock = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
                previous = None
                for prepared in _prepared_batches(dataset, todo, batch_size):
                    if previous is None:  # start-up: worker processes, CT loading, the first batch's host half
                        phases["first_batch"] = time.perf_counter() - clock
                        clock = time.perf_counter()
                    images = dataset.render_images(prepared)
                    # One device-to-host copy per batch, started now and awaited only after the next batch is
                    # queued, so the GPU does not wait for the writers.
                    copied = None
                    if cuda:
                        host_images = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
                        host_images.copy_(images, non_blocking=True)
                        copied = torch.cuda.Event()
                        copied.record()
                    else:
                        host_images = images
                    if previous is not None:
                        submit(*previous)
                    previous = ({"params": prepared["params"], "geometry": prepared["geometry"]}, host_images, copied)
                if previous is not None:
                    submit(*previous)
                while in_flight:
                    finish_oldest()
        finally:
            bar.close()
        phases["rendering"] = time.perf_counter() - clock
        return len(todo)

    rendered = sum(_collective(world, rank, render))
    clock = time.perf_counter()
    _collective(world, rank, lambda: _finish(out, writer, config) if rank == 0 else None)
    phases["finishing"] = time.perf_counter() - clock
    seconds = time.perf_counter() - start
    summary.update(
        rendered=rendered,
        skipped=count - rendered,
        seconds=seconds,
        samples_per_second=rendered / seconds if seconds > 0 else 0.0,
        phase_seconds=phases,
        rendering_samples_per_second=rendered / phases["rendering"] if phases["rendering"] > 0 else 0.0,
    )
    return summary


class _PreparedBatches(torch.utils.data.Dataset):
    """Batch k of ``todo`` prepared by ``DRRDataset.prepare_batch`` (host work only: safe in forked workers)."""

    def __init__(self, dataset: DRRDataset, batches: list[list[int]]) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        return self.dataset.prepare_batch(self.batches[k])


def _prepared_batches(dataset: DRRDataset, todo: list[int], batch_size: int):
    """The host halves of the batches, in order. On a GPU they are prepared by worker processes while the main
    process renders (the host half cost about as much as the GPU render at 256 x 256); on the CPU in line."""
    batches = [todo[first : first + batch_size] for first in range(0, len(todo), batch_size)]
    if dataset.device.type != "cuda" or len(batches) < 2:
        for batch in batches:
            yield dataset.prepare_batch(batch)
        return
    workers = min(_PREPARE_WORKERS, len(batches))
    loader = torch.utils.data.DataLoader(
        _PreparedBatches(dataset, batches), batch_size=None, num_workers=workers, pin_memory=True, prefetch_factor=4
    )
    yield from loader


def _progress_bar(total: int, show: bool, world: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    if tqdm is None or not show:
        return _NoBar()
    desc = "generate" if world == 1 else f"generate (rank 0 of {world})"
    return tqdm(total=total, unit="sample", desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
