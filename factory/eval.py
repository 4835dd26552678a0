"""`factory eval OUT`: label fidelity of a built corpus, measured by judges nothing optimised.

For every committed sample it re-reads the image from the tar and runs a panel of judges, then reports
what they measure. The default panel is `independent` (`INDEPENDENT`): an AU evaluator, an identity
evaluator and a Frechet feature network that neither MAUGen's training nor the build's filters use
(detectors/models/README.md says how they were trained and their own accuracy). `--panel build` judges
with the build's own detectors instead, which is an upper bound: the corpus was filtered on them.
Every judge is listed in the report with the roles it also had in this build (`judges`); a judge that
trained the generator or filtered the corpus is flagged (`overlap`). The reported figures are:

- consensus vs prompt targets: how well the images show the AU vector the prompt was built from;
- consensus vs generated labels: how well the generator's own labels describe its images;
  each as F1 per AU (occurrence, intensity >= threshold vs consensus vote), and for intensities
  ICC(3,1) and MAE per AU (docs/facs.md defines them; F1, ICC and MAE are symmetric in the two raters);
- the detectors' agreement rate per AU (how much of the consensus is backed by k of N);
- the realism score distribution;
- identity similarity: cosine between the identity encoder's embedding of each image and of its
  exemplar (the identity rendered with a neutral face), and the share above the encoder's
  verification threshold;
- a Frechet distance between the corpus images and the puppet renders of the same (identity,
  target AU vector) specs, over a named feature network (detectors/features.py).

The report carries each number's definition (`definitions`), since FID-style numbers and F1
conventions differ between papers.

Only committed shards are read, so it works while a build is still running. The corpus holds the
samples that passed the filters, so on the factory's own detectors these numbers are an upper
bound of the generator's raw fidelity; the stats' rejection counts say how much was filtered.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from core.facs import AUS, NUM_AUS

from .config import FactoryConfig
from .garble import BROKEN_RESIDUAL, GarbleMeter, GarbleScores
from .identities import identity_from_json, identity_source
from .manifest import Build, open_build

if TYPE_CHECKING:
    from detectors.features import FeatureNetwork
    from detectors.identity import OnnxIdentityEncoder
    from detectors.panel import DetectorPanel

log = logging.getLogger(__name__)

DEFINITIONS: dict[str, str] = {
    "consensus": "per AU, the majority vote of the AU detectors covering it; agreed when >= min_agree cast that vote",
    "f1": "F1 per AU pooled over all samples, positive = occurrence; reference = detector consensus vote, "
    "prediction = intensity >= occurrence_threshold (prompt targets) or the generator's occurrence label; "
    "f1_mean = mean over the 12 AUs",
    "icc": "ICC(3,1) per AU between consensus intensity (median of intensity-capable detectors; where none, "
    "the vote as 0 / threshold) and the compared intensity: (BMS - EMS) / (BMS + EMS), 2 raters",
    "mae": "mean |consensus intensity - compared intensity| per AU on the 0-5 scale",
    "agreement": "share of samples whose AU reached k-of-N agreement",
    "identity_similarity": "cosine between identity-encoder embeddings of the image and of its exemplar "
    "(the identity rendered with a neutral face); verified = share >= the encoder's verification threshold",
    "realism": "realism discriminator score in [0, 1]; accepted = share >= checks.realism",
    "broken_faces": "share of samples whose largest region residual (brows, eyes, nose, mouth; mean |image - "
    "render| after removing the mean colour shift, 1/255 units; per region the smallest over renders of the "
    "evaluator's reading, the prompt target and the generator's labels) is >= threshold (factory/garble.py); "
    "puppet identities only",
    "frechet_distance": "||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 sqrtm(S_g S_r)) between Gaussian fits of the "
    "feature network's features of the corpus images (g) and of puppet renders of the same specs (r); "
    "comparable only with the same feature network and sample count",
}


@dataclass(frozen=True)
class Panel:
    """Who judges: AU detectors (k of N), identity encoder, Frechet feature network; None = the build's own."""

    au_detectors: tuple[str, ...] | None
    min_agree: int | None
    identity_encoder: str | None
    feature_network: str


#: Judges nothing in MAUGen's training or a build's filters uses (detectors/train.py DEFAULT_MODELS).
INDEPENDENT = Panel(("builtin:eval-au",), 1, "builtin:eval-identity", "eval-au-gap")
#: The build's own filters: what the corpus was selected by, so its figures are an upper bound.
BUILD = Panel(None, None, None, "puppet-realism-gap")
PANELS: dict[str, Panel] = {"independent": INDEPENDENT, "build": BUILD}


def _roles_in_build(cfg: FactoryConfig, recorded: dict[str, str] | None = None) -> dict[str, list[str]]:
    """sha256 of every model that shaped this corpus -> its roles: the build's filters, and the models
    MAUGen's training judged its images with (the checkpoint's train_config.yaml). A filter's hash is
    the one build.json recorded (`recorded`, the files the corpus was filtered with), else its file's now."""
    import yaml

    from detectors.panel import model_hashes
    from detectors.spec import SpecError

    roles: dict[str, list[str]] = {}
    recorded = recorded or {}

    def add(refs: list[str], role: str) -> None:
        for ref in refs:
            key = recorded.get(ref)
            if key is None:
                try:
                    key = next(iter(model_hashes([ref]).values()))
                except (SpecError, OSError, ValueError):
                    key = ref  # not on this machine: compare by name
            roles.setdefault(key, []).append(f"{role} ({ref})")

    if cfg.detect.enabled:
        add(list(cfg.detect.au_detectors), "build filter detect.au_detectors")
        add([cfg.detect.realism] if cfg.detect.realism else [], "build filter detect.realism")
        if cfg.checks.training_similarity is not None:  # the identity-leakage check rejects by it
            add([cfg.detect.identity_encoder], "build filter checks.training_similarity")
    if cfg.generator == "maugen":
        from pipelines.maugen.builtin import resolve_checkpoint

        try:
            train_cfg = yaml.safe_load((resolve_checkpoint(cfg.maugen.checkpoint) / "train_config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            train_cfg = None
        if isinstance(train_cfg, dict):
            losses, model = train_cfg.get("losses") or {}, train_cfg.get("model") or {}
            if losses.get("image_label", True):
                add(list(losses.get("detectors") or []), "MAUGen training losses.detectors")
            if losses.get("identity", True) and model.get("identity_encoder"):
                add([model["identity_encoder"]], "MAUGen training model.identity_encoder")
    return roles


def _judges(
    cfg: FactoryConfig,
    panel: DetectorPanel,
    enc: OnnxIdentityEncoder,
    features: FeatureNetwork,
    recorded: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each judge of this eval with the roles it also had in the build, and one warning per overlap."""
    roles = _roles_in_build(cfg, recorded)
    judges: list[dict[str, Any]] = []
    for role, d in (
        [("au_detector", d.describe()) for d in panel.detectors]
        + ([("realism", panel.realism.describe())] if panel.realism else [])
        + [("identity_encoder", enc.describe()), ("feature_network", features.describe())]
    ):
        also = roles.get(d["sha256"], [])
        judges.append({"role": role, "name": d["name"], "spec": d["spec"], "sha256": d["sha256"], "also": also})
    warnings = [
        f"{j['role']} {j['name']} also served as {', '.join(j['also'])}: its figures are not independent "
        "(the model may have learnt to please it, or the corpus was selected by it)"
        for j in judges
        if j["also"]
    ]
    return judges, warnings


def _read_shard(layout: Any, name: str) -> tuple[list[str], np.ndarray, Any]:
    with layout.fs.open(layout.parquet(name), "rb") as f:
        table = pq.read_table(f, use_threads=False)
    images: dict[str, np.ndarray] = {}
    with layout.fs.open(layout.tar(name), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if ext in ("png", "jpg"):
                images[key] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    keys = table.column("key").to_pylist()
    missing = [k for k in keys if k not in images]
    if missing:
        raise ValueError(f"shard {name}: {len(missing)} parquet rows have no image in the tar; run `factory verify`")
    return keys, np.stack([images[k] for k in keys]), table


@dataclass
class _Collected:
    """Per-shard arrays gathered by `_collect`, kept apart so `evaluate` only reduces them."""

    n: int = 0
    target: list[np.ndarray] = field(default_factory=list)
    gen_int: list[np.ndarray] = field(default_factory=list)
    gen_occ: list[np.ndarray] = field(default_factory=list)
    c_occ: list[np.ndarray] = field(default_factory=list)
    c_int: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)
    real: list[np.ndarray] = field(default_factory=list)
    id_sim: list[np.ndarray] = field(default_factory=list)
    feats_gen: list[np.ndarray] = field(default_factory=list)
    feats_ref: list[np.ndarray] = field(default_factory=list)
    garble: list[np.ndarray] = field(default_factory=list)


def _collect(
    b: Build,
    panel: DetectorPanel,
    enc: OnnxIdentityEncoder,
    refs: _References,
    features: FeatureNetwork,
    max_samples: int | None,
    garble: GarbleMeter | None = None,
) -> _Collected:
    """Read the committed shards in order and run the detectors, encoder and feature network on them.
    When the panel is the garble measure's evaluator alone, its reading is the measure's (run once)."""
    from detectors.identity import cosine

    c = _Collected()
    for name in sorted(b.state.committed):
        if max_samples is not None and c.n >= max_samples:
            break
        keys, images, table = _read_shard(b.layout, name)
        if max_samples is not None:
            keep = max_samples - c.n
            keys, images, table = keys[:keep], images[:keep], table.slice(0, keep)
        c.n += len(keys)
        det = panel.detect(images)
        c.target.append(np.array(table.column("target_intensity").to_pylist(), dtype=np.float32))
        c.gen_int.append(np.array(table.column("intensity").to_pylist(), dtype=np.float32))
        c.gen_occ.append(np.array(table.column("occurrence").to_pylist(), dtype=bool))
        c.c_occ.append(det.consensus.occurrence)
        c.c_int.append(det.consensus.intensity)
        c.agree.append(det.consensus.agree)
        if det.realism is not None:
            c.real.append(det.realism)
        people = [identity_from_json(s) for s in table.column("identity").to_pylist()]
        exemplars, references = refs(people, c.target[-1], images.shape[1])
        c.id_sim.append(cosine(enc.embed(images), enc.embed(exemplars)))
        c.feats_gen.append(features(images))
        c.feats_ref.append(features(references))
        if garble is not None:
            own = [d.sha256 for d in panel.detectors] == [d.sha256 for d in garble.panel.detectors]
            read = det.consensus.intensity if own else None
            c.garble.append(garble(images, people, [c.target[-1], c.gen_int[-1]], read).residual)
    return c


class _References:
    """What eval compares a sample with: its identity's exemplar (identity similarity) and a reference
    image (Frechet distance). Puppet identities: the neutral render and the render of the sample's
    target, the ground truth; pool identities: the exemplar photo for both, real faces."""

    def __init__(self, cfg: FactoryConfig):
        self.cfg = cfg
        self.pool = cfg.identities.source == "pool"
        self._renderers: dict[int, Any] = {}
        self.exemplar = (
            "the exemplar photo of the sample's identity" if self.pool
            else "the sample's identity rendered by the puppet renderer with all AUs at 0"
        )
        self.reference = (
            "the exemplar photos of the samples' identities" if self.pool
            else "puppet renders of each sample's identity and target AU vector"
        )

    def __call__(self, people: list, targets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(exemplars, references) of `people` at `size`."""
        exemplars = self.exemplars(people, size)
        if self.pool:
            return exemplars, exemplars
        return exemplars, self._renderer(size).render_batch(people, targets)

    def exemplars(self, people: list, size: int) -> np.ndarray:
        """Each identity's exemplar at `size`: its pool photo, or its neutral puppet render."""
        if not self.pool:
            return self._renderer(size).render_batch(people, np.zeros((len(people), NUM_AUS)))
        ex = identity_source(self.cfg).exemplars(people, size)
        bad = [e.error for e in ex if e.error is not None]
        if bad:
            raise FileNotFoundError(f"eval: exemplars the build used cannot be read now: {bad[0]}")
        return np.stack([e.image for e in ex])

    def _renderer(self, size: int) -> Any:
        from pipelines.puppet import PuppetRenderer

        renderer = self._renderers.get(size)
        if renderer is None:  # one per size for the whole eval: its caches serve every shard
            renderer = self._renderers[size] = PuppetRenderer(size=size, supersample=self.cfg.puppet.supersample)
        return renderer


def evaluate(
    out: str,
    panel_name: str = "independent",
    au_detectors: list[str] | None = None,
    min_agree: int | None = None,
    realism: str | None = None,
    identity_encoder: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    feature_network: str | None = None,
) -> dict[str, Any]:
    """Measure the corpus in OUT with the named panel (arguments given replace its members); see the
    module docstring for what each number means."""
    from detectors.builtin import resolve
    from detectors.features import FeatureNetwork
    from detectors.identity import OnnxIdentityEncoder
    from detectors.metrics import au_report
    from detectors.panel import DetectorPanel

    if panel_name not in PANELS:
        raise ValueError(f"unknown eval panel {panel_name!r}; available: {', '.join(PANELS)}")
    chosen = PANELS[panel_name]
    b = open_build(out)
    cfg = b.cfg
    thr = cfg.labels.occurrence_threshold
    det_refs = au_detectors or list(chosen.au_detectors or cfg.detect.au_detectors)
    k = min_agree or min(chosen.min_agree or cfg.detect.min_agree, len(det_refs))
    # no realism judge exists that the build did not filter with: the build's is used and flagged
    real_ref = realism if realism is not None else cfg.detect.realism
    panel = DetectorPanel(det_refs, k, realism=real_ref, occurrence_threshold=thr, batch_size=batch_size)
    enc_ref = identity_encoder or chosen.identity_encoder or cfg.detect.identity_encoder
    enc = OnnxIdentityEncoder(str(resolve(enc_ref)), batch_size=batch_size)
    features = FeatureNetwork(feature_network or chosen.feature_network, batch_size=batch_size)
    refs = _References(cfg)
    judges, overlap = _judges(cfg, panel, enc, features, b.record.get("models"))
    for w in overlap:
        log.warning("eval: %s", w)

    # visibly broken faces: puppet identities only (the measure re-renders them; factory/garble.py)
    meter = None if refs.pool else GarbleMeter(batch_size=batch_size)
    c = _collect(b, panel, enc, refs, features, max_samples, meter)
    n = c.n
    if n == 0:
        raise FileNotFoundError(f"{out} has no committed shards yet: nothing to evaluate")

    tgt, gi, go = np.concatenate(c.target), np.concatenate(c.gen_int), np.concatenate(c.gen_occ)
    co, ci, ag = np.concatenate(c.c_occ), np.concatenate(c.c_int), np.concatenate(c.agree)
    sim = np.concatenate(c.id_sim)
    # F1/ICC/MAE with the consensus as reference rater (as occurrence 0/5 scale it uses `thr`).
    consensus_int = np.where(np.isnan(ci), np.where(co, float(thr), 0.0), ci)
    prompt_rep = au_report(consensus_int, (tgt >= thr).astype(np.float32), tgt, thr, reference_occurrence=co)
    gen_rep = au_report(consensus_int, go.astype(np.float32), gi, thr, reference_occurrence=co)
    fg, fr = np.concatenate(c.feats_gen), np.concatenate(c.feats_ref)
    rep: dict[str, Any] = {
        "out": out,
        "build_id": b.record["build_id"],
        "samples": int(n),
        "panel": panel_name,
        "judges": judges,
        "overlap": overlap,
        "detectors": panel.describe(),
        "occurrence_threshold": thr,
        "consensus_vs_prompt_targets": prompt_rep,
        "consensus_vs_generated_labels": gen_rep,
        "consensus_agreement": {
            "per_au": {f"AU{a}": round(float(ag[:, i].mean()), 4) for i, a in enumerate(AUS)},
            "mean": round(float(ag.mean()), 4),
        },
        "identity_similarity": _identity_section(enc, sim, refs.exemplar),
        "frechet_distance": _frechet_section(features.name, fg, fr, refs.reference),
        "definitions": DEFINITIONS,
    }
    if c.real:
        rep["realism"] = _realism_section(np.concatenate(c.real), cfg.checks.realism)
    if c.garble:
        res = np.concatenate(c.garble)
        rep["broken_faces"] = {"judge": "builtin:eval-au + the puppet renderer"} | GarbleScores(
            res, res.max(axis=1) >= BROKEN_RESIDUAL
        ).summary()
    rep["build_filters"] = _build_filters(b.state.committed)
    return rep


def _identity_section(enc: OnnxIdentityEncoder, sim: np.ndarray, exemplar: str) -> dict[str, Any]:
    """The identity-similarity block of the report, from per-sample cosines to the exemplars."""
    return {
        "encoder": enc.describe(),
        "exemplar": exemplar,
        "mean": round(float(sim.mean()), 4),
        "quantiles": _quantiles(sim),
        "threshold": enc.verify_threshold,
        "verified": None if enc.verify_threshold is None else round(float((sim >= enc.verify_threshold).mean()), 4),
    }


def _frechet_section(feature_network: str, fg: np.ndarray, fr: np.ndarray, reference: str) -> dict[str, Any]:
    """The Frechet-distance block of the report; None where fewer than 2 samples make it undefined."""
    from detectors.metrics import frechet_distance

    return {
        "feature_network": feature_network,
        "reference": reference,
        "samples": len(fg),
        # identical sets give 0 up to sqrtm rounding, which can leave -1e-12
        "value": round(max(frechet_distance(fg, fr), 0.0), 6) if len(fg) >= 2 else None,
    }


def _realism_section(r: np.ndarray, threshold: float) -> dict[str, Any]:
    """The realism block of the report, only present when the panel has a realism discriminator."""
    hist, edges = np.histogram(r, bins=10, range=(0.0, 1.0))
    return {
        "mean": round(float(r.mean()), 4),
        "quantiles": _quantiles(r),
        "threshold": threshold,
        "accepted": round(float((r >= threshold).mean()), 4),
        "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": hist.tolist()},
    }


def _build_filters(committed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tally the build's own candidates and rejections, to show how much filtering shaped the corpus."""
    rejected: dict[str, int] = {}
    candidates = 0
    for stats in committed.values():
        candidates += int(stats.get("candidates", 0))
        for reason, c in stats.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + int(c)
    return {"candidates": candidates, "rejected": rejected}


def _quantiles(x: np.ndarray) -> dict[str, float]:
    qs = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {k: round(float(v), 4) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), qs)}


def print_eval(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{rep['out']}[/bold]: {rep['samples']} samples of build {rep['build_id']}")
    con.print(f"judged by the {rep['panel']} panel:")
    for j in rep["judges"]:
        flag = f"  [yellow]also {'; '.join(j['also'])}[/yellow]" if j["also"] else "  (no training or filter role)"
        con.print(f"  {j['role']}: {j['name']} [dim]{j['sha256'][:12]}[/dim]{flag}", soft_wrap=True)
    for w in rep["overlap"]:
        con.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    t = Table(title="label fidelity against detector consensus (per AU)")
    for col in ("AU", "agree", "F1 prompt", "F1 labels", "ICC labels", "MAE labels"):
        t.add_column(col, justify="right")
    p, g, a = rep["consensus_vs_prompt_targets"], rep["consensus_vs_generated_labels"], rep["consensus_agreement"]
    for au in (f"AU{x}" for x in AUS):
        t.add_row(
            au,
            f"{a['per_au'][au]:.3f}",
            f"{p['f1'][au]:.3f}",
            f"{g['f1'][au]:.3f}",
            _fmt(g.get("icc", {}).get(au)),
            _fmt(g.get("mae", {}).get(au)),
        )
    t.add_row(
        "mean",
        f"{a['mean']:.3f}",
        f"{p['f1_mean']:.3f}",
        f"{g['f1_mean']:.3f}",
        _fmt(g.get("icc_mean")),
        _fmt(g.get("mae_mean")),
        style="bold",
    )
    con.print(t)
    ids = rep["identity_similarity"]
    con.print(f"identity similarity to exemplars: mean {ids['mean']:.3f}, verified {ids['verified']}")
    if "realism" in rep:
        r = rep["realism"]
        con.print(f"realism: mean {r['mean']:.3f}, accepted {r['accepted']:.3f} at threshold {r['threshold']}")
    if "broken_faces" in rep:
        g = rep["broken_faces"]
        con.print(f"visibly broken faces: {g['broken']:.3f} (worst region residual >= {g['threshold']:g}; "
                  f"by region {g['by_region']})", soft_wrap=True)
    fd = rep["frechet_distance"]
    con.print(
        f"Frechet distance to puppet renders ({fd['feature_network']}, {fd['samples']} samples): {_fmt(fd['value'])}"
    )
    for key, text in rep["definitions"].items():
        con.print(f"[dim]{key}: {text}[/dim]")


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"
