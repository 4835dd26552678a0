"""The `factory` command: build, resume, verify, report.

Heavy imports (ray, torch) happen inside the commands that need them, so `--help`, `--dry-run`
and `report` stay fast and small.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Optional

import typer

from .config import ConfigError, FactoryConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MIFA synthetic-dataset factory.")
log = logging.getLogger("factory")

DEFAULT_OUT = "mifa-out"


def _setup_logging(verbose: bool) -> None:
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
    if summary.failed:
        for name, err in summary.failed.items():
            typer.echo(f"FAILED {name}: {err}", err=True)
        typer.echo(f"{len(summary.failed)} shards failed; `factory resume {summary.out}` retries them", err=True)
        raise typer.Exit(1)
    if not summary.ok:
        raise typer.Exit(1)


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
        from .plan import Plan

        typer.echo(json.dumps(Plan(cfg).summary(), indent=1))
        return
    _run(cfg, out, new_build)


@app.command()
def resume(
    out: Annotated[str, typer.Argument(help="output of an earlier build")],
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Resume a build from OUT/build.json alone (only `runtime.*` may be overridden)."""
    _setup_logging(verbose)
    from .config import apply_override, config_from_dict
    from .layout import Layout

    layout = Layout(out)
    if not layout.fs.exists(layout.build_json):
        _fail(f"{out} has no build.json: nothing to resume (start one with `factory build --out {out}`)")
    tree = layout.read_json(layout.build_json)["config"]
    try:
        for assignment in set_ or []:
            if not assignment.startswith("runtime."):
                raise ConfigError(
                    f"config error: {assignment.split('=')[0]}: resume may only change runtime.* keys; "
                    "use `factory build --new-build` to change the corpus"
                )
            apply_override(tree, assignment)
        cfg = config_from_dict(tree)
    except ConfigError as err:
        _fail(str(err))
    _run(cfg, out, False)


def _run(cfg: FactoryConfig, out: str, new_build: bool) -> None:
    from .graph import run_build

    try:
        summary = run_build(cfg, out, new_build=new_build)
    except ConfigError as err:
        _fail(str(err))
    _finish(summary)


@app.command()
def verify(out: Annotated[str, typer.Argument(help="output to check")]) -> None:
    """Check checksums, counts, key uniqueness and parquet/tar agreement; non-zero exit on a bad shard."""
    _setup_logging(False)
    from .verify import verify as run_verify

    try:
        report = run_verify(out)
    except FileNotFoundError as err:
        _fail(str(err))
    for name, problems in sorted(report.problems.items()):
        for p in problems:
            typer.echo(f"BAD {name}: {p}")
    typer.echo(f"{report.ok}/{report.shards} shards verified, {report.samples} samples")
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="output to report on")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Shards done/failed/pending, rejections, per-AU labels and balance against the plan, throughput."""
    from .report import build_report, print_report

    try:
        rep = build_report(out)
    except FileNotFoundError as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(rep, indent=1, default=float))
    else:
        print_report(rep)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
