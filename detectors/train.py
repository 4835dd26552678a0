"""Training of the tiny puppet-domain models, their ONNX export and their held-out evaluation.

`factory detectors train all --out detectors/models` rebuilds every committed model:

    au-cnn, au-resnet, au-vit   AU detectors (occurrence logits + intensity), three architectures
    realism                      realism discriminator (renders vs degraded / off-domain / broken)
    realism-gen                  the paper's realism discriminator: renders vs a MAUGen's raw outputs and
                                 corruptions shaped like its failures, calibrated on clean renders
    identity                     identity encoder (ArcFace margin loss over training identities)
    eval-au, eval-identity       the evaluation panel: a GroupNorm-CNN AU evaluator and a ResNet identity
                                 evaluator, trained on the `evaluator` split's own identities and seed;
                                 nothing in MAUGen's training or a build's filters uses them

`factory detectors train realism --real DIR --fake OUT` trains `realism`'s recipe on the real domain
instead (`RealDomain`: a pool's photos against a build's images, read by factory/realism_sets.py).

Each lands in its own folder: `model.onnx` (what the factory runs), `spec.yaml` (how to run it,
with the file's sha256), `torch/` (diffusers-style weights for parity tests, benchmarks and the
identity loss) and `eval.json` (held-out numbers on identities the model never saw).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD
from core.identity_net import IdentityNet

from . import data
from .models import AU_ARCHS, ArcFaceHead, AUDetectorNet, IdentityResNet, RealismNet
from .spec import file_sha256

log = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
Kind = Literal["au", "realism", "identity"]


class TrainRecipe(BaseModel):
    """How one tiny model is trained; defaults are the recipe of the committed models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_samples: int = Field(24000, gt=0)
    train_people: int = Field(400, gt=1)
    heldout_samples: int = Field(3000, gt=0)
    heldout_people: int = Field(100, gt=1)
    epochs: int = Field(8, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, gt=3)
    upsample: int = Field(1, ge=1, le=4, description="AU detectors: input upsampling inside the model")
    noise: float = Field(0.02, ge=0.0, description="std of the additive noise augmentation (normalised units)")
    image_size: int = 64
    seed: int = 0
    split: Literal["train", "evaluator"] = Field(
        "train", description="identity stream of the training renders; `evaluator` is the panel's own"
    )
    workers: int = Field(2, ge=1, description="processes that render the puppet data")
    # realism only
    failures: bool = Field(
        False, description="realism: half the negatives broken the way a generator fails (detectors/data.py)"
    )
    generator: str | None = Field(
        None,
        description="realism: a MAUGen checkpoint whose raw outputs are negatives too (the paper's real against "
        "generated); `factory detectors train` samples them as a build does",
    )
    generated_samples: int = Field(2000, ge=0, description="realism: raw generator outputs to train on")
    real_accepted: float | None = Field(
        None,
        gt=0.5,
        lt=1.0,
        description="realism: calibrate so that this share of clean renders (a calibration set of unseen "
        "identities) scores >= 0.5, folded into the exported model; None keeps the trained logit",
    )


DEFAULT_RECIPE = TrainRecipe()


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised NCHW float, exactly what the spec (mean/std 0.5) makes ORT do."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - 0.5) / 0.5


def _augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Mild photometric and geometric jitter, so the detectors do not key on exact renderer pixels."""
    b = x.shape[0]
    gain = 1.0 + 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    bias = 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    x = x * gain + bias + noise * torch.randn(x.shape, generator=g)
    dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x


def _batches(n: int, bs: int, g: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=g)
    return [perm[i : i + bs] for i in range(0, n, bs)]


def _fit(
    model: torch.nn.Module,
    extra: list[torch.nn.Parameter],
    n: int,
    step: Any,
    recipe: TrainRecipe,
    what: str,
) -> None:
    """AdamW + one-cycle schedule over `epochs` passes of `n` samples; `step(idx, g)` returns the loss."""
    g = torch.Generator().manual_seed(recipe.seed)
    params = list(model.parameters()) + extra
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.epochs * ((n + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    model.train()
    t0 = time.time()
    for epoch in range(recipe.epochs):
        total, count = 0.0, 0
        for idx in _batches(n, recipe.batch_size, g):
            loss = step(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        log.info("%s epoch %d/%d: loss %.4f (%.0f s)", what, epoch + 1, recipe.epochs, total / count, time.time() - t0)
    model.eval()


# ---------------------------------------------------------------------------------------------
# Export


class _AUExport(torch.nn.Module):
    def __init__(self, net: AUDetectorNet):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(pixel_values)


class _RealismExport(torch.nn.Module):
    def __init__(self, net: RealismNet):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(pixel_values))[:, None]


def export_onnx(module: torch.nn.Module, path: Path, output_names: list[str], image_size: int) -> None:
    """TorchScript-based ONNX export (opset 17) with a dynamic batch axis."""
    import warnings

    module.eval()
    x = torch.zeros(2, 3, image_size, image_size)
    axes = {"pixel_values": {0: "batch"}} | {n: {0: "batch"} for n in output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=["pixel_values"],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def write_spec(out: Path, tree: dict[str, Any]) -> None:
    tree = dict(tree)
    tree["sha256"] = file_sha256(out / "model.onnx")
    header = "# Written by `factory detectors train`; rebuild with the command in detectors/models/README.md.\n"
    (out / "spec.yaml").write_text(header + yaml.safe_dump(tree, sort_keys=False))


def _input_spec(size: int) -> dict[str, Any]:
    return {"size": size, "mean": list(MEAN), "std": list(STD), "channel_order": "RGB", "layout": "NCHW"}


# ---------------------------------------------------------------------------------------------
# AU detectors


def train_au(
    arch: str, out: str | Path, recipe: TrainRecipe = DEFAULT_RECIPE, name: str | None = None
) -> dict[str, Any]:
    """Train one AU detector on puppet renders, export it, evaluate the ONNX model on held-out identities."""
    if arch not in AU_ARCHS:
        raise ValueError(f"AU detector arch must be one of {AU_ARCHS}, got {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    train = data.au_set(
        recipe.train_samples, recipe.train_people, recipe.split, recipe.seed, recipe.image_size, recipe.workers
    )
    log.info("au-%s: rendered %d training images in %.0f s", arch, len(train.images), time.time() - t0)
    x_all = to_input(train.images)
    occ_all = torch.from_numpy((train.intensity >= DEFAULT_OCCURRENCE_THRESHOLD).astype(np.float32))
    int_all = torch.from_numpy(train.intensity.astype(np.float32))
    net = AUDetectorNet(arch=arch, image_size=recipe.image_size, width=recipe.width, upsample=recipe.upsample)

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        logits, inten = net(_augment(x_all[idx], g, recipe.noise))
        return F.binary_cross_entropy_with_logits(logits, occ_all[idx]) + F.smooth_l1_loss(inten, int_all[idx])

    _fit(net, [], len(x_all), step, recipe, f"au-{arch}")
    net.save_pretrained(out / "torch")
    export_onnx(_AUExport(net), out / "model.onnx", ["occurrence_logits", "intensity"], recipe.image_size)
    write_spec(
        out,
        {
            "task": "au_detector",
            "name": f"puppet-{name or 'au-' + arch}",
            "model": "model.onnx",
            "input": _input_spec(recipe.image_size),
            "aus": list(AUS),
            "outputs": [
                {"kind": "logit", "name": "occurrence_logits"},
                {"kind": "intensity", "name": "intensity"},
            ],
            "torch_weights": "torch",
        },
    )
    report = evaluate_au(out / "spec.yaml", recipe)
    report |= {"arch": arch, "params": sum(p.numel() for p in net.parameters()), "train_seconds": time.time() - t0}
    report["recipe"] = recipe.model_dump()
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_au(spec_path: str | Path, recipe: TrainRecipe = DEFAULT_RECIPE) -> dict[str, Any]:
    """Held-out F1 / ICC / MAE of an exported AU detector, through ONNX Runtime (the path the factory uses)."""
    from .au import OnnxAUDetector
    from .metrics import au_report

    held = data.au_set(
        recipe.heldout_samples, recipe.heldout_people, "heldout", recipe.seed, recipe.image_size, recipe.workers
    )
    out = OnnxAUDetector(str(spec_path), batch_size=256).predict(held.images)
    rep = au_report(held.intensity, out.probability, out.intensity, DEFAULT_OCCURRENCE_THRESHOLD)
    return {"heldout": {"samples": len(held.images), "people": recipe.heldout_people, "split": "heldout"} | rep}


# ---------------------------------------------------------------------------------------------
# Realism discriminator


@dataclass
class RealDomain:
    """The real domain of `train_realism`: real photos against a generator's outputs, each side already
    split by the caller (`factory detectors train realism --real DIR --fake OUT`, factory/realism_sets.py).
    All uint8 (N, S, S, 3) at the model's input size S."""

    real: np.ndarray  # training photos (label 1)
    fakes: np.ndarray  # training outputs (label 0)
    calibration: np.ndarray  # held-out photos the threshold is set on (recipe.real_accepted of them reach 0.5)
    heldout_real: np.ndarray  # held-out photos the accepted share is measured on (not the calibration ones)
    heldout_fakes: np.ndarray  # held-out outputs the rejected share is measured on
    source: dict[str, Any] = field(default_factory=dict)  # where each side came from, for eval.json


def _balanced(real: np.ndarray, fakes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) with the smaller side repeated to the larger one's count, so the loss weighs both."""
    n = max(len(real), len(fakes))
    pick = [np.resize(np.arange(len(side)), n) for side in (real, fakes)]
    images = np.concatenate([real[pick[0]], fakes[pick[1]]])
    return images, np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])


def _puppet_realism_set(
    recipe: TrainRecipe, split: Literal["train", "heldout"], fakes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The puppet domain's realism set of `split` (data.realism_set at the recipe's sizes)."""
    n, people = (recipe.train_samples, recipe.train_people) if split == "train" else (
        recipe.heldout_samples, recipe.heldout_people
    )  # fmt: skip
    return data.realism_set(
        n, people, split, recipe.seed, recipe.image_size, recipe.workers, failures=recipe.failures, fakes=fakes
    )


def train_realism(
    out: str | Path,
    recipe: TrainRecipe = DEFAULT_RECIPE,
    generated: tuple[np.ndarray, np.ndarray] | None = None,
    name: str = "puppet-realism",
    real: RealDomain | None = None,
) -> dict[str, Any]:
    """The realism discriminator. `generated`: (training, held-out) raw outputs of `recipe.generator`,
    made by the caller (`factory detectors train`, which samples them as a build does). `real`: the real
    domain instead of the puppet one (photos against a build's outputs; the renders, corruptions and
    `generated` are not used), calibrated on its held-out photos when `recipe.real_accepted` is set."""
    if recipe.generator and generated is None:
        raise ValueError(
            f"realism recipe names generator {recipe.generator!r}: pass its raw outputs (factory detectors train "
            "samples them)"
        )
    if real is not None and generated is not None:
        raise ValueError("train_realism: the real domain (`real`) and generated puppet negatives are exclusive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    if real is None:
        images, labels, _ = _puppet_realism_set(recipe, "train", None if generated is None else generated[0])
    else:
        images, labels = _balanced(real.real, real.fakes)
    y_all = torch.from_numpy(labels.astype(np.float32))
    net = RealismNet(image_size=recipe.image_size, width=recipe.width)

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = to_input(images[idx.numpy()])  # per batch: 24,000 photos at 512 px stay uint8 in memory
        return F.binary_cross_entropy_with_logits(net(_augment(x, g, recipe.noise)), y_all[idx])

    _fit(net, [], len(images), step, recipe, "realism")
    calibration = None
    if recipe.real_accepted:
        calibration = _calibrate_realism(net, recipe, None if real is None else real.calibration)
    net.save_pretrained(out / "torch")
    export_onnx(_RealismExport(net), out / "model.onnx", ["realism"], recipe.image_size)
    write_spec(
        out,
        {
            "task": "realism",
            "name": name,
            "model": "model.onnx",
            "input": _input_spec(recipe.image_size),
            "outputs": [{"kind": "probability", "name": "realism"}],
            "threshold": 0.5,
            "torch_weights": "torch",
        },
    )
    if real is None:
        report = evaluate_realism(out / "spec.yaml", recipe, None if generated is None else generated[1])
    else:
        report = evaluate_realism(out / "spec.yaml", recipe, heldout=(real.heldout_real, real.heldout_fakes))
        h = report["heldout"]
        h |= {"real_photos": len(real.heldout_real), "fakes": len(real.heldout_fakes)}
        h["fakes_rejected"] = h["negatives_rejected"]
        report["trained_on"] = {"real_photos": len(real.real), "fakes": len(real.fakes)} | real.source
    report |= {"params": sum(p.numel() for p in net.parameters()), "train_seconds": time.time() - t0}
    if calibration is not None:
        report["calibration"] = calibration
    report["recipe"] = recipe.model_dump()
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _calibrate_realism(net: RealismNet, recipe: TrainRecipe, photos: np.ndarray | None = None) -> dict[str, Any]:
    """Shift the logit so that `recipe.real_accepted` of clean renders of unseen identities score >= 0.5
    (`photos`: of these held-out real photos instead, the real domain's calibration set).

    The calibration renders are their own draw (heldout identities, seed + 1000), not the eval set, so the
    reported acceptance of clean renders is measured, not set (the real domain's calibration photos are
    likewise not its held-out eval photos). A person accepts a clean render; so 0.5 means "as plausible as
    the least plausible renders we keep", not whatever the loss's balance left."""
    what = "photos"
    if photos is None:
        what = "renders"
        photos = data.au_set(
            max(1000, recipe.heldout_samples // 2), recipe.heldout_people, "heldout", recipe.seed + 1000,
            recipe.image_size, recipe.workers,
        ).images  # fmt: skip
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(to_input(photos[a : a + 256])) for a in range(0, len(photos), 256)])
    cut = float(torch.quantile(logits, 1.0 - float(recipe.real_accepted)))
    head = net.head[-1]
    with torch.no_grad():
        head.bias -= cut
    return {what: len(photos), "real_accepted": recipe.real_accepted, "logit_shift": round(-cut, 4)}


def evaluate_realism(
    spec_path: str | Path,
    recipe: TrainRecipe = DEFAULT_RECIPE,
    generated: np.ndarray | None = None,
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Held-out rejection rates through ONNX Runtime: on puppet renders and their negatives (plus
    `generated`), or on `heldout` = (real photos, a generator's outputs), the real domain's."""
    from .metrics import roc_auc
    from .realism import OnnxRealism

    if heldout is None:
        images, labels, kinds = _puppet_realism_set(recipe, "heldout", generated)
    else:
        real, fakes = heldout
        images = np.concatenate([real, fakes])
        labels = np.concatenate([np.ones(len(real), dtype=np.int64), np.zeros(len(fakes), dtype=np.int64)])
        kinds = np.concatenate([np.full(len(real), -1), np.full(len(fakes), data.ALL_KINDS.index("generated"))])
    model = OnnxRealism(str(spec_path), batch_size=256)
    scores = model.score(images)
    thr = model.default_threshold
    per_kind = {}
    for k, name in enumerate(data.ALL_KINDS):
        m = kinds == k
        if m.any():
            per_kind[name] = {"n": int(m.sum()), "rejected": round(float((scores[m] < thr).mean()), 4)}
    real = labels == 1
    return {
        "heldout": {
            "samples": len(images),
            "people": recipe.heldout_people if heldout is None else None,
            "roc_auc": round(roc_auc(labels, scores), 5),
            "threshold": thr,
            "real_accepted": round(float((scores[real] >= thr).mean()), 4),
            "negatives_rejected": round(float((scores[~real] < thr).mean()), 4),
            "per_negative_kind": per_kind,
        }
    }


# ---------------------------------------------------------------------------------------------
# Identity encoder


def train_identity(
    out: str | Path, recipe: TrainRecipe = DEFAULT_RECIPE, arch: str | None = None, name: str = "identity"
) -> dict[str, Any]:
    """The identity encoder (`arch` None: core's IdentityNet, what MAUGen carries) or the panel's
    `resnet` identity evaluator, with an ArcFace margin over the training identities."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    train = data.au_set(
        recipe.train_samples, recipe.train_people, recipe.split, recipe.seed + 7, recipe.image_size, recipe.workers
    )
    x_all = to_input(train.images)
    who = torch.from_numpy(train.identity.astype(np.int64))
    if arch not in (None, "resnet"):
        raise ValueError(f"identity encoder arch must be None (IdentityNet) or 'resnet', got {arch!r}")
    net: torch.nn.Module = (
        IdentityNet(image_size=recipe.image_size, width=recipe.width) if arch is None
        else IdentityResNet(image_size=recipe.image_size, width=recipe.width)
    )
    head = ArcFaceHead(net.config.dim, recipe.train_people)

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return head(net(_augment(x_all[idx], g, recipe.noise)), who[idx])

    _fit(net, list(head.parameters()), len(x_all), step, recipe, "identity")
    net.save_pretrained(out / "torch")
    export_onnx(net, out / "model.onnx", ["embedding"], recipe.image_size)
    # The verification threshold is chosen on training identities, then applied to held-out ones.
    thr, train_acc = _best_threshold(*_pairs(net_embed(net, train.images[:4000]), train.identity[:4000], recipe.seed))
    write_spec(
        out,
        {
            "task": "identity",
            "name": f"puppet-{name}",
            "model": "model.onnx",
            "input": _input_spec(recipe.image_size),
            "outputs": [{"kind": "embedding", "name": "embedding"}],
            "threshold": round(float(thr), 4),
            "torch_weights": "torch",
        },
    )
    report = evaluate_identity(out / "spec.yaml", recipe)
    report |= {
        "train_pairs_accuracy": round(train_acc, 4),
        "params": sum(p.numel() for p in net.parameters()),
        "train_seconds": time.time() - t0,
    }
    report["recipe"] = recipe.model_dump()
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def net_embed(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    net.eval()
    return np.concatenate([net(to_input(images[i : i + 256])).numpy() for i in range(0, len(images), 256)])


def _pairs(emb: np.ndarray, who: np.ndarray, seed: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of n genuine and n impostor pairs (labels 1 / 0)."""
    rng = np.random.default_rng(seed + 99)
    by_id: dict[int, np.ndarray] = {}
    for pid in np.unique(who):
        idx = np.flatnonzero(who == pid)
        if len(idx) >= 2:
            by_id[int(pid)] = idx
    keys = list(by_id)
    sims, labels = [], []
    for _ in range(n):
        idx = by_id[keys[int(rng.integers(len(keys)))]]
        a, b = rng.choice(idx, 2, replace=False)
        sims.append(float(emb[a] @ emb[b]))
        labels.append(1)
        a, b = rng.integers(len(emb), size=2)
        while who[a] == who[b]:
            b = int(rng.integers(len(emb)))
        sims.append(float(emb[a] @ emb[b]))
        labels.append(0)
    return np.array(sims), np.array(labels)


def _best_threshold(sims: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The accuracy-maximising threshold, centred in the range of thresholds that reach it (a margin
    on both sides rather than a value pressed against the lowest genuine pair)."""
    cands = np.unique(sims)
    accs = np.array([((sims >= t) == (labels == 1)).mean() for t in cands])
    best = np.flatnonzero(accs == accs.max())
    hi = cands[best.max()]
    lo = cands[best.min() - 1] if best.min() > 0 else cands[best.min()] - 1e-3
    return float((lo + hi) / 2), float(accs.max())


def evaluate_identity(spec_path: str | Path, recipe: TrainRecipe = DEFAULT_RECIPE) -> dict[str, Any]:
    from .identity import OnnxIdentityEncoder
    from .metrics import roc_auc

    held = data.au_set(
        recipe.heldout_samples, recipe.heldout_people, "heldout", recipe.seed + 7, recipe.image_size, recipe.workers
    )
    enc = OnnxIdentityEncoder(str(spec_path), batch_size=256)
    emb = enc.embed(held.images)
    sims, labels = _pairs(emb, held.identity, recipe.seed + 1)
    thr = float(enc.verify_threshold if enc.verify_threshold is not None else 0.5)
    return {
        "heldout": {
            "samples": len(held.images),
            "people": recipe.heldout_people,
            "pairs": len(sims),
            "threshold": thr,
            "verification_accuracy": round(float(((sims >= thr) == (labels == 1)).mean()), 4),
            "roc_auc": round(roc_auc(labels, sims), 5),
            "genuine_cosine_mean": round(float(sims[labels == 1].mean()), 4),
            "impostor_cosine_mean": round(float(sims[labels == 0].mean()), 4),
        }
    }


# ---------------------------------------------------------------------------------------------

#: The embedded models: kind, AU architecture, and their recipe (on top of TrainRecipe's defaults).
DEFAULT_MODELS: dict[str, tuple[Kind, str | None, dict[str, Any]]] = {
    "au-cnn": ("au", "cnn", {"epochs": 14}),
    "au-resnet": ("au", "resnet", {"epochs": 14, "upsample": 2}),
    "au-vit": ("au", "vit", {"epochs": 40, "lr": 1e-3}),
    "realism": ("realism", None, {"noise": 0.04}),
    # the paper's way: renders against a MAUGen's raw outputs and failure-shaped corruptions, calibrated
    "realism-gen": (
        "realism",
        None,
        {"noise": 0.04, "failures": True, "generator": "builtin:tiny-puppet", "real_accepted": 0.98},
    ),
    "identity": ("identity", None, {"epochs": 8}),
    # the evaluation panel: own identity stream (split) and seed, other architectures
    "eval-au": ("au", "gncnn", {"epochs": 14, "split": "evaluator", "seed": 11}),
    "eval-identity": ("identity", "resnet", {"epochs": 8, "split": "evaluator", "seed": 11}),
}


def recipe_for(name: str, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """The committed recipe of model `name`, with command-line overrides on top."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(DEFAULT_MODELS)}, all")
    return TrainRecipe(**(DEFAULT_MODELS[name][2] | (overrides or {})))


def train_one(
    name: str, out_root: str | Path, recipe: TrainRecipe, generated: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Any]:
    """Train the embedded model `name` (see DEFAULT_MODELS) into OUT_ROOT/name (`generated`: train_realism's)."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(DEFAULT_MODELS)}, all")
    kind, arch, _ = DEFAULT_MODELS[name]
    out = Path(out_root) / name
    if kind == "au":
        return train_au(str(arch), out, recipe, name=name if name.startswith("eval-") else None)
    if kind == "realism":
        return train_realism(out, recipe, generated, name="puppet-realism" if name == "realism" else f"puppet-{name}")
    return train_identity(out, recipe, arch=arch, name=name)
