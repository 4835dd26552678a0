"""The puppet renderer: procedural faces whose 12 DISFA AU intensities move their own region.

Why it is built this way:
- Exact ground truth: an image is a pure function of (identity, 12 intensities), so detectors
  trained on it and generators checked against it have labels without annotation noise.
- Anatomy first: every AU moves only the features its muscle moves (brows, lids, cheeks, nose,
  lips, chin, jaw) and `region_mask` says where that is, so tests can prove the locality.
- Visible at 64 px and graded: displacements and crease strengths are linear in intensity, so
  each intensity step changes the image monotonically more.
- Fast and portable: PIL polygon/ellipse/line primitives on a supersampled canvas, box-reduced
  (anti-aliasing), and a multiplicative lighting gradient; no fonts, no randomness.

Coordinates: every feature is placed in face-local units (u across, -1..1 = face half-width W;
v down, -1 = top of head, +1 = chin, in units of the half-height H), then posed: a depth-weighted
yaw/pitch shift of the features against the outline, a roll about the face centre, a shift.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from core.facs import AUS, INTENSITY_MAX, INTENSITY_MIN, NUM_AUS, au_index

from .identity import EYE_COLORS, HAIR_COLORS, PuppetIdentity

log = logging.getLogger(__name__)

ALLOWED_SIZES: tuple[int, ...] = (64, 128, 256)

# Largest jaw drop (AU26 = 5) in face-local v units; lower lip follows by JAW_LIP, corners by JAW_CORNER.
JAW_DROP = 0.17
JAW_LIP = 0.8
JAW_CORNER = 0.3
# Largest lip parting (AU25 = 5) without jaw drop, v units.
LIP_PART = 0.09
# Below this v the face outline stretches with the jaw.
JAW_PIVOT = 0.35

#: The facial features, by the AUs whose zones make them: what realism's failure-shaped negatives break
#: (detectors/data.py) and what MAUGen's `losses.feature_weight` weights up.
FEATURE_REGIONS: dict[str, tuple[int, ...]] = {"brows": (1, 2, 4), "eyes": (5, 6), "nose": (9,), "mouth": (12, 15, 20, 25, 26)}
_I = {au: au_index(au) for au in AUS}

# Unit-circle tables, so ellipses are polygons (they must rotate with the head).
_T24 = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
_C24, _S24 = np.cos(_T24), np.sin(_T24)
_T16 = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
_C16, _S16 = np.cos(_T16), np.sin(_T16)
# Face outline: angles from the right side (0) down over the chin and up over the top.
_TO = np.linspace(0.0, 2.0 * np.pi, 56, endpoint=False)
_CO, _SO = np.cos(_TO), np.sin(_TO)
# Sample positions across an eye / a brow / the mouth.
_SE = np.linspace(-1.0, 1.0, 13)
_SB = np.linspace(0.0, 1.0, 8)
_SM = np.linspace(-1.0, 1.0, 17)
_SM_ENV = np.sqrt(np.clip(1.0 - _SM**2, 0.0, 1.0))
_SM_BOW = 1.0 - 0.35 * np.exp(-((_SM / 0.14) ** 2)) + 0.12 * np.exp(-(((np.abs(_SM) - 0.3) / 0.15) ** 2))
_SE_UP = (1.0 - _SE**2) ** 0.7
_SE_LO = (1.0 - _SE**2) ** 0.85


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    """Colour a..b at t in [0, 1] (opaque blending: lines are drawn on known skin colour)."""
    t = min(max(t, 0.0), 1.0)
    return (
        int(a[0] + (b[0] - a[0]) * t + 0.5),
        int(a[1] + (b[1] - a[1]) * t + 0.5),
        int(a[2] + (b[2] - a[2]) * t + 0.5),
    )


def _lum(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _scale(c: Sequence[float], k: float | Sequence[float]) -> tuple[int, int, int]:
    ks = (k, k, k) if isinstance(k, (int, float)) else k
    return tuple(int(min(255.0, max(0.0, c[i] * ks[i])) + 0.5) for i in range(3))  # type: ignore[return-value]


@dataclass
class _Layout:
    """Everything about one identity at one canvas size that does not depend on the expression."""

    S: int
    cx: float
    cy: float
    W: float
    H: float
    cosr: float
    sinr: float
    dyu: float  # yaw shift of features per unit depth (u units)
    dpv: float  # pitch shift per unit depth (v units)
    child: bool
    elderly: bool
    wrinkle: float  # static age crease strength 0..1
    # face shape
    jaw_q: float
    jaw_taper: float
    # features (local units)
    eye_u: float
    eye_v: float
    ew: float
    eh_up: float
    eh_lo: float
    iris_r: float
    brow_v: float
    brow_in: float
    brow_len: float
    brow_th: float
    brow_arch: float
    tip_v: float
    nose_w: float
    mouth_v: float
    mw: float
    tu: float
    tl: float
    sag: float
    hairline: float
    # colours
    skin: tuple[int, int, int]
    rim: tuple[int, int, int]
    crease: tuple[int, int, int]
    lip: tuple[int, int, int]
    lip_low: tuple[int, int, int]
    lip_line: tuple[int, int, int]
    brow: tuple[int, int, int]
    lash: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_dark: tuple[int, int, int]
    iris: tuple[int, int, int]
    cheek: tuple[int, int, int]
    light: tuple[int, int, int]
    neck: tuple[int, int, int]
    shadow: tuple[int, int, int]
    ear_in: tuple[int, int, int]
    nostril: tuple[int, int, int]
    ala: tuple[int, int, int]
    shade_side: float  # -1/+1: side of the nose away from the light
    blush: float
    lwk: float  # line weight factor (darker skin: wider creases keep AU cues visible)


class PuppetRenderer:
    """Renders puppet faces; `render(identity, intensity)` is a pure function of its inputs."""

    def __init__(self, size: int = 64, supersample: int = 4):
        if size not in ALLOWED_SIZES:
            raise ValueError(f"size must be one of {list(ALLOWED_SIZES)}, got {size!r}")
        if not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= 8:
            raise ValueError(f"supersample must be an int in 1..8, got {supersample!r}")
        self.size = int(size)
        self.supersample = int(supersample)
        self.S = self.size * self.supersample
        c = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size - 0.5
        self._gx = c[None, :]
        self._gy = c[:, None]
        self._layouts: OrderedDict[PuppetIdentity, _Layout] = OrderedDict()
        self._masks: OrderedDict[tuple[PuppetIdentity, int], np.ndarray] = OrderedDict()
        self._cache_max = 2048

    # ------------------------------------------------------------------ public API

    def render(self, identity: PuppetIdentity, intensity: Sequence[float] | np.ndarray) -> np.ndarray:
        """One uint8 (size, size, 3) RGB image of `identity` showing AU `intensity` (12, AUS order)."""
        a = self._check_intensity(intensity) / float(INTENSITY_MAX)
        L = self._layout(identity)
        img = Image.new("RGB", (L.S, L.S), identity.background)
        d = ImageDraw.Draw(img)
        self._draw_face(d, identity, L, a)
        if self.supersample > 1:
            img = img.reduce(self.supersample)
        return self._light(np.asarray(img), identity)

    def render_batch(self, identities: Sequence[PuppetIdentity], intensities: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """Render a batch: (B, size, size, 3) uint8, one image per (identity, intensity row)."""
        ints = np.asarray(intensities, dtype=np.float64)
        if ints.ndim != 2 or ints.shape[1] != NUM_AUS:
            raise ValueError(f"intensities must have shape (B, {NUM_AUS}), got {ints.shape}")
        if len(identities) != ints.shape[0]:
            raise ValueError(f"got {len(identities)} identities but {ints.shape[0]} intensity rows")
        out = np.empty((len(identities), self.size, self.size, 3), dtype=np.uint8)
        for i, (ident, row) in enumerate(zip(identities, ints)):
            out[i] = self.render(ident, row)
        return out

    def region_mask(self, identity: PuppetIdentity, au: int) -> np.ndarray:
        """Bool (size, size): where AU `au` may change pixels (any intensities of the other AUs)."""
        au_index(au)  # clear error for AUs outside the 12
        key = (identity, int(au))
        m = self._masks.get(key)
        if m is None:
            m = self._region(identity, int(au))
            self._put(self._masks, key, m)
        return m.copy()

    def feature_masks(self, identity: PuppetIdentity) -> list[np.ndarray]:
        """Bool (size, size) masks of the person's facial features, in FEATURE_REGIONS order."""
        return [np.logical_or.reduce([self.region_mask(identity, au) for au in aus]) for aus in FEATURE_REGIONS.values()]

    def face_mask(self, identity: PuppetIdentity) -> np.ndarray:
        """Bool (size, size): the face (skin and features at any expression) plus every AU region."""
        key = (identity, 0)
        m = self._masks.get(key)
        if m is None:
            L = self._layout(identity)
            img = Image.new("L", (L.S, L.S), 0)
            d = ImageDraw.Draw(img)
            d.polygon(self._outline(L, JAW_DROP), fill=255)
            m = self._to_mask(img, dilate=1)
            for au in AUS:
                m |= self.region_mask(identity, au)
            self._put(self._masks, key, m)
        return m.copy()

    def exemplars(self, identities: Sequence[PuppetIdentity]) -> tuple[np.ndarray, np.ndarray]:
        """What MAUGen is conditioned on per identity: the neutral render (B, size, size, 3) uint8
        and the face mask (B, size, size) float32, 1 where the face is to be generated."""
        images = self.render_batch(identities, np.zeros((len(identities), NUM_AUS)))
        masks = np.stack([self.face_mask(p) for p in identities]).astype(np.float32)
        return images, masks

    # ------------------------------------------------------------------ validation, caches

    @staticmethod
    def _check_intensity(intensity: Sequence[float] | np.ndarray) -> np.ndarray:
        try:
            a = np.asarray(intensity, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"intensity must be {NUM_AUS} numbers (AUs {list(AUS)}), got {intensity!r}") from None
        if a.shape != (NUM_AUS,):
            raise ValueError(f"intensity must have {NUM_AUS} entries (AUs {list(AUS)}), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            bad = [AUS[i] for i in np.flatnonzero(~np.isfinite(a))]
            raise ValueError(f"intensity holds NaN/inf for AU {bad}")
        if a.min() < INTENSITY_MIN or a.max() > INTENSITY_MAX:
            bad = [AUS[i] for i in np.flatnonzero((a < INTENSITY_MIN) | (a > INTENSITY_MAX))]
            raise ValueError(f"intensity out of range [{INTENSITY_MIN}, {INTENSITY_MAX}] for AU {bad}: {a.tolist()}")
        return a

    def _put(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        if len(cache) > self._cache_max:
            cache.popitem(last=False)

    def _layout(self, ident: PuppetIdentity) -> _Layout:
        L = self._layouts.get(ident)
        if L is None:
            L = self._make_layout(ident)
            self._put(self._layouts, ident, L)
        return L

    def _make_layout(self, p: PuppetIdentity) -> _Layout:
        S = float(self.S)
        child = p.age_group == "child"
        elderly = p.age_group == "elderly"
        wrinkle = {"child": 0.0, "young_adult": 0.0, "adult": 0.12 + 0.2 * p.age, "elderly": 0.45 + 0.35 * p.age}[p.age_group]
        W = S * 0.275 * p.face_width * p.scale * (1.04 if child else 1.0)
        H = S * 0.365 * p.face_height * p.scale * (0.95 if child else 1.0)
        r = math.radians(p.roll)
        eye_v = 0.07 if child else 0.0
        es = p.eye_size * (1.1 if child else 1.0)
        skin = p.skin_rgb()
        lum = 0.299 * skin[0] + 0.587 * skin[1] + 0.114 * skin[2]
        hair = HAIR_COLORS[p.hair_color]
        # brows: hair colour, pushed darker until they contrast with the skin (every skin tone)
        brow = _mix(hair, _scale(skin, 0.35), 0.35 if p.hair_color in ("blonde", "grey", "white") else 0.15)
        for _ in range(4):
            if abs(_lum(brow) - lum) >= min(60.0, 0.7 * lum):
                break
            brow = _mix(brow, _scale(skin, 0.25), 0.5)
        add = (26.0, 24.0, 22.0)
        lip = _mix(_scale(skin, 0.86), (180, 70, 84), 0.4) if lum > 120 else _mix(_scale(skin, 0.78), (112, 44, 56), 0.4)
        return _Layout(
            S=self.S,
            cx=S * (0.5 + 0.035 * p.shift_x),
            cy=S * (0.47 + 0.025 * p.shift_y),
            W=W,
            H=H,
            cosr=math.cos(r),
            sinr=math.sin(r),
            dyu=0.07 * p.yaw,
            dpv=0.05 * p.pitch,
            child=child,
            elderly=elderly,
            wrinkle=wrinkle,
            jaw_q=1.0 - 0.45 * p.jaw_square,
            jaw_taper=0.08 + 0.22 * p.jaw_taper - (0.06 if elderly else 0.0),
            eye_u=0.4 * p.eye_spacing,
            eye_v=eye_v,
            ew=0.2 * es,
            eh_up=0.085 * es,
            eh_lo=0.05 * es,
            iris_r=0.085 * es,
            brow_v=eye_v - 0.23 - (0.02 if child else 0.0),
            brow_in=0.12,
            brow_len=0.5 + 0.04 * (p.eye_spacing - 1.0) * 10,
            brow_th=0.045 * p.brow_thickness,
            brow_arch=0.02 + 0.05 * p.brow_arch,
            tip_v=eye_v + (0.24 if child else 0.3) * p.nose_length,
            nose_w=(0.11 if child else 0.13) * p.nose_width,
            mouth_v=eye_v + (0.52 if child else 0.57),
            mw=(0.26 if child else 0.3) * p.mouth_width,
            tu=0.05 * p.lip_fullness,
            tl=0.065 * p.lip_fullness,
            sag=0.02 * p.age if elderly else 0.0,
            hairline=-0.62 + (0.05 if child else 0.0) - (0.08 * p.age if elderly else 0.0),
            skin=skin,
            rim=_scale(skin, 0.9),
            crease=_scale(skin, 0.55 if lum > 150 else (0.45 if lum > 90 else 0.3)),
            lip=lip,
            lip_low=_scale(lip, 1.06),
            lip_line=_scale(lip, 0.5 if lum > 90 else 0.4),
            brow=brow,
            lash=_mix((28, 22, 22), _scale(skin, 0.3), 0.2),
            hair=hair,
            hair_dark=_scale(hair, 0.72),
            iris=EYE_COLORS[p.eye_color],
            cheek=tuple(int(min(255, c)) for c in (skin[0] * 1.0 + 24, skin[1] * 0.86 + 4, skin[2] * 0.84 + 4)),
            light=tuple(int(min(255, c + k)) for c, k in zip(skin, add)),
            neck=_scale(skin, 0.84),
            shadow=_scale(skin, 0.7),
            ear_in=_scale(skin, 0.78),
            nostril=_scale(skin, 0.38),
            ala=_scale(skin, 0.88),
            shade_side=1.0 if math.cos(p.light_angle) < 0 else -1.0,
            blush=p.blush,
            lwk=1.0 if lum > 150 else (1.2 if lum > 90 else 1.45),
        )

    # ------------------------------------------------------------------ geometry helpers

    def _pts(self, L: _Layout, u: np.ndarray, v: np.ndarray, depth: float = 0.0) -> list[float]:
        """Local (u, v) -> flat [x0, y0, x1, y1, ...] canvas coordinates, posed."""
        X = (u + L.dyu * depth) * L.W
        Y = (v + L.dpv * depth) * L.H
        xy = np.empty((X.shape[0], 2))
        xy[:, 0] = L.cx + L.cosr * X - L.sinr * Y
        xy[:, 1] = L.cy + L.sinr * X + L.cosr * Y
        return xy.ravel().tolist()

    def _pt(self, L: _Layout, u: float, v: float, depth: float = 0.0) -> tuple[float, float]:
        X = (u + L.dyu * depth) * L.W
        Y = (v + L.dpv * depth) * L.H
        return L.cx + L.cosr * X - L.sinr * Y, L.cy + L.sinr * X + L.cosr * Y

    def _ellipse(self, L: _Layout, u: float, v: float, ru: float, rv: float, depth: float, n: int = 24) -> list[float]:
        c, s = (_C24, _S24) if n == 24 else (_C16, _S16)
        return self._pts(L, u + ru * c, v + rv * s, depth)

    def _circle(self, d: ImageDraw.ImageDraw, L: _Layout, u: float, v: float, r: float, depth: float, fill) -> None:
        """A circle of radius r (in H units): rotation-invariant, so PIL's fast ellipse."""
        x, y = self._pt(L, u, v, depth)
        rr = r * L.H
        d.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill)

    def _lw(self, k: float) -> int:
        """Line width in canvas pixels for k output pixels at 64 px (lines scale with the image)."""
        return max(1, int(round(k * self.S / 64.0)))

    @staticmethod
    def _outline_uv(L: _Layout, drop: float) -> tuple[np.ndarray, np.ndarray]:
        """Face outline in local units: cranium ellipse on top, a jaw (squareness, taper) below;
        `drop` (v units) stretches the part below JAW_PIVOT (jaw drop)."""
        lower = _SO > 0
        s = np.where(lower, _SO, 0.0)
        u = np.sign(_CO) * np.abs(_CO) ** np.where(lower, L.jaw_q, 1.0) * (1.0 - L.jaw_taper * s**2)
        v = _SO + drop * _smoothstep((_SO - JAW_PIVOT) / (1.0 - JAW_PIVOT)) if drop else _SO
        return u, v

    def _outline(self, L: _Layout, drop: float, grow: float = 1.0) -> list[float]:
        """Face outline polygon in canvas coordinates (optionally grown about the face centre)."""
        u, v = self._outline_uv(L, drop)
        return self._pts(L, u * grow, v * grow, 0.0)

    # ------------------------------------------------------------------ drawing

    def _line(self, d, L, u, v, depth, color, k=0.6) -> None:
        """A polyline k output px wide (at 64 px); wider on darker skin, where creases show less."""
        d.line(self._pts(L, np.asarray(u, float), np.asarray(v, float), depth), fill=color, width=self._lw(k * L.lwk))

    def _draw_face(self, d: ImageDraw.ImageDraw, p: PuppetIdentity, L: _Layout, a: np.ndarray) -> None:
        a1, a2, a4, a5, a6, a9, a12, a15, a17, a20, a25, a26 = (float(x) for x in a)
        drop = JAW_DROP * a26
        skin = L.skin

        # shirt, long hair behind, neck, ears
        d.polygon(
            self._pts(
                L,
                np.array([-2.4, -2.0, -0.95, -0.4, 0.0, 0.4, 0.95, 2.0, 2.4]),
                np.array([2.2, 1.45, 1.2, 1.28, 1.45, 1.28, 1.2, 1.45, 2.2]),
            ),
            fill=p.shirt_color,
        )
        if p.hair_style == "long":
            t = np.linspace(np.pi, 2 * np.pi, 13)
            u = np.concatenate([[-1.22, -1.2], 1.12 * np.cos(t), [1.2, 1.22]])
            v = np.concatenate([[1.45, 0.2], 1.1 * np.sin(t) - 0.02, [0.2, 1.45]])
            d.polygon(self._pts(L, u, v), fill=L.hair_dark)
        d.polygon(self._pts(L, np.array([-0.42, 0.42, 0.52, -0.52]), np.array([0.5, 0.5, 1.6, 1.6])), fill=L.neck)
        d.polygon(self._ellipse(L, 0.0, 0.96, 0.44, 0.085, 0.0, 16), fill=L.shadow)
        for sg in (-1.0, 1.0):
            d.polygon(self._ellipse(L, sg * 0.98, L.eye_v + 0.12, 0.13, 0.2, -0.5, 16), fill=L.rim)
            self._line(d, L, sg * np.array([1.0, 1.04, 1.03, 0.98]), L.eye_v + np.array([0.02, 0.08, 0.2, 0.26]), -0.5, L.ear_in, 0.7)

        # face: darker rim, then the lit skin
        d.polygon(self._outline(L, drop), fill=L.rim)
        u, v = self._outline_uv(L, drop)
        inner = self._pts(L, u * 0.93 - 0.015 * L.shade_side, v * 0.955 - 0.01, 0.0)
        d.polygon(inner, fill=skin)

        self._forehead(d, L, a1, a2)
        self._cheeks(d, L, a6)
        self._folds(d, L, a9)
        for sg in (-1.0, 1.0):
            self._eye(d, L, sg, a5, a6)
        self._brows(d, L, a1, a2, a4)
        self._nose(d, L, a9)
        self._chin(d, L, a17, a25, drop)
        self._mouth(d, L, a12, a15, a17, a20, a25, drop)
        self._hair(d, p, L)
        if p.glasses:
            self._glasses(d, p, L)

    def _forehead(self, d, L: _Layout, a1: float, a2: float) -> None:
        """Horizontal forehead lines: age lines everywhere, AU1 deepens the centre, AU2 the sides."""
        if L.wrinkle <= 0 and a1 <= 0 and a2 <= 0:
            return
        w0 = 0.6 * L.wrinkle
        for k in range(3):
            base = L.brow_v - 0.17 - 0.075 * k
            uc = np.linspace(-0.3, 0.3, 5)
            ac = w0 + (1 - w0) * 0.75 * a1
            if ac > 0.01:
                self._line(d, L, uc, base - 0.025 * (1 - (uc / 0.65) ** 2), 0.5, _mix(L.skin, L.crease, ac), 0.55)
            al = w0 + (1 - w0) * 0.75 * a2
            if al > 0.01:
                for sg in (-1.0, 1.0):
                    ul = sg * np.linspace(0.3, 0.62 - 0.05 * k, 4)
                    self._line(d, L, ul, base - 0.025 * (1 - (ul / 0.65) ** 2) + 0.01, 0.5, _mix(L.skin, L.crease, al), 0.55)

    def _cheeks(self, d, L: _Layout, a6: float) -> None:
        """Cheek apples: AU6 lifts them and makes them rounder/brighter; a blush at rest."""
        b = 0.1 + 0.35 * L.blush + 0.6 * a6
        for sg in (-1.0, 1.0):
            cu, cv = sg * 0.45, L.eye_v + 0.28 - 0.08 * a6
            if a6 > 0:
                # shadow crescent under the lifted cheek
                d.polygon(self._ellipse(L, cu - sg * 0.02, cv + 0.035, 0.19, 0.11, 0.4, 16), fill=_mix(L.skin, L.crease, 0.35 * a6))
            for k, (sc, al) in enumerate(((1.0, 0.3), (0.72, 0.6), (0.45, 1.0))):
                d.polygon(
                    self._ellipse(L, cu, cv - 0.01 * k, 0.19 * sc, 0.11 * sc, 0.4, 16),
                    fill=_mix(L.skin, L.cheek, min(1.0, b * al + 0.1 * a6)),
                )

    def _folds(self, d, L: _Layout, a9: float) -> None:
        """Nasolabial folds: static with age; AU9 deepens their upper part (by the nostrils)."""
        st = 0.1 if L.child else 0.25 + 0.5 * L.wrinkle
        for sg in (-1.0, 1.0):
            t = np.linspace(0.0, 1.0, 6)
            u = sg * (L.nose_w + 0.06 + (L.mw + 0.06 - L.nose_w - 0.06) * t + 0.05 * np.sin(np.pi * t))
            v = L.tip_v + 0.02 + (L.mouth_v + 0.03 - L.tip_v - 0.02) * t
            up = _mix(L.skin, L.crease, st + (1 - st) * 0.7 * a9)
            self._line(d, L, u[:4], v[:4], 0.7, up, 0.65)
            self._line(d, L, u[3:], v[3:], 0.7, _mix(L.skin, L.crease, st), 0.65)
            if L.elderly:  # jowl lines
                self._line(d, L, sg * np.array([0.66, 0.62, 0.55]), np.array([0.62, 0.72, 0.8]), 0.3, _mix(L.skin, L.crease, 0.5 * L.wrinkle), 0.6)

    def _eye(self, d, L: _Layout, sg: float, a5: float, a6: float) -> None:
        """Sclera, iris, lids. AU5 raises the upper lid; AU6 pushes the lower lid up (crow's feet)."""
        depth = 0.6
        cu, cv = sg * L.eye_u, L.eye_v
        up = L.eh_up * (1.0 + 0.7 * a5)
        lo = L.eh_lo * (1.0 - 0.55 * a6)
        tilt = 0.012 * (sg * _SE)  # outer corner slightly higher
        u = cu + L.ew * _SE
        vu = cv - up * _SE_UP - tilt
        vl = cv + lo * _SE_LO - tilt
        d.polygon(self._pts(L, np.concatenate([u, u[::-1]]), np.concatenate([vu, vl[::-1]]), depth), fill=(236, 233, 226))
        iv = cv + 0.01
        self._circle(d, L, cu, iv, L.iris_r, depth, L.iris)
        self._circle(d, L, cu, iv, L.iris_r * 0.45, depth, (14, 12, 12))
        self._circle(d, L, cu + 0.03, iv - 0.035, L.iris_r * 0.22, depth, (250, 250, 250))
        # skin covers above the upper lid and below the lower lid (clip the iris to the eye)
        top = cv - L.iris_r - 0.04
        bot = cv + L.iris_r + 0.04
        ends = np.array([u[-1], u[0]])
        d.polygon(self._pts(L, np.concatenate([u, ends]), np.concatenate([vu, [top, top]]), depth), fill=L.skin)
        d.polygon(self._pts(L, np.concatenate([u, ends]), np.concatenate([vl, [bot, bot]]), depth), fill=L.skin)
        # crease above the lid (moves up less than the lid: the lid folds under it)
        cr = L.eh_up * (1.0 + 0.6 * a5) + 0.045 - (0.012 * L.wrinkle)
        ucr = cu + 0.85 * L.ew * _SE[2:-2]
        self._line(d, L, ucr, cv - cr * (1 - _SE[2:-2] ** 2) ** 0.6 - tilt[2:-2], depth, _mix(L.skin, L.crease, 0.45 + 0.3 * L.wrinkle), 0.5)
        # lid lines: lashes on top, thin lower lid
        self._line(d, L, u, vu, depth, L.lash, 1.0)
        self._line(d, L, u[2:-1] if sg > 0 else u[1:-2], (vl[2:-1] if sg > 0 else vl[1:-2]), depth, _mix(L.skin, L.crease, 0.7), 0.45)
        # under-eye line (bags with age) lifted by AU6; crow's feet
        ab = 0.25 * L.wrinkle + 0.65 * a6
        if ab > 0.01:
            ub = cu + 0.7 * L.ew * _SE[2:-2]
            vb = cv + lo + 0.06 - 0.02 * a6 + 0.03 * (1 - _SE[2:-2] ** 2) ** 0.8
            self._line(d, L, ub, vb, depth, _mix(L.skin, L.crease, ab), 0.5)
        af = 0.4 * L.wrinkle + 0.75 * a6
        if af > 0.01:
            col = _mix(L.skin, L.crease, af)
            x0 = cu + sg * (L.ew + 0.03)
            for dv in (-0.035, 0.01, 0.055):
                self._line(d, L, [x0, x0 + sg * 0.1], [cv + dv, cv + dv * 1.9 - 0.005], 0.5, col, 0.45)

    def _brows(self, d, L: _Layout, a1: float, a2: float, a4: float) -> None:
        """Brows: AU1 lifts the inner ends, AU2 the outer ends, AU4 lowers and draws them together."""
        s = _SB
        dv = -0.11 * a1 * (1 - s) ** 1.3 - 0.11 * a2 * s**1.3 + 0.045 * a4 + 0.03 * a4 * (1 - s)
        th = L.brow_th * (1.0 - 0.45 * s)
        vc = L.brow_v - L.brow_arch * np.sin(np.pi * s * 0.85) + dv
        for sg in (-1.0, 1.0):
            u = sg * (L.brow_in + L.brow_len * s - 0.05 * a4 * (1 - s) ** 1.5)
            d.polygon(
                self._pts(L, np.concatenate([u, u[::-1]]), np.concatenate([vc - 0.55 * th, (vc + 0.45 * th)[::-1]]), 0.6),
                fill=L.brow,
            )
        if a4 > 0:  # glabella furrows between the brows
            col = _mix(L.skin, L.crease, 0.85 * a4)
            for sg in (-1.0, 1.0):
                self._line(d, L, [sg * 0.035, sg * 0.028, sg * 0.04], [L.brow_v - 0.03, L.brow_v + 0.03, L.brow_v + 0.09], 0.7, col, 0.55)

    def _nose(self, d, L: _Layout, a9: float) -> None:
        """Nose: AU9 wrinkles the bridge, lifts the tip and flares the nostrils."""
        depth = 1.0
        ss = L.shade_side
        self._line(d, L, [ss * 0.075, ss * 0.085, ss * 0.1], [L.eye_v + 0.04, L.tip_v - 0.1, L.tip_v - 0.03], depth, _mix(L.skin, L.crease, 0.28), 0.6)
        lift = 0.035 * a9
        flare = 1.0 + 0.35 * a9
        for sg in (-1.0, 1.0):
            d.polygon(self._ellipse(L, sg * L.nose_w * (0.72 + 0.12 * a9), L.tip_v + 0.02 - lift, 0.075 * flare, 0.055, depth, 16), fill=L.ala)
        d.polygon(self._ellipse(L, 0.0, L.tip_v - 0.005 - 0.02 * a9, 0.085, 0.065, depth + 0.2, 16), fill=_mix(L.skin, L.light, 0.5))
        for sg in (-1.0, 1.0):
            d.polygon(
                self._ellipse(L, sg * L.nose_w * (0.42 + 0.1 * a9), L.tip_v + 0.05 - 0.8 * lift, 0.04 * flare, 0.02 + 0.008 * a9, depth, 16),
                fill=L.nostril,
            )
        if a9 > 0:
            col = _mix(L.skin, L.crease, 0.9 * a9)
            for k in range(3):
                v0 = L.eye_v + 0.03 + 0.05 * k
                self._line(d, L, [-0.08, -0.03, 0.03, 0.08], [v0 + 0.012, v0, v0, v0 + 0.012], depth, col, 0.6)

    def _chin(self, d, L: _Layout, a17: float, a25: float, drop: float) -> None:
        """Chin: mentolabial sulcus under the lower lip (moves with it); AU17 lifts the chin boss."""
        lip_bot = L.mouth_v + L.tl + LIP_PART * a25 + JAW_LIP * drop
        sv = lip_bot + 0.07 - 0.035 * a17
        self._line(d, L, [-0.12, -0.05, 0.05, 0.12], [sv + 0.01, sv, sv, sv + 0.01], 0.5, _mix(L.skin, L.crease, 0.18 + 0.6 * a17), 0.6)
        if a17 > 0:
            cv = 0.86 + drop - 0.05 * a17
            d.polygon(self._ellipse(L, 0.0, cv + 0.03, 0.17, 0.07, 0.5, 16), fill=_mix(L.skin, L.crease, 0.4 * a17))
            for k, (sc, al) in enumerate(((1.0, 0.35), (0.7, 0.7), (0.4, 1.0))):
                d.polygon(self._ellipse(L, 0.0, cv - 0.01 * k, 0.17 * sc, 0.075 * sc, 0.5, 16), fill=_mix(L.skin, L.light, al * a17))
            col = _mix(L.skin, L.crease, 0.75 * a17)
            for du, dv in ((0.0, 0.0), (-0.06, -0.015), (0.06, -0.015), (-0.035, 0.035), (0.035, 0.035)):
                self._circle(d, L, du, cv + dv, 0.02, 0.5, col)

    def _mouth(self, d, L: _Layout, a12: float, a15: float, a17: float, a20: float, a25: float, drop: float) -> None:
        """Lips and mouth opening from corner positions, centre height and gap (see module doc)."""
        depth = 0.7
        s = _SM
        cu = L.mw + 0.09 * a12 + 0.16 * a20 - 0.03 * a15
        cv = L.mouth_v - 0.1 * a12 + 0.09 * a15 + 0.012 * a20 + L.sag + JAW_CORNER * drop - 0.01 * a17
        v0 = L.mouth_v - 0.04 * a17
        u = s * cu
        ui = v0 + (cv - v0) * np.abs(s) ** 1.6
        gap_c = LIP_PART * a25 + JAW_LIP * drop
        gap = gap_c * (1 - s**2) ** 0.6
        li = ui + gap
        tu = L.tu * (1.0 - 0.45 * a20 - 0.15 * a12)
        tl = L.tl * (1.0 - 0.45 * a20 - 0.1 * a12) + 0.025 * a17
        uo = ui - tu * _SM_ENV * _SM_BOW
        lo = li + tl * _SM_ENV**0.8
        ur = u[::-1]
        if gap_c > 0.002:
            d.polygon(self._pts(L, np.concatenate([u, ur]), np.concatenate([ui, li[::-1]]), depth), fill=(70, 22, 28))
            th = np.minimum(gap, LIP_PART)  # parted lips show teeth; the dark mouth only with the jaw down
            d.polygon(self._pts(L, np.concatenate([u, ur]), np.concatenate([ui, (ui + th)[::-1]]), depth), fill=(238, 234, 222))
            if gap_c > 0.1:
                tb = np.minimum(np.maximum(gap - 0.1, 0.0), 0.035)
                d.polygon(self._pts(L, np.concatenate([u, ur]), np.concatenate([li - tb, li[::-1]]), depth), fill=(225, 220, 210))
        d.polygon(self._pts(L, np.concatenate([u, ur]), np.concatenate([uo, ui[::-1]]), depth), fill=L.lip)
        d.polygon(self._pts(L, np.concatenate([u, ur]), np.concatenate([li, lo[::-1]]), depth), fill=L.lip_low)
        self._line(d, L, u, ui, depth, L.lip_line, 0.55)
        for sg in (-1.0, 1.0):
            x = sg * cu
            if a12 > 0:  # smile creases (cheek bulge) beside the corners
                self._line(d, L, [x + sg * 0.05, x + sg * 0.08, x + sg * 0.065], [cv - 0.07, cv - 0.01, cv + 0.05], depth, _mix(L.skin, L.crease, 0.85 * a12), 0.7)
            if a15 > 0:  # depressor lines down from the corners
                self._line(d, L, [x + sg * 0.015, x + sg * 0.04, x + sg * 0.05], [cv + 0.015, cv + 0.07, cv + 0.12], depth, _mix(L.skin, L.crease, 0.85 * a15), 0.7)
            if a20 > 0:  # risorius dimple beside the stretched corner
                self._line(d, L, [x + sg * 0.05, x + sg * 0.06, x + sg * 0.05], [cv - 0.05, cv, cv + 0.05], depth, _mix(L.skin, L.crease, 0.85 * a20), 0.7)

    def _hair(self, d, p: PuppetIdentity, L: _Layout) -> None:
        """Hair cap over the cranium above the hairline (style-dependent volume)."""
        style = p.hair_style
        if style == "bald":
            if L.elderly or p.age_group == "adult":  # horseshoe at the sides
                for sg in (-1.0, 1.0):
                    d.polygon(self._pts(L, sg * np.array([0.86, 1.05, 1.06, 0.96]), np.array([-0.5, -0.4, -0.02, -0.05])), fill=_mix(L.hair, L.skin, 0.2))
            return
        vol = {"buzz": 1.02, "short": 1.08, "long": 1.09, "bun": 1.06, "curly": 1.12}[style]
        col = _mix(L.hair, L.skin, 0.45) if style == "buzz" else L.hair
        t = np.linspace(np.pi, 2 * np.pi, 19)
        hl = L.hairline - (0.04 if style == "buzz" else 0.0)
        uh = np.linspace(0.97, -0.97, 11)
        vh = hl + (-0.06 - hl) * np.abs(uh / 0.97) ** 2.5
        if style != "long" and p.age_group != "child":
            vh = vh + 0.05 * np.exp(-(((uh - 0.35) / 0.25) ** 2))  # a side parting dip
        u = np.concatenate([vol * np.cos(t), [1.0], uh, [-1.0]])
        v = np.concatenate([vol * np.sin(t) - 0.02, [-0.02], vh, [-0.02]])
        d.polygon(self._pts(L, u, v), fill=col)
        if style == "curly":
            for tt in np.linspace(np.pi * 1.05, np.pi * 1.95, 9):
                self._circle(d, L, vol * math.cos(tt), vol * math.sin(tt) - 0.02, 0.13, 0.0, col)
        elif style == "bun":
            self._circle(d, L, 0.0, -1.12, 0.2, 0.0, col)
        if style in ("short", "long", "curly", "bun"):
            self._line(d, L, [0.35, 0.3, 0.2], [hl + 0.04, -0.75, -1.0], 0.0, L.hair_dark, 0.6)

    def _glasses(self, d, p: PuppetIdentity, L: _Layout) -> None:
        depth = 0.65
        col = p.glasses_color
        w = self._lw(0.7)
        rx, ry = L.ew + 0.08, 0.15 * (L.ew / 0.2)
        for sg in (-1.0, 1.0):
            cu, cv = sg * L.eye_u, L.eye_v + 0.01
            if p.glasses_style == "round":
                c, s = _C24, _S24
            else:  # superellipse: a rounded rectangle
                c = np.sign(_C24) * np.abs(_C24) ** 0.4
                s = np.sign(_S24) * np.abs(_S24) ** 0.4
            pts = self._pts(L, np.append(cu + rx * c, cu + rx * c[0]), np.append(cv + ry * s, cv + ry * s[0]), depth)
            d.line(pts, fill=col, width=w)
            self._line(d, L, [sg * (L.eye_u + rx), sg * 0.97], [cv - 0.02, cv - 0.04], depth * 0.5, col, 0.6)
        bu = L.eye_u - rx
        self._line(d, L, [-bu, -0.4 * bu, 0.4 * bu, bu], [L.eye_v - 0.03, L.eye_v - 0.06, L.eye_v - 0.06, L.eye_v - 0.03], depth, col, 0.6)

    # ------------------------------------------------------------------ lighting

    def _light(self, arr: np.ndarray, p: PuppetIdentity) -> np.ndarray:
        """A soft directional shading gradient over the image (multiplicative, so it never moves edges)."""
        ls = p.light_strength
        if ls <= 0:
            return arr.copy()
        c, s = math.cos(p.light_angle), math.sin(p.light_angle)
        shade = (1.0 - 0.25 * ls) + (1.2 * ls * c) * self._gx + (1.2 * ls * s) * self._gy
        out = arr * shade[:, :, None]
        np.clip(out, 0, 255, out=out)
        return (out + 0.5).astype(np.uint8)

    # ------------------------------------------------------------------ regions

    def _to_mask(self, img: Image.Image, dilate: int = 1) -> np.ndarray:
        if self.supersample > 1:
            img = img.reduce(self.supersample)
        m = np.asarray(img) > 0
        for _ in range(dilate):
            g = m.copy()
            g[1:, :] |= m[:-1, :]
            g[:-1, :] |= m[1:, :]
            g[:, 1:] |= m[:, :-1]
            g[:, :-1] |= m[:, 1:]
            g[1:, 1:] |= m[:-1, :-1]
            g[:-1, :-1] |= m[1:, 1:]
            g[1:, :-1] |= m[:-1, 1:]
            g[:-1, 1:] |= m[1:, :-1]
            m = g
        return m

    def _box(self, d, L: _Layout, u0: float, u1: float, v0: float, v1: float, depth: float) -> None:
        d.polygon(self._pts(L, np.array([u0, u1, u1, u0]), np.array([v0, v0, v1, v1]), depth), fill=255)

    def _region(self, p: PuppetIdentity, au: int) -> np.ndarray:
        """Draw AU `au`'s anatomical zone (covering every intensity of every AU) as a mask."""
        L = self._layout(p)
        img = Image.new("L", (L.S, L.S), 0)
        d = ImageDraw.Draw(img)
        bv, ev = L.brow_v, L.eye_v
        brow_u = L.brow_in + L.brow_len + 0.06
        if au in (1, 2):
            self._box(d, L, -brow_u, brow_u, bv - 0.39, bv - L.brow_arch + 0.095, 0.55)
        elif au == 4:
            self._box(d, L, -brow_u, brow_u, bv - L.brow_arch - 0.07, bv + 0.145, 0.65)
        elif au == 5:
            for sg in (-1.0, 1.0):
                cu = sg * L.eye_u
                top = ev - L.eh_up * 1.7 - 0.1
                self._box(d, L, cu - L.ew - 0.05, cu + L.ew + 0.05, top, ev + 0.03, 0.6)
        elif au == 6:
            for sg in (-1.0, 1.0):
                cu = sg * L.eye_u
                inner, outer = cu - sg * (L.ew + 0.03), cu + sg * (L.ew + 0.2)
                self._box(d, L, min(inner, outer), max(inner, outer), ev - 0.02, ev + 0.45, 0.5)
                x0 = cu + sg * (L.ew - 0.02)
                self._box(d, L, min(x0, outer), max(x0, outer), ev - 0.075, ev + 0.1, 0.5)
        elif au == 9:
            nw = L.nose_w + 0.16
            self._box(d, L, -nw, nw, ev + 0.0, L.tip_v + 0.11, 0.9)
            for sg in (-1.0, 1.0):  # upper nasolabial folds
                u0 = sg * (L.nose_w + 0.02)
                u1 = sg * (L.nose_w + 0.06 + 0.6 * (L.mw - L.nose_w) + 0.1)
                self._box(d, L, min(u0, u1), max(u0, u1), L.tip_v - 0.02, L.tip_v + 0.05 + 0.6 * (L.mouth_v - L.tip_v) + 0.04, 0.7)
        elif au in (12, 15, 20, 25):
            mu = L.mw + 0.09 + 0.16 + 0.12
            top = L.mouth_v - L.tu - 0.1 - 0.09
            bot = L.mouth_v + L.tl + 0.03 + LIP_PART + JAW_LIP * JAW_DROP + 0.1
            if au == 15:
                bot = max(bot, L.mouth_v + L.sag + 0.09 + JAW_CORNER * JAW_DROP + 0.14)
            self._box(d, L, -mu, mu, top, bot, 0.7)
        elif au == 17:
            mu = L.mw + 0.12
            top = L.mouth_v - L.tu - 0.06
            self._box(d, L, -mu, mu, top, 1.0 + JAW_DROP + 0.02, 0.6)
            img2 = Image.new("L", (L.S, L.S), 0)
            ImageDraw.Draw(img2).polygon(self._outline(L, JAW_DROP, 1.03), fill=255)
            return self._to_mask(img, 1) & self._to_mask(img2, 1)
        elif au == 26:
            # the lower face at an exaggerated jaw drop, widened a little, cut above the mouth
            u, v = self._outline_uv(L, JAW_DROP + 0.05)
            cut = min(JAW_PIVOT, L.mouth_v - L.tu - 0.1) - 0.03
            keep = v >= cut
            uu, vv = u[keep] * 1.04, v[keep]
            order = np.argsort(np.arctan2(vv - 0.6, uu))
            uu, vv = uu[order], vv[order]
            uu = np.concatenate([[1.04 * 1.05], uu, [-1.04 * 1.05]])
            vv = np.concatenate([[cut], vv, [cut]])
            d.polygon(self._pts(L, uu, vv, 0.0), fill=255)
            # the mouth corners/lower lip ride on the jaw (features shift with pose depth)
            mu = L.mw + 0.09 + 0.16 + 0.08
            self._box(d, L, -mu, mu, L.mouth_v - L.tu - 0.1, 1.0 + JAW_DROP, 0.7)
        return self._to_mask(img, 1)
