"""A pool of real identity exemplars: face photos read lazily by index, with optional attributes and masks.

Three layouts, local or on any fsspec store (s3://...):

- a folder: image files (png/jpg/jpeg/webp) sorted by name; optional `attributes.csv` (column
  `name`, the image's file name, then any of `skin_group` (0-5), `age_group` (child, young_adult,
  adult, elderly) and other columns, kept as text); optional `masks/STEM.png` per image (white =
  the face to generate);
- a parquet file (or a folder of them, read in name order): one row per identity with `name`,
  `image` (encoded bytes), optional `mask` (encoded bytes) and attribute columns;
- webdataset shards (`.tar` files of a folder, in name order): KEY.jpg|png, optional
  KEY.mask.png and KEY.json (attributes).

Opening a pool reads only its listing and attributes (a 100k-identity pool at 512 px is never held
in memory); `read(i, size)` loads one exemplar. Its `content_hash` covers every entry's name,
stored size and attributes, so a build can refuse to resume against a changed pool.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict

from .images import decode_face, decode_mask

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
#: Attribute values the plan balances on (the same groups as the puppet domain's).
SKIN_GROUPS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
AGE_GROUPS: tuple[str, ...] = ("child", "young_adult", "adult", "elderly")
PoolKind = Literal["folder", "parquet", "webdataset"]


class PoolError(ValueError):
    """A pool that cannot be read as asked: one line naming the file and the fix."""


class PoolIdentity(BaseModel):
    """What a sample records of its exemplar: which pool entry, and its attributes (None: not given)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["pool"] = "pool"
    index: int
    name: str
    skin_group: int | None = None
    age_group: str | None = None


@dataclass
class _Entry:
    name: str
    size: int  # stored bytes of the image (what the content hash covers besides attributes)
    attrs: dict[str, str] = field(default_factory=dict)
    image_ref: tuple = ()  # how to find the bytes: (path,), (parquet file, row), (tar, member)
    mask_ref: tuple | None = None


class ExemplarPool:
    """Exemplar photos by index; see the module docstring for the layouts."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        if not self.fs.exists(self.root):
            raise PoolError(f"identity pool {uri} does not exist; give a folder of photos, a parquet or webdataset shards")
        self.kind: PoolKind = self._kind()
        self.entries: list[_Entry] = getattr(self, f"_list_{self.kind}")()
        if not self.entries:
            raise PoolError(f"identity pool {uri} holds no exemplars; add face photos ({', '.join(IMAGE_SUFFIXES)})")
        for e in self.entries:
            _check_attrs(e, self.uri)
        log.info("identity pool %s: %d exemplars (%s)", self.uri, len(self.entries), self.kind)

    # ------------------------------------------------------------------ listing

    def _kind(self) -> PoolKind:
        if self.fs.isdir(self.root):
            names = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
            if any(n.endswith(".parquet") for n in names):
                return "parquet"
            if any(n.endswith(".tar") for n in names):
                return "webdataset"
            return "folder"
        if self.root.endswith(".parquet"):
            return "parquet"
        if self.root.endswith(".tar"):
            return "webdataset"
        raise PoolError(f"identity pool {self.uri} is a file but not .parquet or .tar; give a folder of photos instead")

    def _files(self, suffix: str) -> list[str]:
        if not self.fs.isdir(self.root):
            return [self.root]
        return sorted(p for p in self.fs.ls(self.root, detail=False) if p.endswith(suffix))

    def _list_folder(self) -> list[_Entry]:
        attrs = self._attributes_csv()
        masks_dir = posixpath.join(self.root, "masks")
        masks = {}
        if self.fs.isdir(masks_dir):
            masks = {posixpath.splitext(posixpath.basename(p))[0]: p for p in self.fs.ls(masks_dir, detail=False)}
        entries = []
        for info in sorted(self.fs.ls(self.root, detail=True), key=lambda d: d["name"]):
            path, base = info["name"], posixpath.basename(info["name"])
            if info["type"] == "directory" or base == "attributes.csv" or base.startswith("."):
                continue
            if not base.lower().endswith(IMAGE_SUFFIXES):
                raise PoolError(
                    f"identity pool {self.uri} holds {base}, which is not an image ({', '.join(IMAGE_SUFFIXES)}); "
                    "move it out of the pool folder"
                )
            stem = posixpath.splitext(base)[0]
            mask = masks.get(stem)
            entries.append(_Entry(base, int(info.get("size") or 0), attrs.pop(base, {}), (path,), (mask,) if mask else None))
        if attrs:
            raise PoolError(
                f"{self.uri}/attributes.csv names {sorted(attrs)[:3]} (and {max(0, len(attrs) - 3)} more), which are not "
                "images of the pool; fix their `name` column (the image's file name)"
            )
        return entries

    def _attributes_csv(self) -> dict[str, dict[str, str]]:
        path = posixpath.join(self.root, "attributes.csv")
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "r") as f:
            rows = list(csv.DictReader(f))
        if rows and "name" not in rows[0]:
            raise PoolError(f"{self.uri}/attributes.csv has no `name` column; its first row must name the columns")
        return {r["name"]: {k: v for k, v in r.items() if k != "name" and v not in ("", None)} for r in rows}

    def _list_parquet(self) -> list[_Entry]:
        import pyarrow.parquet as pq

        entries = []
        for path in self._files(".parquet"):
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in pf.schema_arrow.names if c not in ("image", "mask")]
                if "name" not in cols or "image" not in pf.schema_arrow.names:
                    raise PoolError(f"{path}: an identity parquet needs `name` and `image` columns")
                meta = pf.read(columns=cols).to_pylist()
                sizes = pf.read(columns=["image"]).column("image").to_pylist()
                has_mask = "mask" in pf.schema_arrow.names
            for row, (m, img) in enumerate(zip(meta, sizes)):
                attrs = {k: str(v) for k, v in m.items() if k != "name" and v is not None}
                ref = (path, row)
                entries.append(_Entry(str(m["name"]), len(img or b""), attrs, ref, ref if has_mask else None))
        return entries

    def _list_webdataset(self) -> list[_Entry]:
        entries = []
        for path in self._files(".tar"):
            with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name, m in members.items():
                    key, _, ext = name.partition(".")
                    if ext.lower() not in ("jpg", "jpeg", "png", "webp"):
                        continue
                    attrs = {}
                    if f"{key}.json" in members:
                        attrs = {k: str(v) for k, v in json.load(tar.extractfile(members[f"{key}.json"])).items()}
                    mask = (path, f"{key}.mask.png") if f"{key}.mask.png" in members else None
                    entries.append(_Entry(key, m.size, attrs, (path, name), mask))
        return entries

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.entries)

    def identity(self, i: int) -> PoolIdentity:
        e = self.entries[i]
        skin = e.attrs.get("skin_group")
        return PoolIdentity(
            index=i, name=e.name, skin_group=None if skin is None else int(skin), age_group=e.attrs.get("age_group")
        )

    def axes(self) -> dict[str, bool]:
        """Which plan axes the pool can balance: an axis counts when every entry has that attribute."""
        return {a: all(a in e.attrs for e in self.entries) for a in ("skin_group", "age_group")}

    def read(self, i: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Exemplar i as uint8 (size, size, 3) (centre square crop) and its user mask (size, size) or None.

        An unreadable image is a ValueError naming the entry (callers skip it and record the name).
        """
        e = self.entries[i]
        image = decode_face(self._bytes(e.image_ref, "image"), size, f"{self.uri}: {e.name}")
        mask = None
        if e.mask_ref is not None:
            mask = decode_mask(self._bytes(e.mask_ref, "mask"), size, f"{self.uri}: mask of {e.name}")
        return image, mask

    def _bytes(self, ref: tuple, column: str) -> bytes:
        if self.kind == "folder":
            with self.fs.open(ref[0], "rb") as f:
                return f.read()
        if self.kind == "parquet":
            return _parquet_cell(self.fs, ref[0], ref[1], column)
        with self.fs.open(ref[0], "rb") as f, tarfile.open(fileobj=f) as tar:
            return tar.extractfile(ref[1]).read()

    def content_hash(self) -> str:
        """sha256 over every entry's name, stored size and attributes, in pool order."""
        h = hashlib.sha256(self.kind.encode())
        for e in self.entries:
            h.update(json.dumps([e.name, e.size, sorted(e.attrs.items()), e.mask_ref is not None]).encode())
        return h.hexdigest()

    def split(self, part: Literal["train", "build", "all"], train_share: float) -> list[int]:
        """Indices of one side of the recorded split rule: an entry is a training identity when the
        first 8 bytes of sha256(name), as a fraction of 2^64, fall below `train_share`; the rest
        are build identities. The rule depends on the name only, so it holds as the pool grows."""
        if part == "all":
            return list(range(len(self)))
        out = []
        for i, e in enumerate(self.entries):
            u = int.from_bytes(hashlib.sha256(e.name.encode()).digest()[:8], "big") / 2**64
            if (u < train_share) == (part == "train"):
                out.append(i)
        return out


def _check_attrs(e: _Entry, uri: str) -> None:
    skin, age = e.attrs.get("skin_group"), e.attrs.get("age_group")
    if skin is not None and (not skin.strip().isdigit() or int(skin) not in SKIN_GROUPS):
        raise PoolError(
            f"identity pool {uri}: {e.name} has skin_group={skin!r}; the groups are {', '.join(map(str, SKIN_GROUPS))} "
            "(light to dark), or leave it empty"
        )
    if age is not None and age not in AGE_GROUPS:
        raise PoolError(
            f"identity pool {uri}: {e.name} has age_group={age!r}; the groups are {', '.join(AGE_GROUPS)}, "
            "or leave it empty"
        )


def _parquet_cell(fs, path: str, row: int, column: str) -> bytes:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        start = 0
        for g in range(pf.num_row_groups):  # read only the row group that holds the row
            n = pf.metadata.row_group(g).num_rows
            if row < start + n:
                return pf.read_row_group(g, columns=[column]).column(column)[row - start].as_py()
            start += n
    raise IndexError(f"{path} has no row {row}")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image or mask (for tests and for writing pools)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
