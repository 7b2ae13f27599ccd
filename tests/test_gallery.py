"""deploy.gallery: the one gallery of facetrain.identify and the service's /identify. Ranking (ties included),
rank-k rates, the enrolment cache and unusable gallery photos, on small numpy galleries with a stand-in embedder
(no model, no torch)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from facetrain.alignment.recipe import MARKER_FILE, MARKER_FORMAT, AlignmentRecipe
from facetrain.data.images import Preprocess
from facetrain.deploy.gallery import Gallery, enrol, identification_rates, rank_identities
from facetrain.deploy.gallery_cache import CACHE_FORMAT, CACHE_VERSION, LEGACY_CACHE_DIR, default_cache_dir
from facetrain.errors import UserError


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
    """The part of an embedder that enrolment uses: a weights file, metadata, and `embed` (numpy). The embedding
    of a photo is its colour (so a swapped file changes the answer); photos named *noface* have no face."""

    def __init__(self, path: Path, scale: float = 1.0, aligned_crops: bool = False):
        self.path, self.scale, self.aligned_crops = path, scale, aligned_crops
        self.meta = {"model": {"backbone": "stand-in", "embedding_dim": 4}}
        self.preprocess = Preprocess(32, [0.5] * 3, [0.5] * 3)
        self.flip, self.precision, self.alignment = False, "no", None
        self.calls, self.last_failures = 0, []

    def aligned_folder(self, folder, option) -> bool:
        return self.aligned_crops

    def embed(self, paths, align=True, record_failures=False) -> np.ndarray:
        self.calls += 1
        faceless = [i for i, p in enumerate(paths) if "noface" in Path(p).name]
        if faceless and not record_failures:
            raise UserError(f"{paths[faceless[0]]}: no face")
        self.last_failures = [{"index": i, "path": paths[i], "status": "no_face", "reason": "none found"}
                              for i in faceless]
        return _unit([[*_colour(p), self.scale] for p in paths])


def _colour(path: str) -> list[float]:
    return [float(v) for v in Image.open(path).convert("RGB").getpixel((0, 0))]


def _photo(path: Path, colour: tuple[int, int, int]) -> str:
    """An 8 x 8 PPM (uncompressed: every colour gives a file of the same size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PPM")
    return str(path)


COLOURS = {"ann": [(200, 10, 10), (190, 20, 10)], "ben": [(10, 10, 200), (10, 20, 190)]}


def _folder(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    names = sorted(COLOURS)
    paths = [_photo(root / name / f"{j}.ppm", c) for name in names for j, c in enumerate(COLOURS[name])]
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
    cache = tmp_path / "cache"
    embedder = StandIn(model)
    built = enrol(embedder, root, scan, cache)
    assert built.cache_status == "built" and built.cache_file.parent == cache
    assert not (root / LEGACY_CACHE_DIR).exists()  # nothing is written into the gallery
    stem = built.cache_file.stem  # gallery-<model fingerprint>-<gallery path hash>
    assert stem.startswith("gallery-") and [len(p) for p in stem.split("-")[1:]] == [16, 16]
    manifest = json.loads(built.cache_file.with_suffix(".json").read_text())
    assert manifest["format"] == CACHE_FORMAT and manifest["version"] == CACHE_VERSION == 2
    assert manifest["names"] == ["ann", "ben"] and [f[0] for f in manifest["files"]] == [
        "ann/0.ppm", "ann/1.ppm", "ben/0.ppm", "ben/1.ppm"]
    assert manifest["files"][0][2] == hashlib.sha256(Path(scan[0][0]).read_bytes()).hexdigest()
    with safe_open(str(built.cache_file), "np") as f:  # one float32 tensor, "embeddings"
        assert list(f.keys()) == ["embeddings"] and f.get_tensor("embeddings").dtype == np.float32

    hit = enrol(embedder, root, scan, cache)
    assert hit.cache_status == "hit" and embedder.calls == 1
    np.testing.assert_array_equal(hit.embeddings, built.embeddings)
    assert rank_identities(hit, hit.embeddings[:1], 2) == rank_identities(built, built.embeddings[:1], 2)
    os.utime(scan[0][0], ns=(1, 1))  # a new mtime alone: same content, still a hit
    assert enrol(embedder, root, scan, cache).cache_status == "hit"

    _photo(Path(scan[0][0]), (0, 0, 0))
    assert enrol(embedder, root, scan, cache).cache_status.startswith("stale: gallery changed")
    other = StandIn(model, scale=2.0)
    other.flip = True  # part of the fingerprint: another cache file, built beside the first
    assert enrol(other, root, scan, cache).cache_status == "built"
    assert len(list(cache.glob("gallery-*.safetensors"))) == 2
    off = enrol(embedder, root, scan)
    assert off.cache_status == "off" and off.cache_file is None


def test_a_content_swap_keeping_size_and_mtime_is_not_answered_from_the_cache(tmp_path):
    """Issue 26 item 12: the version-1 cache trusted size + mtime and answered with the wrong identity."""
    model, root, scan = _model_and_gallery(tmp_path)
    embedder = StandIn(model)
    enrol(embedder, root, scan, tmp_path / "cache")
    ann, ben = Path(scan[0][0]), Path(scan[0][2])
    stats = {p: p.stat() for p in (ann, ben)}
    data = {p: p.read_bytes() for p in (ann, ben)}
    ann.write_bytes(data[ben])
    ben.write_bytes(data[ann])
    for p, st in stats.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    again = enrol(embedder, root, scan, tmp_path / "cache")
    assert again.cache_status == "stale: gallery changed (2 new or modified, 2 removed or modified files), rebuilt"
    probe = _unit([[*COLOURS["ann"][0], 1.0]])  # ann's old photo, now filed under ben
    assert rank_identities(again, probe, 1)[0][0]["identity"] == "ben"


def test_the_alignment_decision_is_part_of_the_key(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    enrol(StandIn(model), root, scan, tmp_path / "cache")
    crops = enrol(StandIn(model, aligned_crops=True), root, scan, tmp_path / "cache")
    assert crops.cache_status.startswith("stale: alignment decision changed (now: facetrain.align crops")


def test_galleries_sharing_a_cache_dir_keep_one_cache_each(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    other_root = tmp_path / "other"
    other = ([_photo(other_root / "cy" / f"{j}.ppm", (10, 200, 10 * j)) for j in range(2)], np.array([0, 0]), ["cy"])
    embedder, cache = StandIn(model), tmp_path / "cache"
    assert [enrol(embedder, r, s, cache).cache_status for r, s in ((root, scan), (other_root, other))] == [
        "built", "built"]
    assert [enrol(embedder, r, s, cache).cache_status for r, s in ((root, scan), (other_root, other))] == [
        "hit", "hit"]
    assert embedder.calls == 2 and len(list(cache.glob("gallery-*.safetensors"))) == 2


def test_the_default_cache_dir_is_outside_the_data():
    assert default_cache_dir({"XDG_CACHE_HOME": "/x/cache", "HOME": "/h"}) == Path("/x/cache/facetrain")
    assert default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/facetrain")
    assert default_cache_dir({"XDG_CACHE_HOME": "relative", "HOME": "/h"}) == Path("/h/.cache/facetrain")


def test_a_cache_written_through_safetensors_torch_is_reused(tmp_path):
    """Cache tensors written through safetensors.torch.save_file load as they are."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    model, root, scan = _model_and_gallery(tmp_path)
    embedder = StandIn(model)
    built = enrol(embedder, root, scan, tmp_path / "cache")
    old = torch.from_numpy(built.embeddings[::-1].copy())  # different rows: the file really is read
    save_file({"embeddings": old.contiguous()}, str(built.cache_file))
    hit = enrol(embedder, root, scan, tmp_path / "cache")
    assert hit.cache_status == "hit"
    np.testing.assert_array_equal(hit.embeddings, old.numpy())


def test_an_unwritable_cache_folder_still_enrols(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    blocked = tmp_path / "a file"  # the cache folder cannot be created (as root too, unlike a read-only folder)
    blocked.write_text("")
    said = []
    got = enrol(StandIn(model), root, scan, cache_dir=str(blocked), log=said.append)
    assert got.cache_status == "built (not saved)" and got.cache_file is None
    assert len(said) == 1 and "--cache-dir" in said[0] and str(blocked) in said[0]


# ---------------------------------------------------------------------------------- unusable gallery photos


def _with_bad_photos(root: Path, scan: tuple) -> tuple:
    """The 2 x 2 gallery plus a zero-byte file, a truncated PNG, two faceless photos, and a person ("cy") whose
    only photo is faceless."""
    (root / "ann" / "empty.png").write_bytes(b"")
    (root / "ben" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    extra = [str(root / "ann" / "empty.png"), _photo(root / "ann" / "noface1.ppm", (1, 2, 3)),
             str(root / "ben" / "cut.png"), _photo(root / "ben" / "noface2.ppm", (3, 2, 1)),
             _photo(root / "cy" / "noface3.ppm", (9, 9, 9))]
    paths = scan[0][:2] + extra[:2] + scan[0][2:] + extra[2:4] + extra[4:]
    return paths, np.array([0] * 4 + [1] * 4 + [2]), ["ann", "ben", "cy"]


def test_every_undecodable_or_faceless_photo_is_named_at_once(tmp_path):
    """Issue 26 item 11: enrolment stopped at the first faceless photo, even with --bad-images skip."""
    model, root, scan = _model_and_gallery(tmp_path)
    scan = _with_bad_photos(root, scan)
    with pytest.raises(UserError) as err:
        enrol(StandIn(model), root, scan, tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and "5 image(s) cannot be used" in message and "--bad-images skip" in message
    for name, problem in (("empty.png", "empty_file"), ("cut.png", "corrupt"), ("noface1.ppm", "no_face"),
                          ("noface2.ppm", "no_face"), ("noface3.ppm", "no_face")):
        assert f"{name} ({problem})" in message


def test_bad_images_skip_enrols_the_rest_and_counts_what_it_left_out(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    scan = _with_bad_photos(root, scan)
    said, embedder = [], StandIn(model)
    got = enrol(embedder, root, scan, tmp_path / "cache", bad_images="skip", log=said.append)
    usable = [p for p in scan[0] if Path(p).name in ("0.ppm", "1.ppm")]
    assert got.names == ["ann", "ben"] and got.paths == usable and got.labels.tolist() == [0, 0, 1, 1]
    assert len(got.skipped) == 5 and len(got.embeddings) == 4
    assert len(said) == 1 and "left out 5 of 9 photos" in said[0] and "3 no_face" in said[0]
    # the cache remembers what was left out: a hit says the same, and --bad-images error still refuses
    again = enrol(embedder, root, scan, tmp_path / "cache", bad_images="skip", log=said.append)
    assert again.cache_status == "hit" and again.skipped == got.skipped and embedder.calls == 1
    np.testing.assert_array_equal(again.embeddings, got.embeddings)
    with pytest.raises(UserError, match="5 image\\(s\\) cannot be used"):
        enrol(embedder, root, scan, tmp_path / "cache")
    larger = enrol(embedder, root, scan, tmp_path / "cache", "skip", max_image_pixels=10**9, log=said.append)
    assert larger.cache_status.startswith("stale: --max-image-pixels changed")  # it decides what is refused


def test_a_half_aligned_gallery_is_said_in_one_line(tmp_path):
    model, root, scan = _model_and_gallery(tmp_path)
    marker = {"format": MARKER_FORMAT, "version": 1, "recipe": AlignmentRecipe().to_dict(), "input": "/raw",
              "complete": False}
    (root / MARKER_FILE).write_text(json.dumps(marker))
    said = []
    enrol(StandIn(model), root, scan, log=said.append)
    assert len(said) == 1 and "only partly aligned" in said[0] and "--input /raw" in said[0]


def test_identify_and_the_service_rank_with_the_same_function():
    from facetrain import identify
    from facetrain.deploy import app, gallery

    assert identify.rank_identities is gallery.rank_identities is app.rank_identities


def test_the_service_says_which_face_it_used():
    """Issue 26 items 13/14: the service verified a photo with several faces on one of them, saying nothing."""
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
    import base64
    import io

    from fastapi.testclient import TestClient

    from facetrain.deploy.app import build_app

    class Aligning:  # the part of OnnxEmbedder the service uses; every photo shows two faces
        meta, flip, path, alignment, embedding_dim = {"model": {"backbone": "x"}}, False, Path("m.onnx"), {}, 3

        def prepare(self, source, name="image", align=True, face=None):
            face.update({"faces": 2, "box": [1.0, 2.0, 30.0, 40.0], "choice": "largest box"})
            return np.zeros((4, 4, 3), dtype=np.uint8)

        def run(self, batch):
            return _unit(np.ones((len(batch), 3)))

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    want = {"faces": 2, "box": [1.0, 2.0, 30.0, 40.0], "choice": "largest box"}
    with TestClient(build_app(Aligning())) as client:
        assert client.post("/verify", json={"image_a": image, "image_b": image}).json()["faces"] == [want, want]
        assert client.post("/embed", json={"images": [image] * 3}).json()["faces"] == [want] * 3
