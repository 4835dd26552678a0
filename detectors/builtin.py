"""The embedded tiny models shipped in detectors/models/, referred to as `builtin:NAME` in configs.

A symbolic reference keeps a build's config (and so its build id) the same on every machine,
wherever the package is installed; the model files' hashes go into build.json separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .spec import SpecError, Task, load_spec

if TYPE_CHECKING:
    import torch

MODELS_DIR = Path(__file__).resolve().parent / "models"
PREFIX = "builtin:"
BUILTIN_MODELS: tuple[str, ...] = (
    "au-cnn", "au-resnet", "au-vit", "realism", "identity", "eval-au", "eval-identity",
)


def resolve(ref: str) -> Path:
    """`builtin:au-cnn` -> the packaged spec file; any other string is a path to a spec YAML."""
    if ref.startswith(PREFIX):
        name = ref[len(PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise SpecError(
                f"{ref!r} is not a built-in model; built-in: {', '.join(PREFIX + m for m in BUILTIN_MODELS)}"
            )
        path = MODELS_DIR / name / "spec.yaml"
        if not path.is_file():
            raise SpecError(
                f"built-in model {ref} is missing ({path}); rebuild it with `factory detectors train {name}`"
            )
        return path
    return Path(ref).expanduser()


def torch_weights(ref: str, task: Task) -> Path:
    """The torch weights (spec key `torch_weights`) of the `task` model that `ref` names: a diffusers-style
    folder, or the `.pth` file of a spec with `torch_arch`.

    MAUGen takes its identity encoder from here, loaded by `torch_identity_encoder(cfg.identity_encoder)`.
    """
    spec = load_spec(resolve(ref), task=task)
    path = spec.torch_path
    found = path is not None and (path.is_file() if spec.spec.torch_arch else path.is_dir())
    if not found:
        what = f"{spec.spec.torch_arch} checkpoint (.pth)" if spec.spec.torch_arch else "weights folder"
        raise FileNotFoundError(
            f"{task} model {ref}: its torch weights are needed (spec key torch_weights), found no {what} at {path}"
        )
    return path


def torch_identity_encoder(ref: str) -> torch.nn.Module:
    """The frozen torch identity encoder of the identity spec `ref` (MAUGen's `model.identity_encoder`): the
    IdentityNet folder of `torch_weights`, or for a spec with `torch_arch` ArcFace's IResNet from its `.pth`,
    taking the spec's input resize, mean, std and channel order: it sees what the spec's ONNX file, which
    serves the identity check, eval and the leakage measure, sees."""
    from core.identity_net import load_identity_encoder

    spec = load_spec(resolve(ref), task="identity")
    path = torch_weights(ref, "identity")
    arch = spec.spec.torch_arch
    if arch is None:
        return load_identity_encoder(path)
    inp = spec.spec.input
    return load_identity_encoder(
        path, arch, resize=inp.resize, mean=inp.mean, std=inp.std, channel_order=inp.channel_order
    )
