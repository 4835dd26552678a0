"""The package dependency graph is one-way (issue 19): core/ (the AU schema, the identity encoder's
architecture) imports none of the project's other packages; detectors/ and pipelines/ import core/ and
not each other, except in their training code; neither imports factory/, which may import them all.

Read statically with `ast`, so every import counts wherever it stands: module level, inside a function,
under `if TYPE_CHECKING`, in a try block.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

#: the project's top-level packages
PACKAGES = ("core", "pipelines", "detectors", "factory")
#: package -> the other project packages its modules may import
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "pipelines": frozenset({"core"}),
    "detectors": frozenset({"core"}),
}
#: training code, which may import the other side too (a path ending in / covers a folder): the
#: detectors train on puppet renders; MAUGen's training losses and datasets use the detectors
TRAINING: dict[str, frozenset[str]] = {
    "detectors/train.py": frozenset({"pipelines"}),
    "detectors/data.py": frozenset({"pipelines"}),
    "pipelines/maugen/train.py": frozenset({"detectors"}),
    "pipelines/maugen/losses.py": frozenset({"detectors"}),
    "pipelines/maugen/data/": frozenset({"detectors"}),
}


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(rel: str, source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `source`, the file at `rel` (posix,
    relative to the repository root); relative imports are resolved against the file's package."""
    package = _module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, node.module or ""))
            else:
                base = package[: len(package) - (node.level - 1)]
                out.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return out


def allowed_packages(rel: str) -> frozenset[str]:
    top = rel.split("/")[0]
    extra = [pkgs for path, pkgs in TRAINING.items() if rel == path or (path.endswith("/") and rel.startswith(path))]
    return ALLOWED[top].union({top}, *extra)


def violations(rel: str, source: str) -> list[str]:
    """'path:line imports module' for each import of a project package that `rel` may not import."""
    allowed = allowed_packages(rel)
    return [
        f"{rel}:{line} imports {name}"
        for line, name in imported_modules(rel, source)
        if name.split(".")[0] in PACKAGES and name.split(".")[0] not in allowed
    ]


def _sources() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for top in ALLOWED for p in (ROOT / top).rglob("*.py"))


def test_core_pipelines_and_detectors_import_one_way():
    files = _sources()
    assert "core/facs.py" in files and "core/identity_net.py" in files and len(files) > 40
    bad = [v for rel in files for v in violations(rel, (ROOT / rel).read_text())]
    assert not bad, (
        "imports against the layering (core imports no project package; pipelines and detectors import core, "
        "each other only in training code (TRAINING in tests/test_layering.py), factory never):\n  " + "\n  ".join(bad)
    )


@pytest.mark.parametrize(
    ("rel", "source", "bad"),
    [
        ("core/facs.py", "import numpy as np\nfrom pipelines.prompts import grammar_expand\n", 1),
        ("core/identity_net.py", "def f():\n    import detectors.models\n", 1),
        ("core/facs.py", "import factory\n", 1),
        ("pipelines/maugen/build.py", "def f():\n    from detectors.builtin import resolve\n", 1),
        ("pipelines/maugen/pipeline.py", "if TYPE_CHECKING:\n    import detectors\n", 1),
        ("pipelines/prompts/llm.py", "try:\n    import factory.config\nexcept ImportError:\n    pass\n", 1),
        ("pipelines/maugen/train.py", "from detectors.panel import DetectorPanel\nimport factory.cli\n", 1),
        ("pipelines/maugen/data/puppet.py", "class A:\n    from detectors.data import render\n", 0),
        ("pipelines/maugen/losses.py", "from detectors.metrics import f1_per_au\n", 0),
        ("detectors/panel.py", "from core.facs import AUS\nfrom pipelines.puppet import PuppetRenderer\n", 1),
        ("detectors/data.py", "from pipelines.puppet.data import render\n", 0),
        ("detectors/train.py", "from . import data\nfrom factory.config import FactoryConfig\n", 1),
        ("detectors/__init__.py", "from .models import IdentityNet\nfrom core.identity_net import IdentityNet\n", 0),
        ("pipelines/maugen/data/__init__.py", "from .. import build\nfrom ...puppet import data\n", 0),
    ],
)
def test_the_check_finds_forbidden_imports_wherever_they_stand(rel, source, bad):
    assert len(violations(rel, source)) == bad


def test_relative_imports_resolve_against_the_package():
    assert imported_modules("pipelines/maugen/data/puppet.py", "from ..build import x\nfrom . import types\n") == [
        (1, "pipelines.maugen.build"),
        (2, "pipelines.maugen.data"),
    ]
    assert imported_modules("detectors/__init__.py", "from .spec import load_spec\n") == [(1, "detectors.spec")]


def test_the_au_schema_is_numpy_only():
    """core.facs is imported by every stage, including the light ones: numpy and the standard library only."""
    names = {n.split(".")[0] for _, n in imported_modules("core/facs.py", (ROOT / "core/facs.py").read_text())}
    assert names <= set(sys.stdlib_module_names) | {"numpy"}, names
    probe = (
        "import sys, core.facs; "
        "print(sorted(m for m in ('torch', 'diffusers', 'pipelines', 'detectors', 'factory') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
