"""Puppet identities: every parameter that makes one procedural person look like themselves.

An identity is a frozen pydantic model, so it can be hashed (render caches), serialised into a
sample's JSON (provenance) and validated when read back. `sample_identity` always draws every
field from the generator in the same order, then applies the fixed skin/age group: a given rng
state therefore yields "the same person" across skin or age groups, which tests and balanced
corpora rely on.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

#: Skin-tone groups 0..5, light to dark (a Monk/Fitzpatrick-like palette).
SKIN_TONE_GROUPS: int = 6
#: Age groups, youngest first.
AGE_GROUPS: tuple[str, ...] = ("child", "young_adult", "adult", "elderly")

#: Base RGB of each skin-tone group; luminance falls by >= 24 levels per group, more than the
#: within-group jitter (+-4 %), so group order survives jitter.
SKIN_PALETTE: tuple[tuple[int, int, int], ...] = (
    (246, 224, 205),
    (234, 196, 166),
    (212, 165, 125),
    (180, 130, 92),
    (138, 94, 64),
    (92, 62, 45),
)

HAIR_STYLES: tuple[str, ...] = ("bald", "buzz", "short", "long", "bun", "curly")
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 24, 22),
    "dark_brown": (62, 42, 30),
    "brown": (112, 76, 46),
    "auburn": (128, 60, 36),
    "blonde": (202, 168, 104),
    "red": (168, 78, 38),
    "grey": (152, 150, 148),
    "white": (226, 224, 218),
}
EYE_COLORS: dict[str, tuple[int, int, int]] = {
    "dark_brown": (58, 34, 20),
    "brown": (102, 62, 32),
    "hazel": (128, 100, 52),
    "green": (78, 122, 72),
    "blue": (70, 112, 172),
    "grey": (118, 130, 142),
}
GLASSES_STYLES: tuple[str, ...] = ("none", "round", "rect")

# Hair colour / style probabilities by age group (cumulative tables are built once).
_HAIR_COLOR_P: dict[str, dict[str, float]] = {
    "child": {"black": 0.3, "dark_brown": 0.25, "brown": 0.2, "auburn": 0.05, "blonde": 0.15, "red": 0.05},
    "young_adult": {"black": 0.3, "dark_brown": 0.25, "brown": 0.2, "auburn": 0.07, "blonde": 0.13, "red": 0.05},
    "adult": {"black": 0.25, "dark_brown": 0.25, "brown": 0.2, "auburn": 0.05, "blonde": 0.1, "red": 0.03, "grey": 0.12},
    "elderly": {"grey": 0.5, "white": 0.35, "dark_brown": 0.05, "black": 0.05, "brown": 0.05},
}
_HAIR_STYLE_P: dict[str, dict[str, float]] = {
    "child": {"short": 0.35, "long": 0.3, "bun": 0.1, "curly": 0.2, "buzz": 0.05},
    "young_adult": {"short": 0.3, "long": 0.3, "bun": 0.1, "curly": 0.15, "buzz": 0.1, "bald": 0.05},
    "adult": {"short": 0.35, "long": 0.2, "bun": 0.08, "curly": 0.12, "buzz": 0.12, "bald": 0.13},
    "elderly": {"short": 0.4, "long": 0.1, "bun": 0.1, "curly": 0.1, "buzz": 0.05, "bald": 0.25},
}
_GLASSES_P: dict[str, float] = {"child": 0.1, "young_adult": 0.2, "adult": 0.3, "elderly": 0.5}


def _pick(table: dict[str, float], u: float) -> str:
    """Inverse-CDF choice from a small probability table with one uniform draw."""
    total = sum(table.values())
    acc = 0.0
    for name, p in table.items():
        acc += p / total
        if u < acc:
            return name
    return next(reversed(table))


RGB = tuple[int, int, int]


class PuppetIdentity(BaseModel):
    """All parameters needed to render one puppet person (independent of the expression)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    skin_group: int = Field(ge=0, lt=SKIN_TONE_GROUPS, description="0 lightest .. 5 darkest")
    age_group: Literal["child", "young_adult", "adult", "elderly"]
    age: float = Field(0.5, ge=0.0, le=1.0, description="position inside the age group (wrinkle depth etc.)")
    skin_shade: float = Field(0.0, ge=-1.0, le=1.0, description="lighter/darker within the group (+-4 %)")
    skin_undertone: float = Field(0.0, ge=-1.0, le=1.0, description="cool (-) .. warm (+)")
    # face shape
    face_width: float = Field(1.0, ge=0.85, le=1.15)
    face_height: float = Field(1.0, ge=0.9, le=1.1)
    jaw_square: float = Field(0.5, ge=0.0, le=1.0, description="0 oval .. 1 square jaw")
    jaw_taper: float = Field(0.5, ge=0.0, le=1.0, description="0 wide jaw .. 1 narrow, pointed chin")
    # features
    eye_size: float = Field(1.0, ge=0.85, le=1.2)
    eye_spacing: float = Field(1.0, ge=0.9, le=1.1)
    eye_color: Literal["dark_brown", "brown", "hazel", "green", "blue", "grey"] = "brown"
    brow_thickness: float = Field(1.0, ge=0.6, le=1.5)
    brow_arch: float = Field(0.5, ge=0.0, le=1.0)
    nose_length: float = Field(1.0, ge=0.85, le=1.15)
    nose_width: float = Field(1.0, ge=0.8, le=1.25)
    mouth_width: float = Field(1.0, ge=0.85, le=1.15)
    lip_fullness: float = Field(1.0, ge=0.7, le=1.3)
    blush: float = Field(0.2, ge=0.0, le=1.0)
    # hair and accessories
    hair_style: Literal["bald", "buzz", "short", "long", "bun", "curly"] = "short"
    hair_color: Literal["black", "dark_brown", "brown", "auburn", "blonde", "red", "grey", "white"] = "brown"
    glasses: bool = False
    glasses_style: Literal["none", "round", "rect"] = "none"
    glasses_color: RGB = (40, 40, 40)
    background: RGB = (200, 210, 220)
    shirt_color: RGB = (80, 100, 140)
    # lighting and pose
    light_angle: float = Field(0.0, ge=-np.pi, le=np.pi, description="direction light comes from (radians, image plane)")
    light_strength: float = Field(0.15, ge=0.0, le=0.3)
    roll: float = Field(0.0, ge=-8.0, le=8.0, description="in-plane head tilt, degrees")
    yaw: float = Field(0.0, ge=-1.0, le=1.0, description="yaw-like: features shift sideways by depth")
    pitch: float = Field(0.0, ge=-1.0, le=1.0, description="pitch-like: features shift vertically by depth")
    shift_x: float = Field(0.0, ge=-1.0, le=1.0)
    shift_y: float = Field(0.0, ge=-1.0, le=1.0)
    scale: float = Field(1.0, ge=0.92, le=1.05)

    def skin_rgb(self) -> RGB:
        """The skin colour: group base, shaded and tinted within the group."""
        base = np.array(SKIN_PALETTE[self.skin_group], dtype=np.float64)
        rgb = base * (1.0 + 0.04 * self.skin_shade) + np.array([5.0, 0.0, -5.0]) * self.skin_undertone
        return tuple(int(round(c)) for c in np.clip(rgb, 0, 255))  # type: ignore[return-value]


def sample_identity(
    rng: np.random.Generator, skin_group: int | None = None, age_group: str | None = None
) -> PuppetIdentity:
    """A random identity, deterministic given the rng state.

    Every field is drawn in a fixed order whatever is fixed, so the same rng state gives the
    same person in another skin or age group (only age-dependent choices change).
    """
    if skin_group is not None and not (isinstance(skin_group, (int, np.integer)) and 0 <= skin_group < SKIN_TONE_GROUPS):
        raise ValueError(f"skin_group must be an int in 0..{SKIN_TONE_GROUPS - 1}, got {skin_group!r}")
    if age_group is not None and age_group not in AGE_GROUPS:
        raise ValueError(f"age_group must be one of {list(AGE_GROUPS)}, got {age_group!r}")
    u = rng.random(40)  # one fixed block of uniforms: field i always uses u[i]
    n = np.clip(rng.standard_normal(8), -2.5, 2.5) / 2.5  # bounded "normal-ish" shape params in [-1, 1]

    sg = int(u[0] * SKIN_TONE_GROUPS) if skin_group is None else int(skin_group)
    ag = AGE_GROUPS[int(u[1] * len(AGE_GROUPS))] if age_group is None else age_group

    hair_color = _pick(_HAIR_COLOR_P[ag], u[2])
    hair_style = _pick(_HAIR_STYLE_P[ag], u[3])
    glasses = bool(u[4] < _GLASSES_P[ag])
    glasses_style = ("round", "rect")[int(u[5] * 2)] if glasses else "none"
    eye_color = tuple(EYE_COLORS)[int(u[6] * len(EYE_COLORS))]
    if sg >= 3 and u[7] < 0.8:  # darker skin groups mostly have dark eyes and hair
        eye_color = ("dark_brown", "brown")[int(u[8] * 2)]
        if hair_color in ("blonde", "red", "auburn"):
            hair_color = "black"

    # muted background and shirt colours: a hue from u, low saturation
    def muted(h: float, light: float, sat: float) -> RGB:
        k = np.array([0.0, 2.0 / 3.0, 4.0 / 3.0]) * np.pi
        c = light + sat * np.cos(2 * np.pi * h - k)
        return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]

    background = muted(u[9], 120 + 110 * u[10], 20 + 35 * u[11])
    shirt = muted(u[12], 50 + 140 * u[13], 30 + 50 * u[14])
    g = int(20 + 90 * u[15])
    glasses_color = (g, int(g * (0.8 + 0.4 * u[16])), int(g * (0.8 + 0.4 * u[17])))

    child = ag == "child"
    return PuppetIdentity(
        skin_group=sg,
        age_group=ag,  # type: ignore[arg-type]
        age=float(u[18]),
        skin_shade=float(2 * u[19] - 1),
        skin_undertone=float(2 * u[20] - 1),
        face_width=float(1.0 + 0.12 * n[0]),
        face_height=float(1.0 + 0.08 * n[1]),
        jaw_square=float(u[21]),
        jaw_taper=float(u[22]) * (0.6 if child else 1.0),
        eye_size=float(np.clip(1.0 + 0.1 * n[2] + (0.1 if child else 0.0), 0.85, 1.2)),
        eye_spacing=float(1.0 + 0.08 * n[3]),
        eye_color=eye_color,  # type: ignore[arg-type]
        brow_thickness=float(np.clip((0.7 + 0.7 * u[23]) * (0.85 if child else 1.0), 0.6, 1.5)),
        brow_arch=float(u[24]),
        nose_length=float(1.0 + 0.12 * n[4]),
        nose_width=float(1.0 + 0.15 * n[5] + 0.05),
        mouth_width=float(1.0 + 0.12 * n[6]),
        lip_fullness=float(1.0 + 0.25 * n[7]),
        blush=float(u[25] * (0.8 if child else 0.45)),
        hair_style=hair_style,  # type: ignore[arg-type]
        hair_color=hair_color,  # type: ignore[arg-type]
        glasses=glasses,
        glasses_style=glasses_style,  # type: ignore[arg-type]
        glasses_color=glasses_color,
        background=background,
        shirt_color=shirt,
        light_angle=float((2 * u[26] - 1) * np.pi),
        light_strength=float(0.05 + 0.2 * u[27]),
        roll=float(6.0 * (2 * u[28] - 1)),
        yaw=float(2 * u[29] - 1),
        pitch=float(2 * u[30] - 1),
        shift_x=float(2 * u[31] - 1),
        shift_y=float(2 * u[32] - 1),
        scale=float(0.94 + 0.1 * u[33]),
    )
