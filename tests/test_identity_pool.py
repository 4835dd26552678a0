"""Identity pools of real exemplar photos: folder, parquet and webdataset layouts, read lazily by index."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.identities.images import decode_face, decode_mask
from pipelines.identities.pool import ExemplarPool, PoolError, encode_png


def _photo(color: tuple[int, int, int], size=(40, 30)) -> np.ndarray:
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = color
    img[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255 - np.array(color)
    return img


def _mask(size=(40, 30)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[5:25, 10:30] = 255
    return m


def _folder(tmp_path):
    d = tmp_path / "pool"
    (d / "masks").mkdir(parents=True)
    Image.fromarray(_photo((200, 10, 10))).save(d / "b.jpg", quality=95)
    Image.fromarray(_photo((10, 200, 10))).save(d / "a.png")
    Image.fromarray(_mask()).save(d / "masks" / "a.png")
    (d / "attributes.csv").write_text("name,skin_group,age_group,note\na.png,2,adult,x\nb.jpg,5,,\n")
    return d


def test_folder_pool_reads_lazily_with_attributes_and_masks(tmp_path):
    pool = ExemplarPool(str(_folder(tmp_path)))
    assert pool.kind == "folder" and len(pool) == 2
    a, b = pool.identity(0), pool.identity(1)
    assert (a.name, a.skin_group, a.age_group) == ("a.png", 2, "adult")
    assert (b.name, b.skin_group, b.age_group) == ("b.jpg", 5, None)
    assert pool.axes() == {"skin_group": True, "age_group": False}
    img, mask = pool.read(0, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (10, 200, 10)
    assert mask is not None and mask.shape == (16, 16) and 0 < mask.mean() < 1
    img_b, mask_b = pool.read(1, 16)
    assert mask_b is None and abs(int(img_b[0, 0, 0]) - 200) < 8


def test_pool_hash_changes_with_the_pool_and_split_is_disjoint(tmp_path):
    d = _folder(tmp_path)
    h = ExemplarPool(str(d)).content_hash()
    assert ExemplarPool(str(d)).content_hash() == h
    Image.fromarray(_photo((1, 2, 3))).save(d / "c.png")
    pool = ExemplarPool(str(d))
    assert pool.content_hash() != h
    train, build = pool.split("train", 0.5), pool.split("build", 0.5)
    assert sorted(train + build) == [0, 1, 2] and not set(train) & set(build)
    assert pool.split("all", 0.5) == [0, 1, 2]


def test_parquet_and_webdataset_pools(tmp_path):
    rows = [
        {"name": "p0", "image": encode_png(_photo((50, 60, 70))), "mask": encode_png(_mask()), "age_group": "child"},
        {"name": "p1", "image": encode_png(_photo((90, 60, 70))), "mask": encode_png(_mask()), "age_group": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet", row_group_size=1)
    pool = ExemplarPool(str(tmp_path / "pool.parquet"))
    assert pool.kind == "parquet" and [pool.identity(i).name for i in range(2)] == ["p0", "p1"]
    assert pool.identity(0).age_group == "child" and pool.identity(1).age_group is None
    img, mask = pool.read(1, 20)
    assert tuple(img[0, 0]) == (90, 60, 70) and mask.shape == (20, 20)

    wds_dir = tmp_path / "wds"
    wds_dir.mkdir()
    with tarfile.open(wds_dir / "pool-000.tar", "w") as tar:
        for key, color, attrs in (("k0", (1, 200, 1), {"skin_group": 3}), ("k1", (200, 1, 1), {})):
            for name, data in ((f"{key}.png", encode_png(_photo(color))), (f"{key}.json", json.dumps(attrs).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pool = ExemplarPool(str(wds_dir))
    assert pool.kind == "webdataset" and len(pool) == 2 and pool.identity(0).skin_group == 3
    assert tuple(pool.read(1, 8)[0][0, 0]) == (200, 1, 1) and pool.read(1, 8)[1] is None


def test_a_bad_pool_is_one_line_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        ExemplarPool(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoolError, match="holds no exemplars"):
        ExemplarPool(str(tmp_path / "empty"))
    d = _folder(tmp_path)
    (d / "notes.txt").write_text("hello")
    with pytest.raises(PoolError, match=r"notes\.txt, which is not an image.*move it out"):
        ExemplarPool(str(d))
    (d / "notes.txt").unlink()
    (d / "attributes.csv").write_text("name,skin_group\na.png,9\n")
    with pytest.raises(PoolError, match=r"a\.png has skin_group='9'; the groups are 0, 1"):
        ExemplarPool(str(d))
    (d / "attributes.csv").write_text("name,age_group\na.png,teen\n")
    with pytest.raises(PoolError, match=r"age_group='teen'; the groups are child"):
        ExemplarPool(str(d))
    (d / "attributes.csv").write_text("name,age_group\nzzz.png,adult\n")
    with pytest.raises(PoolError, match=r"names \['zzz\.png'\].*not images of the pool"):
        ExemplarPool(str(d))
    (d / "attributes.csv").unlink()
    (d / "broken.png").write_bytes(b"garbage")
    pool = ExemplarPool(str(d))  # opening reads the listing only: the bad file fails where it is read
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png.*replace or remove"):
        pool.read([e.name for e in pool.entries].index("broken.png"), 16)


def test_decoders_crop_resize_and_refuse_empty_masks(tmp_path):
    img = decode_face(encode_png(_photo((10, 20, 30), size=(60, 20))), 10, "x")
    assert img.shape == (10, 10, 3)
    with pytest.raises(ValueError, match="mask m is empty"):
        decode_mask(encode_png(np.zeros((8, 8), np.uint8)), 8, "m")
    with pytest.raises(ValueError, match="mask m is full"):
        decode_mask(encode_png(np.full((8, 8), 255, np.uint8)), 8, "m")
