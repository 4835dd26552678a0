"""The embedded MAUGen checkpoints shipped in pipelines/maugen/models/, named `builtin:NAME` in configs.

A symbolic name keeps a build's config (and so its build id) the same wherever the package is
installed; the checkpoint's content hash goes into build.json separately, so a resume with other
weights is refused. Any other string is a path to a saved `MAUGenPipeline` directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
PREFIX = "builtin:"
#: name -> the training recipe that rebuilds it (`factory train --config RECIPE --out runs/NAME`)
BUILTIN_CHECKPOINTS: dict[str, str] = {"tiny-puppet": "pipelines/maugen/configs/tiny-puppet.yaml"}


def resolve_checkpoint(ref: str) -> Path:
    """`builtin:tiny-puppet` -> the packaged pipeline directory; a path must hold a saved MAUGenPipeline."""
    if ref.startswith("meta:"):
        raise FileNotFoundError(
            f"maugen.checkpoint {ref} has no weights: it sizes `factory build --dry-run` only; train a MAUGen "
            "(`factory train --set model.base=SD_DIR ...`) and point maugen.checkpoint at OUT/final"
        )
    if ref.startswith(PREFIX):
        name = ref[len(PREFIX) :]
        if name not in BUILTIN_CHECKPOINTS:
            raise FileNotFoundError(
                f"maugen.checkpoint {ref!r} is not a built-in checkpoint; built-in: "
                f"{', '.join(PREFIX + n for n in BUILTIN_CHECKPOINTS)}"
            )
        path = MODELS_DIR / name
        fix = (
            f"rebuild it with `factory train --config {BUILTIN_CHECKPOINTS[name]} --out runs/{name}` "
            f"and copy runs/{name}/final to {path}"
        )
    else:
        path = Path(ref).expanduser()
        fix = "train one with `factory train --config ...` and point maugen.checkpoint at OUT/final"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"maugen.checkpoint {ref} ({path}) is not a saved MAUGenPipeline (no model_index.json); {fix}")
    return path


def checkpoint_hash(path: Path) -> str:
    """sha256 over a checkpoint directory's file names and bytes (provenance; resume refuses a change)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
