"""The real path at toy scale: README's "Building the real MIFA", every command, on the CPU.

Every stage the real run uses, none replaced by the puppet generator: a Stable Diffusion 1.5
inpainting folder (random weights, toy widths, 128 px; tests/real_fixtures.py) -> `factory train
--set model.base=SD_DIR` on a DISFA-layout fixture -> `factory build --dry-run` -> the build,
submitted with `ray job submit` to a one-node Ray cluster on loopback (token auth), with that
MAUGen and a folder pool of photos (attributes.csv, user masks, masks=auto) -> the same build into
another OUT whose driver is SIGKILLed mid-build, then README's `ray job submit -- factory resume`:
byte-identical to the first -> `factory verify`, `factory report --html`, `factory eval --json`.

The commands are read from README's section and run with toy paths and sizes (TOY_VALUES,
TOY_EXTRAS), so what the README says is what runs. On 2 cores the cluster starts while the model
trains, the killed build runs beside the other one and the resume beside verify/report/eval.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SMALL_RAY, factory, shard_stats, wait_for_port
from PIL import Image
from real_fixtures import MASKED_PHOTOS, POOL_PHOTOS, write_face_pool, write_tiny_sd_inpainting
from test_maugen_data import make_disfa

from factory.leakage import FIELDS, TrainingSubjects
from pipelines.maugen.data import disfa_split

SECTION = "## Building the real MIFA"
BIN = Path(sys.executable).parent  # this venv's `factory` and `ray`
#: The trained size of the toy model, so the corpus size; not the puppet's 64.
SIZE = 128
BUILTIN_DETECTORS = "[builtin:au-cnn,builtin:au-resnet,builtin:au-vit]"

#: Values the toy run gives README's options and `--set` keys (sizes and the detectors it has).
TOY_VALUES: dict[str, str] = {
    "--target": "6",
    "--shard-size": "2",
    "steps": "3",
    "batch_size": "2",
    "checkpoint_every": "2",
    # bf16 is for the GPUs; quoted, or `--set` reads YAML's `no` as false (pipelines/overrides.py:parse_value)
    "mixed_precision": "'no'",
    "detect.au_detectors": BUILTIN_DETECTORS,
}
#: What the toy run adds per command: one CPU thread for training (the suite shares 2 cores), few
#: sampling steps, no label checks (a model with random weights draws labels that agree with
#: nothing, so the checks would reject every candidate), and one shard in flight on a CPU where
#: README's `runtime.*` keys place GPU actors. Two builds run side by side on the 4-CPU head, so each
#: reserves under half of it (1 generator x 1 CPU, the detector 0.5, the shard worker 0.25): sized to
#: the whole cluster each, both could start part of their actors and wait forever for the rest.
TOY_EXTRAS: dict[str, list[str]] = {
    "train": ["--set", "threads=1", "--set", "log_every=1"],
    "build": [
        "--set", "maugen.steps=2",
        "--set", "checks.label_prompt_jaccard=0",
        "--set", "checks.label_consensus_jaccard=0",
        *SMALL_RAY,
        "--set", "runtime.max_shards_in_flight=1",  # one shard worker: one process fewer to start
        "--set", "runtime.num_generators=1",
        "--set", "runtime.generator_cpus=1",
    ],  # fmt: skip
}
#: The paths of README's commands, each replaced by a temporary one (the fixture `real`).
README_PATHS = (
    "/models/sd15-inpainting",
    "/data/DISFA",
    "/models/maugen-sd15",
    "s3://bucket/faces",
    "s3://bucket/mifa",
    "mifa-report.html",
)
#: README's commands in order: (run through `ray job submit`, factory subcommand).
README_SHAPE = [
    (False, "train"),
    (False, "build"),
    (True, "build"),
    (True, "resume"),
    (False, "verify"),
    (False, "report"),
    (False, "eval"),
]


# ---------------------------------------------------------------------------------------------
# README's commands


def readme_commands() -> list[list[str]]:
    """The commands of README's section, one argv each (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end >= 0 else len(text)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def split_submit(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """`ENV=... ray job submit ... -- factory ...` -> (the part before `factory`, the factory argv);
    a plain `factory ...` -> (None, argv)."""
    if argv[0] == "factory":
        return None, argv
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def toy(argv: list[str], paths: dict[str, str]) -> list[str]:
    """A README `factory ...` argv with toy paths (prefix match), TOY_VALUES, no `runtime.*` keys and
    TOY_EXTRAS; without the leading `factory`."""
    assert argv[0] == "factory", argv

    def sub(value: str) -> str:
        for real, local in paths.items():
            if value == real or value.startswith(real + "/"):
                return local + value[len(real) :]
        return value

    out: list[str] = []
    it = iter(argv[1:])
    for tok in it:
        if tok == "--set":
            key, _, value = next(it).partition("=")
            if key.startswith("runtime."):  # where the actors go on the cluster
                continue
            out += ["--set", f"{key}={sub(TOY_VALUES.get(key, value))}"]
        elif tok in TOY_VALUES:
            next(it)
            out += [tok, TOY_VALUES[tok]]
        else:
            out.append(sub(tok))
    return out + TOY_EXTRAS.get(argv[1], [])


def without_runtime(argv: list[str]) -> list[str]:
    out, it = [], iter(argv)
    for tok in it:
        if tok == "--set":
            kv = next(it)
            if not kv.startswith("runtime."):
                out += [tok, kv]
        else:
            out.append(tok)
    return out


def test_readme_section_is_the_real_run_and_its_toy_mapping():
    """The README's commands have the expected shape, the build it submits is the one it planned, and
    every path the toy run replaces is one the README uses (no command runs unmapped)."""
    cmds = readme_commands()
    split = [split_submit(c) for c in cmds]
    assert [(env is not None, argv[1]) for env, argv in split] == README_SHAPE
    for env, _ in split:
        if env is not None:
            assert env[:4] == ["RAY_AUTH_MODE=token", "ray", "job", "submit"] and "--address" in env, env
    train, plan, submit, resume = (argv for _, argv in split[:4])
    sets = dict(train[i + 1].split("=", 1) for i, t in enumerate(train) if t == "--set")
    assert sets["model.base"] == "/models/sd15-inpainting" and sets["data.kind"] == "disfa"
    assert sets["train_text_encoder"] == "false" and train[train.index("--out") + 1] == "/models/maugen-sd15"
    assert plan[-1] == "--dry-run" and plan[:-1] == without_runtime(submit)
    assert any(a.startswith("runtime.") for a in submit)
    assert "maugen.checkpoint=/models/maugen-sd15/final" in plan and "identities.source=pool" in plan
    assert resume[2] == plan[plan.index("--out") + 1] == "s3://bucket/mifa"
    # every key the toy run gives a value is in the README, and every path there is one it replaces
    tokens = [t for _, argv in split for t in argv]
    keys = {t.split("=", 1)[0] for t in tokens}
    assert set(TOY_VALUES) <= keys, set(TOY_VALUES) - keys
    for t in tokens:
        key, _, value = t.rpartition("=")
        if key in TOY_VALUES:
            continue
        if value.startswith(("/", "s3://")) or value.endswith(".html"):
            assert any(value == p or value.startswith(p + "/") for p in README_PATHS), value


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class RealRun:
    tmp: Path
    sd: Path
    disfa: Path
    pool: Path
    run: Path  # the training run (RUN/final is the checkpoint)
    out: Path  # the uninterrupted build
    killed: Path  # the build whose driver is SIGKILLed mid-way, then resumed
    report_html: Path
    paths: dict[str, str]
    results: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    killed_committed: int = -1
    seconds: dict[str, float] = field(default_factory=dict)


def _env(**extra: str) -> dict[str, str]:
    """The environment of a command: `factory` and `ray` of this venv first on PATH, no fault injection."""
    env = dict(os.environ)
    for k in ("MIFA_FAULTS", "MIFA_INJECT", "MIFA_VERBOSE", "RAY_ADDRESS"):
        env.pop(k, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(log: Path) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """A one-node Ray head on loopback with token auth and the jobs API: (process, dashboard URL, token).
    4 logical CPUs, so two toy builds fit side by side on 2 cores. Stopped by its process group."""
    token = secrets.token_hex(16)
    dash = _free_port()
    with log.open("w") as f:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=4",
             "--object-store-memory=100000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--disable-usage-stats"],
            cwd=ROOT, env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield head, f"http://127.0.0.1:{dash}", token
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(2)
        except subprocess.TimeoutExpired:  # `ray start --block` often takes far longer to stop
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(0.5)
        for pid in _pids_of_group(head.pid):  # what outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def submitted(readme_argv: list[str], paths: dict[str, str], url: str, token: str) -> tuple[list[str], dict]:
    """README's `ENV=... ray job submit --address URL -- factory ...` with this cluster's URL, its token
    (README: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and the toy factory command: (argv, env)."""
    prefix, command = split_submit(readme_argv)
    assert prefix is not None
    env_vars = dict(a.split("=", 1) for a in prefix if re.fullmatch(r"[A-Z_]+=.*", a))
    ray_argv = [a for a in prefix if not re.fullmatch(r"[A-Z_]+=.*", a)]
    assert ray_argv[0] == "ray"
    ray_argv = [str(BIN / "ray"), *(url if a == "http://HEAD:8265" else a for a in ray_argv[1:])]
    return [*ray_argv, "--", "factory", *toy(command, paths)], _env(**env_vars, RAY_AUTH_TOKEN=token)


def _popen(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _done(proc: subprocess.Popen, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    return subprocess.CompletedProcess(proc.args, rc, log.read_text(), "")


def _pids_of_group(pgid: int) -> list[int]:
    rows = subprocess.run(["ps", "-eo", "pid,pgid"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [int(r.split()[0]) for r in rows if int(r.split()[1]) == pgid]


def _driver_pid(out: Path) -> int | None:
    """The job's driver: the `factory build ... --out OUT` process the job supervisor started."""
    rows = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    for r in rows:
        pid, _, args = r.strip().partition(" ")
        if "factory build" in args and f"--out {out} " in args + " " and "job submit" not in args:
            return int(pid)
    return None


def _kill_driver_mid_build(out: Path, client: subprocess.Popen, num_shards: int, timeout: float = 240) -> int:
    """SIGKILL the job driver's process group once one shard is committed while another is being
    written (the job dies: its actors go with it); returns the committed count at the kill."""
    shards = out / "shards"
    deadline = time.time() + timeout
    while time.time() < deadline and client.poll() is None:
        committed = list(shards.glob("*.stats.json")) if shards.exists() else []
        writing = list(shards.glob(".tmp-*.tar.*")) if shards.exists() else []
        if committed and writing and len(committed) < num_shards:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"never saw a committed shard beside one being written (client exit {client.poll()})")
    pid = _driver_pid(out)
    assert pid is not None, "no `factory build` driver process found"
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return len(list(shards.glob("*.stats.json")))


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Iterator[RealRun]:
    """README's commands at toy scale, in its order; each CompletedProcess under results[...]."""
    tmp = tmp_path_factory.mktemp("real")
    with ray_head(tmp / "head.log") as (head, url, token):  # it starts while the model trains
        yield _run_readme(tmp, head, url, token)


def _run_readme(tmp: Path, head: subprocess.Popen, url: str, token: str) -> RealRun:
    t0 = time.perf_counter()
    r = RealRun(
        tmp=tmp,
        sd=write_tiny_sd_inpainting(tmp / "sd15-inpainting", image_size=SIZE),
        disfa=make_disfa(tmp / "DISFA"),
        pool=write_face_pool(tmp / "faces"),
        run=tmp / "maugen-sd15",
        out=tmp / "mifa",
        killed=tmp / "mifa-killed",
        report_html=tmp / "mifa-report.html",
        paths={},
    )
    r.paths = dict(zip(README_PATHS, map(str, (r.sd, r.disfa, r.run, r.pool, r.out, r.report_html))))
    r.seconds["fixtures"] = time.perf_counter() - t0
    (train, plan, submit_build, submit_resume, verify, report, eval_) = readme_commands()

    t = time.perf_counter()
    r.results["train"] = factory(*toy(train, r.paths), timeout=300)
    r.seconds["train"] = time.perf_counter() - t
    assert r.results["train"].returncode == 0, r.results["train"].stderr[-4000:]
    r.results["plan"] = factory(*toy(plan, r.paths))

    # the submitted build, and beside it the same build into another OUT whose driver is killed
    t = time.perf_counter()
    wait_for_port(int(url.rsplit(":", 1)[1]), head)
    r.seconds["ray head (after training)"] = time.perf_counter() - t
    killed_paths = r.paths | {"s3://bucket/mifa": str(r.killed)}
    ref = _popen(*submitted(submit_build, r.paths, url, token), tmp / "build.log")
    victim = _popen(*submitted(submit_build, killed_paths, url, token), tmp / "killed.log")
    r.killed_committed = _kill_driver_mid_build(r.killed, victim, num_shards=3)
    r.results["killed"] = _done(victim, tmp / "killed.log")
    r.results["build"] = _done(ref, tmp / "build.log")
    r.seconds["build"] = time.perf_counter() - t

    # README's resume of the killed build, and beside it verify / report / eval of the other
    t = time.perf_counter()
    resumed = _popen(*submitted(submit_resume, killed_paths, url, token), tmp / "resume.log")
    r.results["verify"] = factory(*toy(verify, r.paths))
    r.results["report"] = factory(*toy(report, r.paths))
    r.results["eval"] = factory(*toy(eval_, r.paths))
    r.results["resume"] = _done(resumed, tmp / "resume.log")
    r.results["verify_resumed"] = factory("verify", str(r.killed))
    r.seconds["resume, verify, report, eval"] = time.perf_counter() - t
    print("real path at toy scale, seconds:", json.dumps({k: round(v, 1) for k, v in r.seconds.items()}))
    return r


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"{shlex.join(p.args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"


def test_train_from_an_sd_inpainting_folder_on_disfa(real):
    _ok(real.results["train"])
    final = real.run / "final"
    unet = json.loads((final / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["sample_size"] * 8 == SIZE  # SD's inpainting UNet, 8x VAE
    cfg = (final / "train_config.yaml").read_text()
    assert f"base: {real.sd}" in cfg
    rows = [json.loads(line) for line in (real.run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in ("denoise", "text_au", "image_label", "identity"):
        assert np.isfinite(rows[-1][f"loss/{name}"])
    assert "DISFA left camera" in real.results["train"].stderr
    # the DISFA training subjects' identity embeddings beside each saved pipeline; never their photos
    for folder in (final, *(real.run / "checkpoints").glob("step-*/pipeline")):
        with np.load(folder / "training_subjects.npz") as z:
            assert sorted(z.files) == sorted(FIELDS)
    subjects = TrainingSubjects.load(final / "training_subjects.npz", "-")
    on_disk = {p.name for p in (real.disfa / "ActionUnit_Labels").iterdir()}
    assert list(subjects.subject_ids) == sorted(set(disfa_split(0, "train")) & on_disk) and subjects.subject_ids
    assert subjects.info["data"]["kind"] == "disfa" and subjects.info["exemplar_size"] == SIZE


def test_build_with_a_photo_pool_at_the_trained_size(real):
    _ok(real.results["plan"])
    plan = json.loads(real.results["plan"].stdout)
    assert plan["num_shards"] == 3 and plan["generator_actor"]["checkpoint"] == str(real.run / "final")
    _ok(real.results["build"])
    stats = shard_stats(real.out)
    assert len(stats) == 3 and sum(s["funnel"]["accepted"] for s in stats.values()) == 6
    sources: dict[str, int] = {}
    for s in stats.values():
        ident = s["identities"]
        assert ident["source"] == "pool" and ident["unbalanced_axes"] == []
        assert set(ident["mask_sources"]) <= {"user", "detector"}
        for k, n in ident["mask_sources"].items():
            sources[k] = sources.get(k, 0) + n
        assert s["generator"].startswith("maugen@")
    assert "user" in sources, sources  # photos with masks/NAME.png
    skipped = {name for s in stats.values() for name in s["identities"]["skipped_exemplars"]}
    assert skipped <= {"hal.jpg"}, skipped  # no mask, and no face the detector finds at 128 px
    record = json.loads((real.out / "build.json").read_text())
    assert f"identities:{real.pool}" in record["models"] and f"maugen:{real.run / 'final'}" in record["models"]
    names = {n for n, _, _ in POOL_PHOTOS}
    for tar_path in sorted((real.out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    assert meta["identity"]["source"] == "pool" and meta["identity"]["name"] in names
                    assert meta["exemplar"]["mask_source"] in ("user", "detector")
                    if meta["exemplar"]["mask_source"] == "user":
                        assert meta["identity"]["name"] in MASKED_PHOTOS
                elif m.name.endswith(".jpg"):
                    assert Image.open(tar.extractfile(m)).size == (SIZE, SIZE)  # the checkpoint's size


def test_sigkill_mid_build_then_resume_is_byte_identical(real):
    assert 1 <= real.killed_committed < 3
    killed = real.results["killed"]
    assert killed.returncode != 0 and "failed" in killed.stdout.lower(), killed.stdout[-3000:]  # the job died
    _ok(real.results["resume"])
    for suffix in (".tar", ".parquet"):
        names = sorted(p.name for p in (real.out / "shards").glob(f"*{suffix}"))
        assert names == sorted(p.name for p in (real.killed / "shards").glob(f"*{suffix}")) and len(names) == 3
        for n in names:
            assert (real.out / "shards" / n).read_bytes() == (real.killed / "shards" / n).read_bytes(), n
    assert not list(real.killed.rglob(".tmp-*"))
    _ok(real.results["verify_resumed"])


def test_verify_report_and_eval(real):
    _ok(real.results["verify"])
    assert "3/3 shards verified, 6 samples" in real.results["verify"].stdout
    rep = real.results["report"]
    _ok(rep)
    assert real.report_html.stat().st_size > 0 and "<html" in real.report_html.read_text()[:2000].lower()
    assert f"identities: pool {real.pool}; masks:" in rep.stdout
    n = len(TrainingSubjects.load(real.run / "final" / "training_subjects.npz", "-").subject_ids)
    assert f"training similarity (identity leakage; max cosine to the {n} MAUGen training subjects" in rep.stdout
    ev = real.results["eval"]
    _ok(ev)
    e = json.loads(ev.stdout)
    assert e["samples"] == 6
    assert e["identity_similarity"]["exemplar"] == "the exemplar photo of the sample's identity"
    assert np.isfinite(e["identity_similarity"]["mean"])
    assert e["frechet_distance"]["reference"] == "the exemplar photos of the samples' identities"
    assert (real.out / "eval.json").is_file()


def test_a_bad_pool_stops_the_build_with_one_line_naming_the_file(real):
    _, command = split_submit(readme_commands()[2])
    bad = real.tmp / "bad-faces"
    shutil.copytree(real.pool, bad)
    (bad / "notes.txt").write_text("not a photo")
    args = toy(command, real.paths | {"s3://bucket/faces": str(bad), "s3://bucket/mifa": str(real.tmp / "bad-out")})
    p = factory(*args)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "notes.txt" in lines[0] and str(bad) in lines[0], p.stderr
    (bad / "notes.txt").unlink()
    csv = (bad / "attributes.csv").read_text().replace("hal.jpg,3,elderly", "hal.jpg,3,teen")
    (bad / "attributes.csv").write_text(csv)
    p = factory(*args)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "hal.jpg" in lines[0] and "age_group='teen'" in lines[0], p.stderr
    assert not (real.tmp / "bad-out").exists()


def test_realism_trained_on_the_photo_pool_against_the_build(real):
    """`factory detectors train realism --real POOL --fake OUT` (one epoch): a spec the panel runs as its
    realism model, at the build's size, with held-out numbers; each bad input is one line, exit 2."""
    from typer.testing import CliRunner

    from detectors.panel import DetectorPanel
    from factory.cli import app

    runner = CliRunner()
    models = real.tmp / "realism-models"

    def train(*args: str):
        return runner.invoke(app, ["detectors", "train", *args])

    res = train(
        "realism", "--real", str(real.pool), "--fake", str(real.out), "--out", str(models), "--name", "toy-realism",
        "--epochs", "1", "--holdout", "0.5",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    spec = models / "toy-realism" / "spec.yaml"
    panel = DetectorPanel(["builtin:au-cnn"], 1, realism=str(spec))
    assert panel.realism is not None and panel.realism.spec.task == "realism"
    assert panel.realism.spec.input.size == SIZE  # the build's image size
    assert panel.realism.score(np.zeros((2, SIZE, SIZE, 3), np.uint8)).shape == (2,)
    rep = json.loads((models / "toy-realism" / "eval.json").read_text())
    held = rep["heldout"]
    assert held["real_photos"] == 2 and held["fakes"] >= 1  # 8 photos: 4 held out, 2 of them calibrate
    assert 0 <= held["real_accepted"] <= 1 and 0 <= held["fakes_rejected"] <= 1
    assert rep["calibration"] == {"photos": 2, "real_accepted": 0.98, "logit_shift": rep["calibration"]["logit_shift"]}
    assert rep["trained_on"]["real"] == str(real.pool) and rep["trained_on"]["fakes_read"]["accepted"] == 6

    empty, no_samples = real.tmp / "no-photos", real.tmp / "no-samples"
    empty.mkdir()
    no_samples.mkdir()
    shutil.copy(real.out / "build.json", no_samples / "build.json")
    pool, out = str(real.pool), str(real.out)
    bad = [
        (["realism", "--real", str(real.tmp / "nope"), "--fake", out], "does not exist"),
        (["realism", "--real", str(empty), "--fake", out], "holds no exemplars"),
        (["realism", "--real", pool, "--fake", pool], "has no build.json"),
        (["realism", "--real", pool, "--fake", str(no_samples)], "has no sample images"),
        (["realism", "--real", pool], "needs --fake"),
        (["realism", "--fake", out], "needs --real"),
        (["au-cnn", "--real", pool, "--fake", out], "train the realism discriminator"),
        (["realism", "--real", pool, "--fake", out, "--holdout", "0.1"], "too few to hold out"),
    ]
    for args, why in bad:
        res = train(*args, "--out", str(models))
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and why in lines[0] and "Traceback" not in res.output, (args, res.output)
