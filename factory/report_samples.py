"""Samples for the report's grids: a few accepted ones read from committed tars, rejected ones from stats.

Accepted samples come from the head of a handful of evenly spaced committed shards, streamed
through fsspec so only those bytes are read (an s3:// tar is not downloaded whole). Rejected
samples are never written (the shard writer keeps only accepted ones, and the stats marker
holds only their keys per reason), so their cards show key, reason and shard, plus the fault
injected into them when MIFA_INJECT did; their images would have to be regenerated, which a
report must not do.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import posixpath
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from pipelines.facs import AUS

from .layout import Layout

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
THUMB_PX = 160  # larger images are shrunk, so a report of 512 px samples stays small


def spread(items: list[str], k: int) -> list[str]:
    """Up to k items evenly spaced over the list (first and last included), in order."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


def _split(member: str) -> tuple[str, str]:
    """webdataset's key/field split: the key runs to the first dot of the base name."""
    d, base = posixpath.split(member)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext


def read_head(layout: Layout, name: str, k: int) -> list[dict[str, Any]]:
    """The first k complete samples (image + KEY.json) of a committed shard's tar, streamed."""
    path = layout.tar(name)
    found: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    try:
        with layout.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                if ext not in IMAGE_EXTS and ext != "json":
                    continue
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                s = found.setdefault(key, {"key": key})
                if ext == "json":
                    s["meta"] = json.loads(data)
                else:
                    s["image"], s["ext"] = data, ext
                if "meta" in s and "image" in s:
                    done.append(found.pop(key))
                    if len(done) >= k:
                        break
    except (OSError, tarfile.TarError, EOFError, json.JSONDecodeError) as err:
        log.warning("sample grid: skipping %s (%s); `factory verify %s` checks it", path, err, layout.out)
    return done


def thumbnail_uri(data: bytes, ext: str) -> str:
    """A data: URI of the image, shrunk to THUMB_PX when larger (small ones go in as they are)."""
    mime = "image/jpeg" if ext in ("jpg", "jpeg") else f"image/{ext}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > THUMB_PX:
                im = im.convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data, mime = buf.getvalue(), "image/png"
    except OSError as err:
        log.warning("sample image does not decode (%s); embedded as stored", err)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _labels(meta: dict[str, Any]) -> dict[str, Any]:
    """Caption fields of an accepted sample: emotion, identity, occurring AUs with intensity, scores."""
    lab = meta.get("labels", {})
    occ, inten = lab.get("occurrence", []), lab.get("intensity", [])
    aus = [
        {"au": f"AU{au}", "intensity": round(float(inten[i]), 2), "occurs": bool(occ[i])}
        for i, au in enumerate(AUS)
        if i < min(len(occ), len(inten)) and (occ[i] or inten[i] >= 0.5)
    ]
    ident = meta.get("identity", {})
    return {
        "key": meta.get("key"),
        "emotion": meta.get("emotion"),
        "strength": meta.get("strength"),
        "skin_group": ident.get("skin_group"),
        "age_group": ident.get("age_group"),
        "prompt": meta.get("prompt", ""),
        "aus": aus,
        "scores": {k: round(float(v), 3) for k, v in (meta.get("scores") or {}).items()},
    }


def accepted_samples(layout: Layout, names: list[str], count: int, with_images: bool) -> list[dict[str, Any]]:
    """About `count` accepted samples from evenly spaced committed shards, captions and (optionally) images."""
    if count <= 0 or not names:
        return []
    shards = spread(sorted(names), min(len(names), max(1, (count + 3) // 4)))
    per_shard = -(-count // len(shards))
    out: list[dict[str, Any]] = []
    for name in shards:
        for s in read_head(layout, name, per_shard):
            card = _labels(s["meta"]) | {"shard": name}
            if with_images:
                card["image"] = thumbnail_uri(s["image"], s["ext"])
            out.append(card)
            if len(out) >= count:
                return out
    return out


def rejected_samples(stats: dict[str, dict[str, Any]], per_reason: int) -> list[dict[str, Any]]:
    """Up to `per_reason` rejected keys per reason, spread over shards, with any fault injected into them."""
    by_reason: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(stats):
        for reason, keys in (stats[name].get("rejected_examples") or {}).items():
            by_reason.setdefault(reason, []).extend((name, k) for k in keys[:per_reason])
    out = []
    for reason, pairs in by_reason.items():
        picked = spread([f"{n}\0{k}" for n, k in pairs], per_reason)
        for item in picked:
            name, key = item.split("\0")
            injected = [kind for kind, ks in (stats[name].get("injected") or {}).items() if key in ks]
            out.append({"key": key, "shard": name, "reason": reason, "injected": injected})
    return out
