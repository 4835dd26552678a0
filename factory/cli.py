"""The `factory` command: build, resume, verify, report, eval, train, subjects, data extract-disfa, detectors train.

Exit codes of build and resume: 0 done, 1 shards failed (a resume retries them), 2 bad input, 3
OUT's storage refuses writes, 4 too many prompts fell back to the grammar (factory/stops.py).

Heavy imports (ray, torch) happen inside the commands that need them, so `--help`, `--dry-run`
and `report` stay fast and small.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Optional

import typer

from .config import ConfigError, DetectConfig, FactoryConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MIFA synthetic-dataset factory.")
log = logging.getLogger("factory")

DEFAULT_OUT = "mifa-out"


def _setup_logging(verbose: bool) -> None:
    if verbose:
        os.environ["MIFA_VERBOSE"] = "1"  # actors keep their libraries' output (factory/actors.py)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(msg, err=True)
    raise typer.Exit(code)


def _finish(summary) -> None:  # noqa: ANN001 - BuildSummary, imported lazily
    rej = ", ".join(f"{k}={v}" for k, v in summary.rejected.items() if v) or "none"
    typer.echo(
        f"{summary.out}: {summary.committed}/{summary.num_shards} shards, {summary.accepted}/{summary.target} "
        f"samples ({summary.skipped} shards were already done) in {summary.seconds:.1f} s; rejected: {rej}",
        err=True,
    )
    if summary.llm is not None:  # a user who asked for LLM prompts learns how many the grammar wrote
        typer.echo(f"prompts from {summary.llm}: {summary.prompts.describe()}", err=True)
    actors = [*summary.generators, *summary.detectors]
    if actors:
        typer.echo(f"shards ran {summary.shards_seconds:.1f} s; actor busy fraction over that window:", err=True)
    for a in actors:
        typer.echo(f"  {a.describe()}", err=True)
    if summary.failed:
        for name, err in summary.failed.items():
            typer.echo(f"FAILED {name}: {err}", err=True)
        typer.echo(f"{len(summary.failed)} shards failed; `factory resume {summary.out}` retries them", err=True)
        raise typer.Exit(1)
    if not summary.ok:
        raise typer.Exit(1)
    _how_to_read(summary)


def _how_to_read(summary) -> None:  # noqa: ANN001 - BuildSummary, imported lazily
    """Where the corpus is and the next commands a user runs on it."""
    out, last, prefix = summary.out.rstrip("/"), summary.num_shards - 1, summary.shard_prefix
    shards = f"{out}/shards/{prefix}-{{000000..{last:06d}}}.tar" if last else f"{out}/shards/{prefix}-000000.tar"
    if out.startswith("s3://"):
        shards = f"pipe:aws s3 cp {shards} -"
    typer.echo(
        f"corpus: {summary.accepted} samples in {summary.num_shards} shards under {out}/shards (KEY.png|jpg, KEY.json, "
        f"KEY.au.npy; one parquet row per sample beside each tar)\n"
        f"read it:  python -c \"import webdataset as wds; s = next(iter(wds.WebDataset('{shards}', shardshuffle=False).decode('rgb8'))); "
        f"print(s['__key__'], s['json']['prompt'])\"\n"
        f"inspect:  factory report {out} --html report.html\n"
        f"check:    factory verify {out}",
        err=True,
    )


DEFAULT_IDENTITY_ENCODER = DetectConfig().identity_encoder
IdentityEncoderOpt = Annotated[
    str,
    typer.Option(
        help="ONNX identity encoder (builtin:NAME or a spec YAML) that embeds the training subjects for a build's "
        "leakage check; a build measures only with the same model as its detect.identity_encoder"
    ),
]

SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a config key: --set build.shard_size=500")
]


@app.command()
def build(
    target: Annotated[Optional[int], typer.Option(help="accepted samples in the corpus (build.target)")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="samples per shard (build.shard_size)")] = None,
    out: Annotated[str, typer.Option(help="output directory or URL (s3://...)")] = DEFAULT_OUT,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="print the plan and exit; starts no Ray")] = False,
    new_build: Annotated[bool, typer.Option(help="delete a different build found in OUT and start over")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Build a corpus into OUT, or resume the build already there."""
    _setup_logging(verbose)
    overrides = list(set_ or [])
    if target is not None:
        overrides.append(f"build.target={target}")
    if shard_size is not None:
        overrides.append(f"build.shard_size={shard_size}")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        _fail(str(err))
    if dry_run:
        try:
            plan = _dry_run(cfg)
        except ConfigError as err:  # a leakage check that cannot be applied
            _fail(str(err))
        typer.echo(json.dumps(plan, indent=1))
        return
    _run(cfg, out, new_build)


def _dry_run(cfg: FactoryConfig) -> dict:
    """The plan, and for MAUGen the memory of one generator actor (weights at maugen.dtype): no Ray, no weights read."""
    from .plan import Plan

    out = Plan(cfg).summary()
    if cfg.generator == "maugen":
        from pipelines.maugen.memory import generator_memory

        try:
            out["generator_actor"] = generator_memory(
                cfg.maugen.checkpoint, cfg.maugen.dtype, cfg.maugen.batch_size, cfg.maugen.guidance_scale > 1.0
            )
        except FileNotFoundError as err:  # the checkpoint may live only on the cluster's nodes
            out["generator_actor"] = {"checkpoint": cfg.maugen.checkpoint, "unavailable": str(err)}
    from .leakage import plan_leakage

    try:
        out["training_similarity"] = plan_leakage(cfg).record()
    except FileNotFoundError as err:  # as above: the checkpoint (or meta:...) has no files here
        out["training_similarity"] = {"measured": False, "why": f"unknown here: {err}"}
    return out


@app.command()
def resume(
    out: Annotated[str, typer.Argument(help="output of an earlier build")],
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Resume a build from OUT/build.json alone (only the keys in config.RESUMABLE, `runtime.*`,
    build.max_oversample and build.shard_retries, may be overridden: they never change a committed shard)."""
    _setup_logging(verbose)
    from .config import RESUMABLE, apply_override, config_from_dict, resumable
    from .layout import Layout
    from .record import BuildRecordError, read_record

    layout = Layout(out)
    if not layout.fs.exists(layout.build_json):
        _fail(f"{out} has no build.json: nothing to resume (start one with `factory build --out {out}`)")
    try:
        tree = read_record(layout)[0]["config"]
    except BuildRecordError as err:
        _fail(str(err))
    try:
        for assignment in set_ or []:
            key = assignment.split("=")[0].strip()
            if not resumable(key):
                raise ConfigError(
                    f"config error: {key}: resume may only change {', '.join(RESUMABLE)} (runtime: any of its keys); "
                    "use `factory build --new-build` to change the corpus"
                )
            apply_override(tree, assignment)
        cfg = config_from_dict(tree)
    except ConfigError as err:
        _fail(str(err))
    _run(cfg, out, False)


def _run(cfg: FactoryConfig, out: str, new_build: bool) -> None:
    from detectors.spec import SpecError

    from .graph import run_build
    from .stops import BuildStopped

    try:
        summary = run_build(cfg, out, new_build=new_build)
    except (ConfigError, SpecError, FileNotFoundError, ConnectionError) as err:
        _fail(str(err))
    except BuildStopped as stop:  # committed shards are kept; the line says how to go on
        _fail(str(stop), stop.code)
    _finish(summary)


@app.command()
def verify(out: Annotated[str, typer.Argument(help="output to check")]) -> None:
    """Check checksums, counts, key uniqueness and parquet/tar agreement; non-zero exit on a bad shard."""
    _setup_logging(False)
    from .record import BuildRecordError
    from .verify import verify as run_verify

    try:
        report = run_verify(out)
    except (FileNotFoundError, BuildRecordError) as err:
        _fail(str(err))
    for name, problems in sorted(report.problems.items()):
        for p in problems:
            typer.echo(f"BAD {name}: {p}")
    typer.echo(f"{report.ok}/{report.shards} shards verified, {report.samples} samples")
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="output to report on (local or s3://...)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output, figure data included")] = False,
    html: Annotated[
        Optional[str], typer.Option("--html", help="also write a self-contained HTML report to this path")
    ] = None,
    samples: Annotated[int, typer.Option(help="accepted samples in the sample grid (read from a few tars)")] = 24,
    rejected: Annotated[int, typer.Option(help="rejected samples shown per reason")] = 4,
    threads: Annotated[int, typer.Option(help="parquet files read at once")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Funnel, rejections, per-AU labels, co-occurrence and balance against the plan, throughput, samples."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .record import BuildRecordError
    from .report import ReportError, build_report, print_report, report_json

    try:
        rep = build_report(
            out, accepted=samples, rejected_per_reason=rejected, images=html is not None, threads=threads
        )
    except (FileNotFoundError, BuildRecordError, ReportError) as err:
        _fail(str(err))
    if html:
        from .report_html import write_html

        try:
            size = write_html(rep, html)
        except OSError as err:
            _fail(f"cannot write {html}: {err}")
        typer.echo(f"wrote {html} ({size / 1e3:.0f} kB)", err=True)
    if as_json:
        typer.echo(report_json(rep))
    else:
        print_report(rep)


@app.command("eval")
def eval_(
    out: Annotated[str, typer.Argument(help="output of a build (committed shards are read)")],
    panel: Annotated[
        str,
        typer.Option(
            help="independent: judges nothing in training or filtering used (builtin:eval-au, "
            "builtin:eval-identity, eval-au-gap); build: the build's own filters (an upper bound)"
        ),
    ] = "independent",
    detector: Annotated[
        Optional[list[str]], typer.Option(help="AU detector spec or builtin:NAME (repeat); default: the panel's")
    ] = None,
    min_agree: Annotated[Optional[int], typer.Option(help="k of the k-of-N consensus; default: the panel's")] = None,
    max_samples: Annotated[Optional[int], typer.Option(help="evaluate only the first N samples")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    save: Annotated[bool, typer.Option(help="also write OUT/eval.json")] = True,
) -> None:
    """Label fidelity, realism, identity similarity and Frechet distance, by judges that are listed with
    any role they also had in the build (training or filtering)."""
    _setup_logging(False)
    from detectors.spec import SpecError

    from .eval import evaluate, print_eval
    from .layout import Layout

    try:
        rep = evaluate(out, panel, au_detectors=detector, min_agree=min_agree, max_samples=max_samples)
    except (FileNotFoundError, SpecError, ValueError) as err:
        _fail(str(err))
    if save:
        layout = Layout(out)
        layout.write_json_atomic(layout.path("eval.json"), rep)
    if as_json:
        typer.echo(json.dumps(rep, indent=1, default=float))
    else:
        print_eval(rep)


@app.command()
def train(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="training config YAML (see configs/)")] = None,
    overrides: SetOpt = None,
    out: Annotated[Optional[str], typer.Option(help="run folder (overrides the config's `out`)")] = None,
    ablation: Annotated[
        Optional[str], typer.Option(help="a Table 3 row: no-cld, no-idm, no-mutual-conditioning, ... (out gets -NAME)")
    ] = None,
    identity_encoder: IdentityEncoderOpt = DEFAULT_IDENTITY_ENCODER,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train MAUGen: every loss term and adaptive weight logged, checkpoints, resume from OUT. Beside every
    pipeline it saves: training_subjects.npz, the training subjects' identity embeddings (no photos)."""
    _setup_logging(verbose)
    from detectors.spec import SpecError
    from pipelines.maugen.train import Trainer, load_train_config

    from .leakage import check_encoder, data_description, subjects_writer

    sets = list(overrides or []) + ([f"out={out}"] if out else [])
    try:
        cfg = load_train_config(config, sets, ablation=ablation)
        check_encoder(identity_encoder)
    except (ValueError, FileNotFoundError, SpecError) as err:
        _fail(f"train: {err}")
    try:
        trainer = Trainer(cfg)
        if trainer.accelerator.is_main_process:  # the process that saves
            trainer.on_save = subjects_writer(
                trainer.dataset.subject_exemplars(), identity_encoder, data_description(cfg)
            )
        final = trainer.fit()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # corrupt checkpoint, bad data root, NaN loss
        _fail(f"train: {err}")
    typer.echo(f"trained MAUGen saved to {final}", err=True)


@app.command()
def subjects(
    checkpoint: Annotated[
        str, typer.Argument(help="a saved MAUGen pipeline (RUN/final, RUN/checkpoints/step-N/pipeline) or builtin:NAME")
    ],
    config: Annotated[
        Optional[str],
        typer.Option("--config", "-c", help="the training config that made it (default: its train_config.yaml)"),
    ] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="override a key of that training config: --set data.root=/data/DISFA"),
    ] = None,
    identity_encoder: IdentityEncoderOpt = DEFAULT_IDENTITY_ENCODER,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """(Re)compute CHECKPOINT/training_subjects.npz: each training subject's exemplar, listed by the training
    config, embedded with the identity encoder (embeddings only, never the photos)."""
    _setup_logging(verbose)
    from detectors.spec import SpecError
    from pipelines.maugen.builtin import resolve_checkpoint
    from pipelines.maugen.train import load_train_config

    from .leakage import check_encoder, recompute, train_config_of

    try:
        check_encoder(identity_encoder)
        train_cfg = load_train_config(config or train_config_of(resolve_checkpoint(checkpoint)), list(overrides or []))
        path, subj = recompute(checkpoint, train_cfg, identity_encoder, threads)
    except (ValueError, FileNotFoundError, SpecError) as err:  # no pipeline or config, data moved, bad encoder
        _fail(f"subjects: {err}")
    typer.echo(
        f"wrote {path}: {len(subj.subject_ids)} training subjects ({train_cfg.data.kind}) embedded with "
        f"{identity_encoder} ({subj.info['encoder_name']}, model sha256 {subj.encoder_sha256[:12]})",
        err=True,
    )


data_app = typer.Typer(no_args_is_help=True, help="Real AU datasets for MAUGen training: preparation.")
app.add_typer(data_app, name="data")


@data_app.command("extract-disfa")
def data_extract_disfa(
    root: Annotated[str, typer.Argument(help="DISFA root (ActionUnit_Labels/, Videos_LeftCamera/ ...)")],
    camera: Annotated[str, typer.Option(help="left or right")] = "left",
    every: Annotated[int, typer.Option(help="keep every n-th frame (frame numbers are kept)")] = 1,
    size: Annotated[
        Optional[int], typer.Option(help="centre-crop to a square and resize (default: full frames)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="re-extract subjects that already have frames")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Decode DISFA's videos with ffmpeg into ROOT/Frames_<Camera>Camera/SNxxx/NNNNNN.jpg."""
    _setup_logging(verbose)
    from pipelines.maugen.data import extract_frames

    try:
        counts = extract_frames(root, camera=camera, every=every, size=size, overwrite=overwrite)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(f"data extract-disfa: {err}")
    typer.echo(json.dumps(counts, indent=1))


detectors_app = typer.Typer(no_args_is_help=True, help="The tiny puppet-domain detectors: train, evaluate.")
app.add_typer(detectors_app, name="detectors")


@detectors_app.command("train")
def detectors_train(
    name: Annotated[
        str,
        typer.Argument(help="au-cnn, au-resnet, au-vit, realism, realism-gen, identity, eval-au, eval-identity, or all"),
    ],
    out: Annotated[str, typer.Option(help="folder that receives NAME/ (model.onnx, spec.yaml, torch/, eval.json)")] = (
        "detectors/models"
    ),
    epochs: Annotated[Optional[int], typer.Option(help="passes over the training renders")] = None,
    train_samples: Annotated[Optional[int], typer.Option(help="training renders")] = None,
    train_people: Annotated[Optional[int], typer.Option(help="training identities")] = None,
    heldout_samples: Annotated[Optional[int], typer.Option(help="held-out renders (unseen identities)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default: the model's recipe (0; 11 for the eval panel)")] = None,
    generator: Annotated[
        Optional[str],
        typer.Option(help="realism-gen: the MAUGen checkpoint whose raw outputs it learns to reject (builtin:NAME or a folder)"),
    ] = None,
    generated_samples: Annotated[Optional[int], typer.Option(help="realism-gen: raw outputs to sample for training")] = None,
    threads: Annotated[int, typer.Option(help="torch threads while sampling the generator (0: torch's default)")] = 0,
    generated_cache: Annotated[
        str, typer.Option(help="realism-gen: where sampled batches are kept, so an interrupted run resumes its sampling")
    ] = "runs/generated-cache",
    real: Annotated[
        Optional[str],
        typer.Option(
            help="realism on the real domain: an identity pool of real face photos (folder, parquet or webdataset "
            "shards, local or s3://), the positives; needs --fake"
        ),
    ] = None,
    fake: Annotated[
        Optional[str],
        typer.Option(
            help="realism on the real domain: a factory build output (local or s3://) whose images (committed shards "
            "and rejected/ tars) are the negatives, at its image size; a build with --set detect.realism=null gives "
            "the generator's raw outputs. Needs --real"
        ),
    ] = None,
    model_name: Annotated[
        str, typer.Option("--name", help="with --real: the folder under --out and the spec's name")
    ] = "realism-real",
    holdout: Annotated[
        float,
        typer.Option(
            help="with --real: share of the photos and of the build's images held out (half of the held-out photos "
            "set the threshold, the rest and the held-out images are the eval)"
        ),
    ] = 0.2,
    real_accepted: Annotated[
        float, typer.Option(help="with --real: share of held-out real photos that score >= 0.5 (the threshold)")
    ] = 0.98,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train on puppet renders (or, realism with --real/--fake, real photos against a build's outputs),
    export to ONNX, write the spec and held-out eval.json."""
    _setup_logging(verbose)
    from pydantic import ValidationError

    from detectors.train import DEFAULT_MODELS, recipe_for, train_one

    names = list(DEFAULT_MODELS) if name == "all" else [name]
    if any(n not in DEFAULT_MODELS for n in names):
        _fail(f"unknown model {name!r}; allowed: {', '.join(DEFAULT_MODELS)}, all")
    if real is not None or fake is not None:
        _detectors_train_real(
            name, real, fake, out, model_name, holdout, real_accepted,
            {"epochs": epochs, "train_samples": train_samples, "seed": seed, "generator": generator},
        )  # fmt: skip
        return
    given = {
        "epochs": epochs,
        "train_samples": train_samples,
        "train_people": train_people,
        "heldout_samples": heldout_samples,
        "seed": seed,
        "generator": generator,
        "generated_samples": generated_samples,
    }
    for n in names:
        try:
            recipe = recipe_for(n, {k: v for k, v in given.items() if v is not None})
        except ValidationError as err:
            _fail(f"detectors train: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}")
        generated = None
        if recipe.generator:
            if DEFAULT_MODELS[n][0] != "realism":
                _fail(f"detectors train: --generator is for the realism models; {n} does not use one")
            from factory.generated import generated_faces

            try:
                cache = f"{generated_cache}/{n}"  # kept per batch: an interrupted run resumes its sampling
                generated = (
                    generated_faces(
                        recipe.generator, recipe.generated_samples, recipe.train_people, "train", recipe.seed, threads,
                        cache=cache,
                    ),
                    generated_faces(
                        recipe.generator, max(1, recipe.generated_samples // 4), recipe.heldout_people, "heldout", recipe.seed,
                        threads, cache=cache,
                    ),
                )  # fmt: skip
            except (ValueError, FileNotFoundError) as e:
                _fail(f"detectors train {n}: --generator {recipe.generator}: {e}")
        elif given["generator"] is not None or given["generated_samples"] is not None:
            _fail(f"detectors train: --generator/--generated-samples are for realism-gen, not {n}")
        rep = train_one(n, out, recipe, generated)
        typer.echo(json.dumps({"model": n, "heldout": rep["heldout"]}, indent=1, default=float))


def _detectors_train_real(
    name: str,
    real: str | None,
    fake: str | None,
    out: str,
    model_name: str,
    holdout: float,
    real_accepted: float,
    given: dict[str, object],
) -> None:
    """`factory detectors train realism --real DIR --fake OUT`: realism's recipe on the real domain
    (factory/realism_sets.py reads and splits both sides), at the build's image size, into OUT/NAME."""
    from pydantic import ValidationError

    from detectors.train import recipe_for, train_realism

    from .realism_sets import RealismDataError, real_domain

    if name != "realism":
        _fail(
            f"detectors train {name}: --real/--fake train the realism discriminator; run `factory detectors train "
            "realism --real DIR --fake OUT`"
        )
    if real is None or fake is None:
        missing, have = ("--fake", f"--real {real}") if fake is None else ("--real", f"--fake {fake}")
        _fail(
            f"detectors train realism: {have} needs {missing} too (--real: a folder/parquet/webdataset of real face "
            "photos; --fake: a factory build output)"
        )
    if given.get("generator") is not None:
        _fail(
            "detectors train realism: --generator is for puppet renders (realism-gen); with --real the negatives are "
            "--fake's images"
        )
    if not 0.0 < holdout < 1.0:
        _fail(f"detectors train realism: --holdout {holdout:g} must be between 0 and 1 (a share of the photos)")
    overrides = {k: v for k, v in given.items() if v is not None and k != "generator"}
    overrides["real_accepted"] = real_accepted
    try:
        recipe = recipe_for("realism", overrides)
    except ValidationError as err:
        _fail(f"detectors train: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}")
    try:
        domain, size = real_domain(real, fake, holdout, recipe.train_samples, recipe.seed)
    except RealismDataError as err:
        _fail(f"detectors train realism: {err}")
    recipe = recipe.model_validate(recipe.model_dump() | {"image_size": size})
    rep = train_realism(f"{out.rstrip('/')}/{model_name}", recipe, name=model_name, real=domain)
    typer.echo(json.dumps({"model": model_name, "heldout": rep["heldout"]}, indent=1, default=float))


#: Commands that read parquet through Arrow and start nothing that needs a clean shutdown (no Ray).
_ARROW_READERS = frozenset({"verify", "report", "eval"})


def main() -> None:
    """The `factory` entry point. After a command that read parquet files, the process leaves without
    interpreter teardown (its output flushed first): Arrow's thread pools can abort the process while
    they are destroyed at exit ("terminate called without an active exception", apache/arrow#34314),
    turning a finished `factory verify` into exit code -6."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in _ARROW_READERS:
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:  # typer ends every command with one
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            typer.echo(str(e.code), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
