"""Shard writer: one webdataset tar, its parquet and its stats JSON, committed atomically.

Commit order (docs/design.md): the tar is streamed to a temporary name while the shard runs (samples never
pile up in memory), flushed and renamed; then the parquet; then the stats JSON, which is the
commit marker. A crash at any point leaves only temporary or unmarked files, which a resume
removes and redoes. Tars are reproducible (fixed mtime/owner), so a re-run writes the same bytes.

On an object store (layout.py) the tar streams as a multipart upload straight to its final key:
the object appears only when the upload completes, so no rename (copy + delete) is needed. Each
data object's size is checked on the store before the next step, so the marker never precedes
complete data; a failed attempt aborts its upload rather than completing it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from core.facs import AUS

from .layout import Layout, _fsync

log = logging.getLogger(__name__)

#: Fields of every sample in a tar; KEY.au.npy is float32 (2, 12): [occurrence, intensity].
SAMPLE_FIELDS = ("json", "au.npy")
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("candidate", pa.int32()),
        ("seed", pa.int64()),
        ("emotion", pa.string()),
        ("strength", pa.int8()),
        ("skin_group", pa.int8()),
        ("age_group", pa.string()),
        ("prompt", pa.string()),
        ("expander", pa.string()),
        ("expand_fallback", pa.bool_()),
        ("target_intensity", pa.list_(pa.int8(), len(AUS))),
        ("intensity", pa.list_(pa.float32(), len(AUS))),
        ("occurrence", pa.list_(pa.bool_(), len(AUS))),
        ("prompt_target_jaccard", pa.float32()),
        ("label_prompt_jaccard", pa.float32()),
        ("identity", pa.string()),
        ("generator", pa.string()),
        # detect stage (null when detect.enabled is false)
        ("consensus_occurrence", pa.list_(pa.bool_(), len(AUS))),
        ("consensus_intensity", pa.list_(pa.float32(), len(AUS))),  # null item: no intensity detector
        ("consensus_agree", pa.list_(pa.bool_(), len(AUS))),
        ("realism", pa.float32()),
        ("label_consensus_jaccard", pa.float32()),
        ("detectors", pa.string()),  # JSON {detector: {probability: [12], intensity: [12]}}, raw outputs
        # highest identity similarity to MAUGen's training subjects (factory/leakage.py); null: not measured
        ("training_similarity", pa.float32()),
    ]
)
#: The parquet columns the detect stage fills (null in a row when detect.enabled is false).
DETECT_COLUMNS: tuple[str, ...] = tuple(PARQUET_SCHEMA.names[PARQUET_SCHEMA.get_field_index("consensus_occurrence") :])


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to the real file."""

    def __init__(self, f: Any):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.size += mv.nbytes
        self.f.write(mv)
        return mv.nbytes

    def tell(self) -> int:
        return self.size


def encode_image(image: np.ndarray, fmt: str, jpg_quality: int = 95) -> bytes:
    """PNG (lossless, the default) or JPEG bytes of an RGB uint8 image."""
    buf = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=jpg_quality, subsampling=0)
    else:
        raise ValueError(f"image format {fmt!r} not supported; use png or jpg (build.image_format)")
    return buf.getvalue()


def au_array(occurrence: np.ndarray, intensity: np.ndarray) -> bytes:
    """KEY.au.npy bytes: float32 (2, 12), row 0 occurrence (0/1), row 1 intensity (0-5)."""
    arr = np.stack([np.asarray(occurrence, np.float32), np.asarray(intensity, np.float32)])
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Streams accepted samples of one shard to a temporary tar; commit() publishes all three files."""

    def __init__(self, layout: Layout, name: str, image_format: str = "png", jpg_quality: int = 95):
        self.layout = layout
        self.name = name
        self.image_format = image_format
        self.jpg_quality = jpg_quality
        self.rows: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        # retries of the store's requests before this shard (object stores only; see layout.py)
        self._retries0 = layout.store_retries() if layout.is_object_store else None
        # filesystem: a temporary name, renamed at commit; object store: the final key (see above)
        self._dest_tar = layout.tar(name) if layout.is_object_store else layout.temp_path(layout.tar(name))
        self._file = layout.fs.open(self._dest_tar, "wb")
        self._hash = _HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hash, encoder=False, mtime=0.0, user="mifa", group="mifa", mode=0o444)
        self._keys: set[str] = set()
        self._closed = False

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any], au: bytes, row: dict[str, Any]) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate key {key} in shard {self.name}")
        self._keys.add(key)
        sample = {
            "__key__": key,
            self.image_format: encode_image(image, self.image_format, self.jpg_quality),
            "json": json.dumps(meta, sort_keys=True).encode(),
            "au.npy": au,
        }
        self._tar.write(sample)
        self.rows.append(row)

    def keep_rejected(self, key: str, meta: dict[str, Any], image: np.ndarray | None) -> None:
        """Keep a rejected candidate for inspection (the report's grid): KEY.json and, once generated, its image.

        They go to OUT/rejected/NAME.tar at commit, outside shards/, so no reader of the corpus can
        mistake them for samples; the caller bounds how many.
        """
        sample: dict[str, Any] = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode()}
        if image is not None:
            sample[self.image_format] = encode_image(image, self.image_format, self.jpg_quality)
        self.rejected.append(sample)

    def _rejected_tar(self) -> bytes:
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0.0, user="mifa", group="mifa", mode=0o444) as tw:
            for sample in self.rejected:
                tw.write(sample)
        return buf.getvalue()

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Tar, then parquet (then the kept rejected samples), then the stats JSON marker; returns the stats."""
        fs = self.layout.fs
        self._tar.close()  # closes the tarfile; our wrapper and the real file stay open
        _fsync(self._file)
        self._file.close()  # object store: completes the upload, or raises
        self._closed = True
        if self.layout.is_object_store:
            self.layout.check_uploaded(self._dest_tar, self._hash.size)
        else:
            fs.mv(self._dest_tar, self.layout.tar(self.name))

        table = pa.Table.from_pylist(self.rows, schema=PARQUET_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        parquet_bytes = buf.getvalue()
        self.layout.write_bytes_atomic(self.layout.parquet(self.name), parquet_bytes)

        files = {
            "tar": {"sha256": self._hash.sha.hexdigest(), "bytes": self._hash.size},
            "parquet": {"sha256": hashlib.sha256(parquet_bytes).hexdigest(), "bytes": len(parquet_bytes)},
        }
        if self.rejected:
            data = self._rejected_tar()
            self.layout.write_bytes_atomic(self.layout.rejected_tar(self.name), data)
            files["rejected"] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "samples": len(self.rejected),
            }

        stats = dict(stats)
        stats.update(committed=True, samples=len(self.rows), files=files)
        if self._retries0 is not None:  # transient store errors this shard met and got past (marker's PUT aside)
            stats["store_retries"] = self.layout.store_retries() - self._retries0
        self.layout.write_json_atomic(self.layout.stats(self.name), stats)
        return stats

    def abort(self) -> None:
        """Drop the temporary tar of a failed attempt (best effort: a resume cleans leftovers).

        On an object store the upload is aborted, so nothing is published. A tar this attempt already
        completed stays: it has no marker (a resume deletes it), and deleting the final key here
        could remove the commit of a concurrent attempt of the same shard (same bytes).
        """
        try:
            if self.layout.is_object_store:
                if not self._closed:
                    self._closed = True
                    self._hash.f = io.BytesIO()  # the tar's end blocks go nowhere, the upload never sees them
                    try:
                        self._tar.close()
                    except (OSError, ValueError):
                        pass
                    self.layout.discard_upload(self._file)
                return
            if not self._closed:
                self._closed = True
                # the tarfile first, else it flushes into a closed file when collected; on a full disk
                # both flushes fail again, and the file is closed (and removed below) all the same
                for close in (self._tar.close, self._file.close):
                    try:
                        close()
                    except (OSError, ValueError):
                        pass
            if self.layout.fs.exists(self._dest_tar):
                self.layout.fs.rm(self._dest_tar)
        except OSError as err:
            log.warning("could not remove %s: %s", self._dest_tar, err)
