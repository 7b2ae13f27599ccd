"""deploy.gallery: the one gallery of facetrain.identify and the service's /identify. Ranking (ties included),
rank-k rates and the enrolment cache, on small numpy galleries with a stand-in embedder (no model, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from facetrain.data.images import Preprocess
from facetrain.deploy.gallery import (
    CACHE_DIR,
    CACHE_FORMAT,
    CACHE_VERSION,
    Gallery,
    enrol,
    identification_rates,
    rank_identities,
)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _gallery(embeddings, labels, names=None) -> Gallery:
    labels = np.asarray(labels)
    names = names or [f"id{k}" for k in range(labels.max() + 1)]
    return Gallery("g", [f"img{k}" for k in range(len(labels))], labels, names, _unit(embeddings))


def _brute_force(gallery: Gallery, probe: np.ndarray, top_k: int) -> list[tuple[str, float, str]]:
    """The documented rule, spelled out: best image per identity, higher score first, then identity order;
    within an identity the first of its best-scoring images."""
    scores = gallery.embeddings.astype(np.float64) @ probe.astype(np.float64)
    rows = []
    for ident, name in enumerate(gallery.names):
        members = [i for i in range(len(scores)) if gallery.labels[i] == ident]
        best = max(members, key=lambda i: (scores[i], -i))
        rows.append((-scores[best], ident, name, gallery.paths[best]))
    return [(name, -neg, path) for neg, _, name, path in sorted(rows)[:top_k]]


def test_ranking_matches_the_rule_on_random_galleries():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_ids = int(rng.integers(2, 9))
        labels = np.sort(np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, 10)]))
        gallery = _gallery(rng.normal(size=(len(labels), 6)), labels)
        probes = _unit(rng.normal(size=(3, 6)))
        for k in (1, 3, n_ids, n_ids + 4):  # top_k beyond the identity count: every identity, once
            got = rank_identities(gallery, probes, k)
            assert len(got) == 3
            for probe, rows in zip(probes, got, strict=True):
                want = _brute_force(gallery, probe, k)
                assert [(r["identity"], r["image"]) for r in rows] == [(n, p) for n, _, p in want]
                assert np.allclose([r["score"] for r in rows], [s for _, s, _ in want], atol=1e-12)


def test_equal_scores_rank_in_gallery_order_and_name_the_first_best_image():
    # identities 0, 2 and 3 all reach the same best score 1.0 (identity 3 twice); identity 1 scores lower
    e = [[1, 0], [0, 1], [1, 0], [1, 0], [1, 0], [0.6, 0.8]]
    labels = [0, 1, 2, 3, 3, 1]
    gallery = _gallery(e, labels, names=["carol", "alice", "bob", "dave"])  # names need not be sorted
    probe = _unit([[1, 0]])
    rows = rank_identities(gallery, probe, 4)[0]
    assert [r["identity"] for r in rows] == ["carol", "bob", "dave", "alice"]  # ties: identity index order
    assert [r["image"] for r in rows] == ["img0", "img2", "img3", "img5"]  # dave: img3 before img4
    assert rows[0]["score"] == rows[1]["score"] == rows[2]["score"] == pytest.approx(1.0)
    # the same answer every time, and for the probe alone or among others (the service ranks one at a time)
    many = rank_identities(gallery, _unit([[0, 1], [1, 0], [1, 1]]), 4)
    assert many[1] == rows == rank_identities(gallery, probe, 4)[0]
    assert [r["identity"] for r in rank_identities(gallery, probe, 2)[0]] == ["carol", "bob"]


def test_all_equal_scores_keep_the_whole_gallery_order():
    gallery = _gallery(np.ones((12, 3)), np.repeat(np.arange(6), 2))
    rows = rank_identities(gallery, _unit([[1, 1, 1]]), 6)[0]
    assert [r["identity"] for r in rows] == [f"id{k}" for k in range(6)]
    assert [r["image"] for r in rows] == [f"img{2 * k}" for k in range(6)]


def test_identification_rates_count_ties_for_the_probe():
    # identity k enrolled by image 2k (its first), probed by image 2k + 1
    e = [[1, 0, 0], [1, 0, 0],  # id0: probe equals its own enrolled image -> rank 1
         [0, 1, 0], [1, 0, 0],  # id1: probe closest to id0 -> rank 2
         [0, 0, 1], [1, 1, 0]]  # id2: probe ties id0 and id1 (0.707), own 0 -> rank 3
    rates = identification_rates(_gallery(e, [0, 0, 1, 1, 2, 2]), (1, 2, 5))
    assert rates["n_probes"] == 3 and rates["n_enrolled_identities"] == 3
    assert rates["rank-1"] == pytest.approx(1 / 3) and rates["rank-2"] == pytest.approx(2 / 3)
    assert rates["rank-5"] == 1.0 and rates["mean_rank"] == pytest.approx(2.0)
    tie = _gallery([[1, 0], [1, 0], [1, 0], [1, 0]], [0, 0, 1, 1])  # every score equal: rank 1 for all
    assert identification_rates(tie, (1,))["rank-1"] == 1.0


# ----------------------------------------------------------------------------------------------------- cache


class StandIn:
    """The part of an embedder that enrolment uses: a weights file, metadata, and `embed` (numpy)."""

    def __init__(self, path: Path, scale: float = 1.0):
        self.path, self.scale = path, scale
        self.meta = {"model": {"backbone": "stand-in", "embedding_dim": 4}}
        self.preprocess = Preprocess(32, [0.5] * 3, [0.5] * 3)
        self.flip, self.precision, self.alignment = False, "no", None
        self.calls = 0

    def aligned_folder(self, folder, option) -> bool:
        return False

    def embed(self, paths, align=True) -> np.ndarray:
        self.calls += 1
        return _unit([[len(p) * self.scale, 1.0, i, 0.5] for i, p in enumerate(paths)])


def _folder(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    names = ["ann", "ben"]
    paths = []
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(2):
            p = root / name / f"{j}.png"
            p.write_bytes(b"x" * (k + j + 1))
            paths.append(str(p))
    return paths, np.array([0, 0, 1, 1]), names


def _model_and_gallery(tmp_path: Path) -> tuple[Path, Path, tuple]:
    """A stand-in bundle folder (its weights file is what the fingerprint hashes) and a 2 x 2 gallery."""
    model = tmp_path / "bundle"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    root = tmp_path / "gallery"
    return model, root, _folder(root)


def test_enrolment_cache_is_reused_until_the_folder_or_the_model_changes(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    embedder = StandIn(model)
    built = enrol(embedder, root, scan, cache=True)
    assert built.cache_status == "built" and built.cache_file.parent == root / CACHE_DIR
    assert built.cache_file.name.startswith("gallery-") and len(built.cache_file.stem) == len("gallery-") + 16
    manifest = json.loads(built.cache_file.with_suffix(".json").read_text())
    assert manifest["format"] == CACHE_FORMAT and manifest["version"] == CACHE_VERSION
    assert manifest["names"] == ["ann", "ben"] and [f[0] for f in manifest["files"]] == [
        "ann/0.png", "ann/1.png", "ben/0.png", "ben/1.png"]
    with safe_open(str(built.cache_file), "np") as f:  # one float32 tensor, "embeddings"
        assert list(f.keys()) == ["embeddings"] and f.get_tensor("embeddings").dtype == np.float32

    hit = enrol(embedder, root, scan, cache=True)
    assert hit.cache_status == "hit" and embedder.calls == 1
    np.testing.assert_array_equal(hit.embeddings, built.embeddings)
    assert rank_identities(hit, hit.embeddings[:1], 2) == rank_identities(built, built.embeddings[:1], 2)

    Path(scan[0][0]).write_bytes(b"changed!")
    assert enrol(embedder, root, scan, cache=True).cache_status.startswith("stale: gallery changed")
    other = StandIn(model, scale=2.0)
    other.flip = True  # part of the fingerprint: another cache file, built beside the first
    assert enrol(other, root, scan, cache=True).cache_status == "built"
    assert len(list((root / CACHE_DIR).glob("gallery-*.safetensors"))) == 2
    off = enrol(embedder, root, scan)
    assert off.cache_status == "off" and off.cache_file is None


def test_a_cache_written_through_safetensors_torch_is_reused(tmp_path):
    """Caches written before the gallery became numpy (safetensors.torch.save_file) load as they are."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    model, root, scan = _model_and_gallery(tmp_path)
    embedder = StandIn(model)
    built = enrol(embedder, root, scan, cache=True)
    old = torch.from_numpy(built.embeddings[::-1].copy())  # different rows: the file really is read
    save_file({"embeddings": old.contiguous()}, str(built.cache_file))
    hit = enrol(embedder, root, scan, cache=True)
    assert hit.cache_status == "hit"
    np.testing.assert_array_equal(hit.embeddings, old.numpy())


def test_an_unwritable_cache_folder_still_enrols(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    blocked = tmp_path / "a file"  # the cache folder cannot be created (as root too, unlike a read-only folder)
    blocked.write_text("")
    said = []
    got = enrol(StandIn(model), root, scan, cache=True, cache_dir=str(blocked), log=said.append)
    assert got.cache_status == "built (not saved)" and got.cache_file is None
    assert len(said) == 1 and "--cache-dir" in said[0] and str(blocked) in said[0]


def test_identify_and_the_service_rank_with_the_same_function():
    from facetrain import identify
    from facetrain.deploy import app, gallery

    assert identify.rank_identities is gallery.rank_identities is app.rank_identities
