"""The embedded MAUGen checkpoints shipped in pipelines/maugen/models/, named `builtin:NAME` in configs.

A symbolic name keeps a build's config (and so its build id) the same wherever the package is
installed; the checkpoint's content hash goes into build.json separately, so a resume with other
weights is refused. Any other string is a path to a saved `MAUGenPipeline` directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
PREFIX = "builtin:"
#: Beside a saved pipeline: its training subjects' identity embeddings (factory/leakage.py), no photos.
SUBJECTS_FILE = "training_subjects.npz"
#: name -> the training recipes that rebuild it, run in order (`factory train --config RECIPE`); each
#: stage's `init_from` is the previous stage's OUT/final, and the last stage's OUT/final is the checkpoint
BUILTIN_CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "tiny-puppet": (
        "pipelines/maugen/configs/tiny-puppet.yaml",
        "pipelines/maugen/configs/tiny-puppet-reference.yaml",
        "pipelines/maugen/configs/tiny-puppet-refine.yaml",
        "pipelines/maugen/configs/tiny-puppet-features.yaml",
    )
}


def rebuild_commands(name: str) -> str:
    """The commands that rebuild built-in checkpoint `name`, joined for one error line."""
    import yaml

    root = Path(__file__).resolve().parents[2]  # recipes are repo paths (packaged under pipelines/maugen/configs)
    stages = BUILTIN_CHECKPOINTS[name]
    out = yaml.safe_load((root / stages[-1]).read_text())["out"]
    return "; then ".join(f"`factory train --config {r}`" for r in stages) + f"; and copy {out}/final to {MODELS_DIR / name}"


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
        fix = f"rebuild it with {rebuild_commands(name)}"
    else:
        path = Path(ref).expanduser()
        fix = "train one with `factory train --config ...` and point maugen.checkpoint at OUT/final"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"maugen.checkpoint {ref} ({path}) is not a saved MAUGenPipeline (no model_index.json); {fix}")
    return path


def checkpoint_hash(path: Path) -> str:
    """sha256 over a checkpoint directory's file names and bytes (provenance; resume refuses a change).

    The training subjects' embeddings (SUBJECTS_FILE) are left out: they are not the weights, may be
    recomputed for another identity encoder, and a build that uses them records their own hash.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != SUBJECTS_FILE):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_image_size(path: Path) -> int:
    """The image size a saved pipeline makes (its UNet's sample size times the latent's scale), read from
    its component configs without loading weights; as `MAUGenPipeline.vae_scale_factor` works it out."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae_config = path / "vae" / "config.json"
        if vae_config.is_file():
            scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
        else:  # pixel space: p x p patches folded into 3 p^2 channels
            scale = round((int(unet["out_channels"]) / 3) ** 0.5)
        return int(unet["sample_size"]) * scale
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(
            f"{path} is not a readable saved MAUGenPipeline ({type(err).__name__}: {err}); re-save it"
        ) from None
