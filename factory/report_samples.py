"""Samples for the report's grids: a few accepted ones read from committed tars, and rejected ones.

Accepted samples come from the head of a handful of evenly spaced committed shards, streamed
through fsspec so only those bytes are read (an s3:// tar is not downloaded whole). Rejected
candidates never enter the corpus; each shard keeps the first `build.rejected_samples` of every
reason, whole (image once generated, prompt, labels, scores), in its small rejected/NAME.tar, and
the grid reads those of a few shards. Shards without that file (0 kept, or older builds) give
keys only, from the stats marker's `rejected_examples`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from core.facs import AUS

from .layout import Layout

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
THUMB_PX = 256  # larger images are shrunk (a report of 512 px samples stays small), enough to judge a face enlarged


def spread(items: list[Any], k: int) -> list[Any]:
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


def _samples(layout: Layout, path: str, what: str) -> Iterator[dict[str, Any]]:
    """Samples of a webdataset tar in order ({key, meta, image, ext} as present), streamed through fsspec.

    A member of another key closes the sample before it, as in webdataset. An unreadable tar ends the
    stream with a warning naming it: the grids are a view, and `factory verify` is the check.
    """
    current: dict[str, Any] | None = None
    try:
        with layout.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                if ext not in IMAGE_EXTS and ext != "json":
                    continue
                if current is not None and current["key"] != key:
                    yield current
                    current = None
                current = current or {"key": key}
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if ext == "json":
                    current["meta"] = json.loads(data)
                else:
                    current["image"], current["ext"] = data, ext
    except (OSError, tarfile.TarError, EOFError, json.JSONDecodeError) as err:
        log.warning("%s grid: skipping the rest of %s (%s); `factory verify %s` checks it", what, path, err, layout.out)
        return
    if current is not None:
        yield current


def read_head(layout: Layout, name: str, k: int) -> list[dict[str, Any]]:
    """The first k complete samples (image + KEY.json) of a committed shard's tar, streamed."""
    done: list[dict[str, Any]] = []
    for s in _samples(layout, layout.tar(name), "sample"):
        if "meta" in s and "image" in s:
            done.append(s)
            if len(done) >= k:
                break
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


def _read_kept(layout: Layout, name: str) -> list[dict[str, Any]]:
    """The kept rejected candidates of one committed shard (KEY.json and, if generated, the image)."""
    return [s for s in _samples(layout, layout.rejected_tar(name), "rejected") if "meta" in s]


def _why_no_image(reason: str, stored: bool) -> str:
    """What a rejected sample's card says in place of its image."""
    if stored:
        return "image in rejected/NAME.tar (read only for --html)"
    if reason == "prompt_target_jaccard":
        return "not generated (rejected before the generator)"
    return "no image stored (not a valid image)" if reason == "invalid_image" else "no image stored"


def rejected_samples(
    layout: Layout, stats: dict[str, dict[str, Any]], per_reason: int, with_images: bool
) -> list[dict[str, Any]]:
    """Up to `per_reason` rejected candidates per reason, spread over shards, with any fault injected into them."""
    if per_reason <= 0:
        return []
    names = sorted(stats)
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for name in spread([n for n in names if (stats[n].get("files") or {}).get("rejected")], 2 * per_reason):
        for s in _read_kept(layout, name):
            meta = s["meta"]
            card = _labels(meta) | {"shard": name, "reason": meta.get("reason", "?")}
            if "image" in s and with_images:
                card["image"] = thumbnail_uri(s["image"], s["ext"])
            else:
                card["no_image"] = _why_no_image(card["reason"], "image" in s)
            by_reason.setdefault(card["reason"], []).append(card)
    kept = set(by_reason)
    for name in names:  # keys only, for reasons no kept file covers
        for reason, keys in (stats[name].get("rejected_examples") or {}).items():
            if reason not in kept:
                by_reason.setdefault(reason, []).extend(
                    {
                        "key": k,
                        "shard": name,
                        "reason": reason,
                        "aus": [],
                        "no_image": "not kept (build.rejected_samples)",
                    }
                    for k in keys[:per_reason]
                )
    out = []
    for cards in by_reason.values():
        for card in spread(cards, per_reason):
            injected = [kind for kind, ks in (stats[card["shard"]].get("injected") or {}).items() if card["key"] in ks]
            out.append(card | {"injected": injected})
    return out
