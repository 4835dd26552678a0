"""Identity sources: who each candidate is, and the exemplar and inpainting mask MAUGen is conditioned on.

`identities.source=puppet` draws procedural identities (the embedded default and the test domain:
the renderer's neutral face is the exemplar, its face region the mask). `identities.source=pool`
draws real exemplar photos from a pool (pipelines/identities/pool.py: a folder, parquet or
webdataset shards, local or s3://), masked by the user's mask, else a face detector, else a
centred ellipse (pipelines/identities/masks.py). Everything after this module - generate, detect,
checks, write - is the same for both.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

from pipelines.identities.pool import AGE_GROUPS, SKIN_GROUPS, ExemplarPool, PoolError, PoolIdentity
from pipelines.puppet import PuppetIdentity, PuppetRenderer
from pipelines.puppet.identity import sample_identity
from pipelines.puppet.renderer import ALLOWED_SIZES

from .config import ConfigError, FactoryConfig, PlanConfig

log = logging.getLogger(__name__)

Identity = Union[PuppetIdentity, PoolIdentity]


@dataclass
class Exemplar:
    """What MAUGen is conditioned on for one candidate, or why there is nothing (`error`)."""

    image: np.ndarray | None  # uint8 (S, S, 3)
    mask: np.ndarray | None  # float32 (S, S): 1 where the face is to be generated
    mask_source: str | None  # puppet, user, detector or ellipse
    error: str | None = None


def identity_from_json(text: str) -> Identity:
    """A sample's `identity` column back to its identity (pool entries carry source=pool)."""
    d = json.loads(text)
    return PoolIdentity.model_validate(d) if d.get("source") == "pool" else PuppetIdentity.model_validate(d)


class PuppetSource:
    """Procedural identities: any skin and age group, exemplars rendered at any corpus size."""

    kind = "puppet"

    def __init__(self, cfg: FactoryConfig):
        self.supersample = cfg.puppet.supersample
        self._renderers: dict[int, PuppetRenderer] = {}

    def pick(
        self, rng: np.random.Generator, skin_group: int, age_group: str, size: int, skipped: list[str]
    ) -> PuppetIdentity:
        return sample_identity(rng, skin_group=skin_group, age_group=age_group)

    def exemplars(self, identities: Sequence[Identity], size: int) -> list[Exemplar]:
        """The neutral render and face mask of each identity; rendered at the largest renderer size
        up to `size` and resized when the corpus is larger (a 512 px MAUGen on puppet identities)."""
        native = max([s for s in ALLOWED_SIZES if s <= size] or [min(ALLOWED_SIZES)])
        r = self._renderers.get(native)
        if r is None:
            r = self._renderers[native] = PuppetRenderer(size=native, supersample=self.supersample)
        images, masks = r.exemplars(list(identities))
        out = []
        for img, m in zip(images, masks):
            if native != size:
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))
                m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)) / 255.0
            out.append(Exemplar(img, np.asarray(m, dtype=np.float32), "puppet"))
        return out

    def content_hash(self) -> str | None:
        return None

    def unbalanced_axes(self) -> list[str]:
        return []

    def check_plan(self, plan: PlanConfig) -> None:
        return None


class PoolSource:
    """Real exemplar photos of a pool, the build's side of its split, drawn within the plan's cell
    on the axes the pool's attributes cover."""

    kind = "pool"

    def __init__(self, cfg: FactoryConfig):
        from pipelines.identities.masks import FaceMasker

        ic = cfg.identities
        self.uri = ic.pool
        self.pool = ExemplarPool(ic.pool)
        self.indices = self.pool.split(ic.split, ic.train_share)
        if not self.indices:
            raise ConfigError(
                f"config error: identities: the pool {ic.pool} has no {ic.split} identities under train_share="
                f"{ic.train_share}; lower identities.train_share or add photos"
            )
        self.axes = self.pool.axes()
        self.masker = FaceMasker(ic.masks)
        self.by_cell: dict[tuple, list[int]] = defaultdict(list)
        self._by_key: dict[tuple, list[int]] = {}
        self.cache_size = 256
        self._cache: OrderedDict[tuple[int, int], Exemplar] = OrderedDict()
        self._unusable: dict[tuple[int, int], str] = {}
        for i in self.indices:
            ident = self.pool.identity(i)
            self.by_cell[self._key(ident.skin_group, ident.age_group)].append(i)

    def _key(self, skin: int | None, age: str | None) -> tuple:
        return (skin if self.axes["skin_group"] else None, age if self.axes["age_group"] else None)

    def pick(
        self, rng: np.random.Generator, skin_group: int, age_group: str, size: int, skipped: list[str]
    ) -> PoolIdentity:
        """A usable exemplar of the plan cell's groups; where the pool has none of that combination,
        one of the same skin group, else of the same age group, else any (check_plan makes sure each
        planned group exists; the stats count each sample by its own attributes).

        Starting at a random member, the first whose photo reads and shows a face (at the corpus
        size) is taken; the names of those passed over are appended to `skipped`. Usability is a pure
        function of the photo, so a shard re-run picks the same identities."""
        skin, age = self._key(skin_group, age_group)
        for key in ((skin, age), (skin, None), (None, age), (None, None)):
            members = self._members(key)
            if not members:
                continue
            start = int(rng.integers(len(members)))
            for i in members[start:] + members[:start]:
                ex = self._exemplar(i, size)
                if ex.error is None:
                    return self.pool.identity(i)
                skipped.append(ex.error)
        raise ConfigError(
            f"config error: no exemplar of the identity pool {self.uri} can be used at {size} px (every photo is "
            f"unreadable or shows no face; last: {skipped[-1] if skipped else '-'}); check the photos or set "
            "identities.masks=ellipse"
        )

    def _exemplar(self, i: int, size: int) -> Exemplar:
        """Exemplar i read and masked, memoised (the few most recent; the verdict of every one tried)."""
        key = (i, size)
        ex = self._cache.get(key)
        if ex is not None:
            self._cache.move_to_end(key)
            return ex
        if key in self._unusable:
            return Exemplar(None, None, None, self._unusable[key])
        ex = self._read(i, size)
        if ex.error is not None:
            self._unusable[key] = ex.error
        else:
            self._cache[key] = ex
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return ex

    def _read(self, i: int, size: int) -> Exemplar:
        from pipelines.identities.masks import FaceNotFound

        name = self.pool.entries[i].name
        try:
            image, user_mask = self.pool.read(i, size)
            m = self.masker(image, name, user_mask=user_mask)
        except (ValueError, FaceNotFound, OSError) as err:
            return Exemplar(None, None, None, f"{name}: {str(err).splitlines()[0]}")
        return Exemplar(image, m.mask.astype(np.float32), m.source)

    def _members(self, key: tuple) -> list[int]:
        got = self._by_key.get(key)
        if got is None:
            got = self._by_key[key] = sorted(
                i for k, ms in self.by_cell.items() for i in ms
                if all(want is None or have == want for want, have in zip(key, k))
            )
        return got

    def exemplars(self, identities: Sequence[Identity], size: int) -> list[Exemplar]:
        """Each exemplar read and masked; one that can no longer be read comes back with its error
        (its candidate is rejected under `exemplar`, the shard goes on)."""
        return [self._exemplar(ident.index, size) for ident in identities]

    def content_hash(self) -> str | None:
        return self.pool.content_hash()

    def unbalanced_axes(self) -> list[str]:
        return [a for a, ok in self.axes.items() if not ok]

    def check_plan(self, plan: PlanConfig) -> None:
        """Every group the plan weights on an axis the pool covers must have exemplars."""
        have_skin = {k[0] for k in self.by_cell}
        have_age = {k[1] for k in self.by_cell}
        if self.axes["skin_group"]:
            for g, w in zip(SKIN_GROUPS, plan.skin_groups):
                if w > 0 and g not in have_skin:
                    raise ConfigError(
                        f"config error: plan.skin_groups gives group {g} weight {w:g}, but the identity pool {self.uri} "
                        f"has no such exemplar; set its weight to 0 (plan.skin_groups) or add photos"
                    )
        if self.axes["age_group"]:
            for g in AGE_GROUPS:
                w = plan.age_groups.get(g, 0.0)
                if w > 0 and g not in have_age:
                    raise ConfigError(
                        f"config error: plan.age_groups.{g} has weight {w:g}, but the identity pool {self.uri} has no "
                        f"{g} exemplar; set --set plan.age_groups.{g}=0 or add photos"
                    )


@functools.lru_cache(maxsize=4)
def _open(identities_json: str, puppet_json: str) -> PuppetSource | PoolSource:
    cfg = FactoryConfig.model_validate({"identities": json.loads(identities_json), "puppet": json.loads(puppet_json)})
    return PoolSource(cfg) if cfg.identities.source == "pool" else PuppetSource(cfg)


def identity_source(cfg: FactoryConfig) -> PuppetSource | PoolSource:
    """The build's identity source, opened once per process (a pool's listing is read once); a pool
    that cannot be opened is a ConfigError naming the file and the fix."""
    try:
        return _open(cfg.identities.model_dump_json(), cfg.puppet.model_dump_json())
    except PoolError as err:
        raise ConfigError(f"config error: identities.pool: {err}") from None
