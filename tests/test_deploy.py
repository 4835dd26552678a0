"""deploy/: every file parses, every `factory build` entrypoint passes the real CLI, and it fits its cluster.

Entrypoints go through the real typer app and config loader (with `run_build` replaced, so nothing
is built and OUT is never touched); the actors they ask for are packed onto the worker nodes the
manifests declare, node by node, since a Ray actor never spans nodes. Each check is also run on a
broken copy (a bad --set key, too few workers, no `.[gpu]`) to show that it can fail.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from typer.testing import CliRunner

import factory.graph
from factory.cli import app
from factory.config import FactoryConfig
from factory.sizing import size_runtime

DEPLOY = ROOT / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT_ANNOTATION = "mifa.factory/entrypoint"
#: host memory a GPU worker needs per GPU: a MAUGen pipeline (SD 1.5 size) plus detectors, per actor
MIN_MEMORY_PER_GPU = 16 * 2**30
EPS = 1e-9


@dataclass
class Node:
    name: str
    cpu: float
    gpu: float
    memory: float  # bytes


# ---------------------------------------------------------------------------------------------
# parsing


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def _quantity(q: Any) -> float:
    """A Kubernetes quantity: 44, "500m", "170Gi", "32G"."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q).strip())
    assert m, f"not a Kubernetes quantity: {q!r}"
    units = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


def build_args(command: str) -> list[str]:
    """The arguments after `factory build` in a command line (`ray job submit ... -- factory build ...`)."""
    argv = shlex.split(command)
    assert "factory" in argv, f"no `factory` command in {command!r}"
    argv = argv[argv.index("factory") :]
    assert argv[:2] == ["factory", "build"], f"entrypoint is not `factory build ...`: {command!r}"
    return argv[2:]


def cli_config(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[FactoryConfig, str]:
    """The config and OUT that `factory build ARGS` would run with, by the real CLI; nothing runs."""

    class Captured(Exception):
        pass

    seen: dict[str, Any] = {}

    def fake_run_build(cfg: FactoryConfig, out: str, new_build: bool = False) -> None:
        seen.update(cfg=cfg, out=out)
        raise Captured

    runner = CliRunner()
    with monkeypatch.context() as m:
        m.setattr(factory.graph, "run_build", fake_run_build)
        res = runner.invoke(app, ["build", *args])
    if not isinstance(res.exception, Captured):
        raise AssertionError(f"`factory build {shlex.join(args)}` is rejected (exit {res.exit_code}): {res.output}")
    dry = runner.invoke(app, ["build", *args, "--dry-run"])  # the plan of a build, as the CLI prints it
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    cfg = seen["cfg"]
    assert plan["num_shards"] == math.ceil(cfg.build.target / cfg.build.shard_size)
    return cfg, seen["out"]


def kuberay_nodes(spec: dict[str, Any]) -> list[Node]:
    """Ray's view of a RayCluster spec: the head, then one Node per worker replica."""
    nodes = []
    groups = [("head", 1, spec["headGroupSpec"])] + [
        (g["groupName"], int(g.get("maxReplicas", g["replicas"])), g) for g in spec["workerGroupSpecs"]
    ]
    for name, count, group in groups:
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        res = container["resources"]
        limits, requests = res["limits"], res.get("requests", res["limits"])
        for k, v in requests.items():
            assert _quantity(v) <= _quantity(limits.get(k, v)) + EPS, f"{name}: request {k}={v} above its limit"
        params = group.get("rayStartParams", {}) or {}
        gpu = _quantity(limits.get("nvidia.com/gpu", 0))
        if "num-gpus" in params:
            assert _quantity(params["num-gpus"]) == gpu, f"{name}: num-gpus differs from nvidia.com/gpu"
        cpu = _quantity(params.get("num-cpus", limits["cpu"]))
        assert cpu <= _quantity(limits["cpu"]) + EPS, f"{name}: Ray would use more CPUs than the pod's limit"
        nodes += [Node(f"{name}-{i}", cpu, gpu, _quantity(limits["memory"])) for i in range(count)]
    return nodes


def launcher_nodes(doc: dict[str, Any]) -> list[Node]:
    nodes = []
    for name, t in doc["available_node_types"].items():
        count = 1 if name == doc["head_node_type"] else int(t["max_workers"])
        r = t["resources"]
        cpu, gpu, memory = float(r.get("CPU", 0)), float(r.get("GPU", 0)), float(r.get("memory", 0))
        nodes += [Node(f"{name}-{i}", cpu, gpu, memory) for i in range(count)]
    assert sum(1 for n in nodes if not n.name.startswith(doc["head_node_type"])) <= doc["max_workers"]
    return nodes


# ---------------------------------------------------------------------------------------------
# checks: each returns its problems (empty: fine)


def fit_problems(cfg: FactoryConfig, nodes: list[Node]) -> list[str]:
    """Pack the build's actors onto NODES (first fit, largest first), then its shard workers."""
    rt = cfg.runtime
    problems = []
    sizing = size_runtime(cfg, {"CPU": sum(n.cpu for n in nodes), "GPU": sum(n.gpu for n in nodes)})
    if sizing.generator_gpus != 1:
        problems.append(f"runtime.generator_gpus={sizing.generator_gpus:g}: a GPU cluster runs 1 generator per GPU")
    if cfg.generator == "maugen" and cfg.maugen.device == "cpu":
        problems.append("maugen.device=cpu on a GPU cluster")
    actors = [("generator", sizing.generator_cpus, sizing.generator_gpus)] * sizing.generators
    actors += [("detector", sizing.detector_cpus, sizing.detector_gpus)] * sizing.detectors
    free = [[n.cpu, n.gpu] for n in nodes]
    for kind, cpus, gpus in sorted(actors, key=lambda a: (-a[2], -a[1])):
        for f in free:
            if f[0] + EPS >= cpus and f[1] + EPS >= gpus:
                f[0] -= cpus
                f[1] -= gpus
                break
        else:
            problems.append(f"a {kind} actor ({cpus:g} CPU, {gpus:g} GPU) fits on no node: add workers")
    in_flight = sizing.shard_workers
    spare = sum(f[0] for f in free)
    if spare + EPS < in_flight * rt.shard_worker_cpus:
        problems.append(f"{in_flight} shard workers need {in_flight * rt.shard_worker_cpus:g} CPUs, {spare:g} are left")
    for n in nodes:
        if n.gpu and n.memory < MIN_MEMORY_PER_GPU * n.gpu:
            problems.append(f"{n.name}: {n.memory / 2**30:.0f} GiB for {n.gpu:g} GPUs, want >= 16 GiB per GPU")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    lines, cur = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#") and not cur:
            continue
        cur += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if cur.strip():
                lines.append(cur.strip())
            cur = ""
    args = {}
    for ln in lines:
        if ln.startswith("ARG "):
            k, _, v = ln[4:].partition("=")
            args[k.strip()] = v.strip()

    def expand(s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)

    problems = []
    froms = [expand(ln.split()[1]) for ln in lines if ln.startswith("FROM ")]
    if not froms or "cuda" not in froms[-1]:
        problems.append(f"base image {froms[-1] if froms else None!r} is not a CUDA image")
    runs = [expand(ln) for ln in lines if ln.startswith("RUN ")]
    gpu = [i for i, r in enumerate(runs) if re.search(r"pip install \S*\.\[gpu\]", r.replace('"', "").replace("'", ""))]
    torch = [(i, m.group(1)) for i, r in enumerate(runs) if (m := re.search(r"torch==([0-9][\w.+]*)", r))]
    if not gpu:
        problems.append("no `pip install .[gpu]`")
    if not torch:
        problems.append("torch is not pinned (torch==X) before `pip install .[gpu]`")
    elif gpu and torch[0][0] >= gpu[0]:
        problems.append("torch must be installed before `pip install .[gpu]`, else pip picks its own")
    else:
        spec = next(
            Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if Requirement(d).name == "torch"
        )
        if not spec.specifier.contains(torch[0][1]):
            problems.append(f"torch=={torch[0][1]} is outside pyproject.toml's {spec}")
    copied = " ".join(ln for ln in lines if ln.startswith("COPY "))
    needed = ("pyproject.toml", "factory", "pipelines", "detectors")
    problems += [f"{p} is not copied into the image" for p in needed if p not in copied]
    return problems


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def kuberay_env_problems(spec: dict[str, Any], cfg: FactoryConfig, out: str) -> list[str]:
    """What the entrypoint needs from every Ray container: S3 credentials, the token, the checkpoint."""
    problems = []
    for c in _containers(spec):
        env = {e["name"] for e in c.get("env", [])}
        need = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        if out.startswith("s3://"):
            need |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        problems += [f"container {c['name']} lacks env {k}" for k in sorted(need - env)]
        if cfg.generator == "maugen" and not cfg.maugen.checkpoint.startswith("builtin:"):
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            if not any(cfg.maugen.checkpoint.startswith(m.rstrip("/") + "/") for m in mounts):
                problems.append(f"container {c['name']} does not mount {cfg.maugen.checkpoint}")
    return problems


# ---------------------------------------------------------------------------------------------
# the files as they are


def _entrypoints() -> dict[str, str]:
    job = _load(RAYJOB)
    cluster = _load(RAYCLUSTER)
    return {
        "rayjob": job["spec"]["entrypoint"],
        "raycluster": cluster["metadata"]["annotations"][ENTRYPOINT_ANNOTATION],
    }


def _readme_commands() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    joined = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [ln for ln in joined if re.search(r"\bfactory build\b", ln)]


def test_every_deploy_file_parses():
    files = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file())
    assert files == ["Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "ray-cluster.yaml"]
    cluster, job, launcher = _load(RAYCLUSTER), _load(RAYJOB), _load(LAUNCHER)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert launcher["provider"]["type"] and launcher["head_node_type"] in launcher["available_node_types"]
    images = {c["image"] for c in _containers(cluster["spec"]) + _containers(job["spec"]["rayClusterSpec"])}
    images |= {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {launcher["docker"]["image"]}, "one image (deploy/Dockerfile) on every node"
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("which", ["rayjob", "raycluster", "launcher", "readme"])
def test_entrypoints_pass_the_cli_and_fit_their_cluster(which, monkeypatch):
    entry = _entrypoints()
    if which == "readme":
        commands = _readme_commands()
        assert len(commands) >= 2, "deploy/README.md shows the submit commands"
    else:
        commands = [entry["raycluster" if which == "launcher" else which]]
    clusters = {
        "rayjob": kuberay_nodes(_load(RAYJOB)["spec"]["rayClusterSpec"]),
        "raycluster": kuberay_nodes(_load(RAYCLUSTER)["spec"]),
        "launcher": launcher_nodes(_load(LAUNCHER)),
    }
    targets = list(clusters) if which == "readme" else [which]
    for command in commands:
        cfg, out = cli_config(build_args(command), monkeypatch)
        assert out.startswith("s3://") and cfg.build.target == 1_000_000 and cfg.generator == "maugen"
        for t in targets:
            assert fit_problems(cfg, clusters[t]) == [], f"{t}: {command}"
        if which in ("rayjob", "raycluster"):
            spec = _load(RAYJOB)["spec"]["rayClusterSpec"] if which == "rayjob" else _load(RAYCLUSTER)["spec"]
            assert kuberay_env_problems(spec, cfg, out) == []


# ---------------------------------------------------------------------------------------------
# the checks can fail


def test_a_bad_set_key_in_an_entrypoint_fails(monkeypatch):
    args = build_args(_entrypoints()["rayjob"])
    bad = [a.replace("runtime.generator_gpus=", "runtime.generator_gpu=") for a in args]
    with pytest.raises(AssertionError, match="generator_gpu"):
        cli_config(bad, monkeypatch)
    with pytest.raises(AssertionError, match="rejected"):
        cli_config([*args, "--set", "runtime.detector_gpus=-1"], monkeypatch)


def test_fit_fails_on_too_few_workers_or_cpu_generators(monkeypatch):
    cfg, out = cli_config(build_args(_entrypoints()["rayjob"]), monkeypatch)
    spec = copy.deepcopy(_load(RAYJOB)["spec"]["rayClusterSpec"])
    (group,) = spec["workerGroupSpecs"]
    group["replicas"] = group["maxReplicas"] = 3  # 12 GPUs for 16 GPUs of actors
    assert any("generator actor" in p for p in fit_problems(cfg, kuberay_nodes(spec)))
    group["replicas"] = group["maxReplicas"] = 4
    for side in ("requests", "limits"):
        group["template"]["spec"]["containers"][0]["resources"][side]["memory"] = "32Gi"
    assert any("GiB for 4 GPUs" in p for p in fit_problems(cfg, kuberay_nodes(spec)))
    args = [*build_args(_entrypoints()["rayjob"]), "--set", "runtime.generator_gpus=0"]
    cpu_gen, _ = cli_config(args, monkeypatch)
    assert any("generator_gpus=0" in p for p in fit_problems(cpu_gen, kuberay_nodes(_load(RAYCLUSTER)["spec"])))
    worker = group["template"]["spec"]["containers"][0]
    worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_AUTH_MODE"]  # a copy: YAML aliases share
    assert kuberay_env_problems(spec, cfg, out) == ["container ray-worker lacks env RAY_AUTH_MODE"]


def test_dockerfile_check_fails_without_gpu_extra_or_pinned_torch():
    text = DOCKERFILE.read_text()
    assert "no `pip install .[gpu]`" in dockerfile_problems(text.replace('".[gpu]"', "."))
    assert any("not pinned" in p for p in dockerfile_problems(text.replace("torch==", "torch>=")))
    newer = text.replace("TORCH_VERSION=2.13.0", "TORCH_VERSION=2.99.0")
    assert any("outside" in p for p in dockerfile_problems(newer))
    assert any("CUDA image" in p for p in dockerfile_problems(re.sub(r"nvidia/cuda:\S+", "python:3.12-slim", text)))
