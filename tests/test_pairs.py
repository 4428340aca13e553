"""Matching pairs: construction follows the protocol, storage round-trips, bad files fail clearly."""

import os

import numpy as np
import pytest

from sce_mae_jax.data import pairs as P
from sce_mae_jax.data.synthetic import SyntheticFaces


class DotSource:
    """Black images with a bright dot at each landmark, and a per-image tag colour in the corner pixel region,
    so the tests can see where landmarks and images went."""

    def __init__(self, n=6):
        self.n = n
        rng = np.random.default_rng(0)
        # Well-separated points (>= 15 px apart) so each dot's centroid is unambiguous.
        base = np.array([[45, 50], [90, 50], [68, 70], [50, 92], [88, 92]], np.float32)
        self.lm = (base + rng.uniform(-3, 3, (n, 5, 2))).astype(np.float32)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = np.zeros((136, 136, 3), np.uint8)
        yy, xx = np.mgrid[0:136, 0:136]
        for x, y in self.lm[i]:
            img[(xx - x) ** 2 + (yy - y) ** 2 <= 2.25, 0] = 255
        img[40:96, 40:96, 1] = 10 * (i + 1)  # identity tag in the green channel
        return {"image": img, "landmarks": self.lm[i], "identity": np.int32(i), "index": np.int64(i)}


@pytest.fixture(scope="module")
def dot_pairs():
    return P.make_matching_pairs(DotSource(6), num_images=6, seed=0)


def test_layout_and_kinds(dot_pairs):
    p = dot_pairs
    assert p["src_images"].shape == (6, 96, 96, 3) and p["src_images"].dtype == np.uint8
    assert p["tgt_images"].shape == (6, 96, 96, 3)
    assert p["src_landmarks"].shape == (6, 5, 2) and p["src_landmarks"].dtype == np.float32
    assert p["kind"].tolist() == [0, 1, 0, 1, 0, 1] and p["kind"].dtype == np.int8
    # One source image per couple, shared by its same and different pair.
    np.testing.assert_array_equal(p["src_images"][0], p["src_images"][1])
    assert not np.array_equal(p["src_images"][0], p["src_images"][2])


def test_targets_come_from_right_images(dot_pairs):
    p = dot_pairs
    for k in range(6):
        b = k // 2
        tag_src = np.median(p["src_images"][k][45:51, 45:51, 1])  # 96-px centre of the 136-px tag
        tag_tgt = np.median(p["tgt_images"][k][45:51, 45:51, 1])
        assert abs(tag_src - 10 * (2 * b + 1)) <= 2
        expect = 2 * b + 1 if p["kind"][k] == 0 else 2 * b + 2
        assert abs(tag_tgt - 10 * expect) <= 2


def test_landmarks_follow_content(dot_pairs):
    p = dot_pairs
    yy, xx = np.mgrid[0:96, 0:96]
    for imgs, lms in ((p["src_images"], p["src_landmarks"]), (p["tgt_images"], p["tgt_landmarks"])):
        for k in range(6):
            for q in lms[k]:
                w = imgs[k][..., 0].astype(float) * ((np.abs(xx - q[0]) <= 4) & (np.abs(yy - q[1]) <= 4))
                c = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
                assert np.linalg.norm(c - q) < 1.0


def test_deterministic_and_seeded():
    src = SyntheticFaces("match", num_examples=4)
    a = P.make_matching_pairs(src, num_images=4, seed=0)
    b = P.make_matching_pairs(src, num_images=4, seed=0)
    c = P.make_matching_pairs(src, num_images=4, seed=1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["src_images"], c["src_images"])
    with pytest.raises(ValueError):
        P.make_matching_pairs(src, num_images=3)


def test_round_trip_and_cache(tmp_path, dot_pairs, monkeypatch):
    path = tmp_path / "sub" / "pairs.npz"
    P.save_pairs(path, dot_pairs)
    back = P.load_pairs(path)
    for k in dot_pairs:
        np.testing.assert_array_equal(back[k], dot_pairs[k])
        assert back[k].dtype == dot_pairs[k].dtype
    assert os.listdir(path.parent) == ["pairs.npz"]  # no temp files left behind

    cache = tmp_path / "cache.npz"
    first = P.get_or_make_pairs(DotSource(6), cache, num_images=6)
    monkeypatch.setattr(P, "make_matching_pairs", lambda *a, **k: pytest.fail("regenerated"))
    second = P.get_or_make_pairs(DotSource(6), cache, num_images=6)
    np.testing.assert_array_equal(first["tgt_landmarks"], second["tgt_landmarks"])
    with pytest.raises(ValueError, match="holds 6 pairs"):
        P.get_or_make_pairs(DotSource(6), cache, num_images=4)


def test_bad_files(tmp_path, dot_pairs):
    bad = dict(dot_pairs)
    del bad["tgt_landmarks"]
    np.savez(tmp_path / "missing.npz", **bad)
    with pytest.raises(ValueError, match=r"tgt_landmarks.*expected layout"):
        P.load_pairs(tmp_path / "missing.npz")
    wrong = dict(dot_pairs, src_images=dot_pairs["src_images"].astype(np.float32))
    np.savez(tmp_path / "dtype.npz", **wrong)
    with pytest.raises(ValueError, match="src_images.*uint8"):
        P.load_pairs(tmp_path / "dtype.npz")
    short = dict(dot_pairs, kind=dot_pairs["kind"][:4])
    with pytest.raises(ValueError, match="src_images"):
        P.save_pairs(tmp_path / "short.npz", short)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        P.load_pairs(tmp_path / "junk.npz")
    assert not (tmp_path / "short.npz").exists()


def test_import_foreign_layout(dot_pairs):
    # Another code base: channels-first float images in [0,1] at 136 px, (y, x) points, other key names.
    full = np.zeros((6, 136, 136, 3), np.uint8)
    full[:, 20:116, 20:116] = dot_pairs["src_images"]
    foreign = {
        "im1": np.transpose(full, (0, 3, 1, 2)).astype(np.float32) / 255.0,
        "im2": np.transpose(full, (0, 3, 1, 2)).astype(np.float32) / 255.0,
        "kp1": (dot_pairs["src_landmarks"] + 20)[..., ::-1],
        "kp2": (dot_pairs["tgt_landmarks"] + 20)[..., ::-1],
    }
    got = P.import_pairs(foreign, key_map={"src_images": "im1", "tgt_images": "im2", "src_landmarks": "kp1",
                                           "tgt_landmarks": "kp2"}, point_order="yx", frame=136,
                         kind=dot_pairs["kind"])
    np.testing.assert_array_equal(got["src_images"], dot_pairs["src_images"])
    np.testing.assert_allclose(got["tgt_landmarks"], dot_pairs["tgt_landmarks"], atol=1e-5)
    assert got["kind"].dtype == np.int8
    with pytest.raises(ValueError, match="kind"):
        P.import_pairs({k: foreign[k] for k in foreign},
                       key_map={"src_images": "im1", "tgt_images": "im2", "src_landmarks": "kp1",
                                "tgt_landmarks": "kp2"})
