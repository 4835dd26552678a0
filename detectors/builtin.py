"""The embedded tiny models shipped in detectors/models/, referred to as `builtin:NAME` in configs.

A symbolic reference keeps a build's config (and so its build id) the same on every machine,
wherever the package is installed; the model files' hashes go into build.json separately.
"""

from __future__ import annotations

from pathlib import Path

from .spec import SpecError, Task, load_spec

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
    """The torch weights folder (spec key `torch_weights`) of the `task` model that `ref` names.

    MAUGen takes its identity encoder from here: `build_pipeline(cfg, torch_weights(cfg.identity_encoder, "identity"))`.
    """
    spec = load_spec(resolve(ref), task=task)
    if spec.torch_path is None or not spec.torch_path.is_dir():
        raise FileNotFoundError(
            f"{task} model {ref}: its torch weights are needed (spec key torch_weights), "
            f"found none at {spec.torch_path}"
        )
    return spec.torch_path
