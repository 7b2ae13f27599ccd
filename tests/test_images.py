"""One image loader for every path: a phone JPEG stored sideways (EXIF Orientation=6) is used upright by training
from a folder, training from a Hugging Face imagefolder, validation, eval, verify and identify. Only the
documented formats reach PIL (EPS never runs Ghostscript; HEIC, PDF, SVG... are named); float TIFFs are scaled."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import REFUSED_SIGNATURES, fake_ghostscript
from PIL import Image

from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.dataset import FaceDataset
from facetrain.data.faceset import folder_faceset, hf_faceset
from facetrain.data.images import Preprocess, load_image
from facetrain.data.transforms import eval_transform

ORIENTATION = 0x0112


def upright_face() -> Image.Image:
    """An asymmetric 48 x 80 (w x h) picture: a rotation or a mirror of it looks different."""
    yy, xx = np.mgrid[0:80, 0:48]
    rgb = np.stack([xx * 5, yy * 3, (xx + yy) % 64 * 4], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[5:20, 5:15] = (255, 0, 0)  # a mark near the top-left corner
    return Image.fromarray(rgb, "RGB")


@pytest.fixture
def sideways(tmp_path):
    """root/<person>/<image>.jpg, each stored rotated with Orientation=6 (display: turn 90 degrees clockwise)."""
    root = tmp_path / "faces"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        for k in range(2):
            stored = upright_face().rotate(90, expand=True)  # what the camera wrote
            exif = Image.Exif()
            exif[ORIENTATION] = 6
            stored.save(root / person / f"{k}.jpg", quality=95, exif=exif.tobytes())
    return root


def test_every_path_sees_the_photo_upright(sideways, tmp_path):
    path = sideways / "a" / "0.jpg"
    with Image.open(path) as raw:
        assert raw.size == (80, 48) and raw.getexif()[ORIENTATION] == 6  # stored sideways
    upright = load_image(path)
    assert upright.size == (48, 80)
    # the decoded pixels are the upright picture (JPEG-close), not a turned or mirrored one
    diff = np.abs(np.asarray(upright, dtype=np.int16) - np.asarray(upright_face(), dtype=np.int16)).mean()
    assert diff < 4, diff

    pre = Preprocess(32, [0.5] * 3, [0.5] * 3)
    transform = eval_transform(pre)
    want = transform(upright)
    # training and validation from a folder
    folder = folder_faceset(str(sideways))
    i = folder.paths.index(str(path))
    got_folder = FaceDataset(folder, np.arange(len(folder)), folder.labels, transform)[i][0]
    # training from a Hugging Face imagefolder (datasets applies the orientation itself)
    hf = hf_faceset(DataConfig(source="hf", root=str(sideways)))
    got_hf = [FaceDataset(hf, np.arange(len(hf)), hf.labels, transform)[j][0] for j in range(len(hf))]
    # eval, verify and identify
    from facetrain.evaluation.embedding import ImageFiles

    got_eval = ImageFiles([str(path)], transform)[0][0]
    assert torch.equal(got_folder, want) and torch.equal(got_eval, want)
    assert any(torch.equal(g, want) for g in got_hf)


def test_verify_scores_a_sideways_jpeg_as_its_upright_copy(sideways, tmp_path):
    from facetrain.model.bundle import write_bundle
    from facetrain.model.network import create_model
    from facetrain.verify import verify

    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    torch.manual_seed(0)
    write_bundle(bundle, create_model(mcfg), mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3))
    path = sideways / "a" / "0.jpg"
    copy = tmp_path / "upright.png"
    load_image(path).save(copy)  # lossless: the same pixels, no EXIF
    turned = tmp_path / "turned.png"
    load_image(path).rotate(90, expand=True).save(turned)  # what a loader that ignores EXIF would see
    same = verify(str(bundle), str(path), str(copy), threshold=0.5, mixed_precision="no")
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5)
    other = verify(str(bundle), str(turned), str(copy), threshold=0.5, mixed_precision="no")
    assert other["similarity"] < same["similarity"] - 1e-4


# ----------------------------------------------------------------------------------------------------------
# Formats: only those facetrain documents reach PIL (issue 26, items 1 and 13)

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    return fake_ghostscript(tmp_path, monkeypatch)


def test_eps_never_reaches_ghostscript_in_any_loader(fake_gs, tmp_path):
    from facetrain.alignment.folder import align_file
    from facetrain.data.images import UnsupportedImage
    from facetrain.data.preflight import check_image

    eps = _encoded(Image.new("L", (16, 16), 128), "EPS")
    root = tmp_path / "faces"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        upright_face().save(root / person / "0.png")
    (root / "a" / "1.jpg").write_bytes(eps)  # PostScript behind an image extension
    path = str(root / "a" / "1.jpg")
    with pytest.raises(UnsupportedImage, match="EPS/PostScript file.*convert it to JPEG or PNG"):
        load_image(path)
    with pytest.raises(UnsupportedImage, match="EPS"):
        load_image(eps)  # bytes, as the service gets them
    check = check_image(path, 10**8)  # pre-flight of train, eval, identify, pack
    assert check.problem == "not_an_image" and "EPS" in check.detail
    record = align_file(("a/1.jpg", path, str(tmp_path / "aligned"), "a/1.png", {}))
    assert record["status"] == "not_an_image" and "EPS" in record["reason"]
    hf = hf_faceset(DataConfig(source="hf", root=str(root)))  # datasets' own decoder would render it
    with pytest.raises(UnsupportedImage, match="EPS"):
        for i in range(len(hf)):
            hf.loader(i)
    assert not fake_gs.exists(), fake_gs.read_text()


def test_a_command_refuses_eps_in_one_line_without_running_ghostscript(fake_gs, tmp_path):
    from helpers import run_in_process

    root = tmp_path / "faces"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        for k in range(2):
            upright_face().save(root / person / f"{k}.png")
    (root / "b" / "2.jpg").write_bytes(_encoded(Image.new("RGB", (16, 16)), "EPS"))
    proc = run_in_process("facetrain.pack", ["--input", root, "--output", tmp_path / "faces.ftpack", "--size", "32"])
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "2.jpg" in line and "not_an_image" in line, line
    assert not fake_gs.exists(), fake_gs.read_text()


@pytest.mark.parametrize("name", sorted(REFUSED_SIGNATURES))
def test_a_refused_format_is_named_with_what_to_do(name, tmp_path):
    from facetrain.data.images import UnsupportedImage
    from facetrain.data.preflight import check_image

    path = tmp_path / "photo.jpg"
    path.write_bytes(REFUSED_SIGNATURES[name] + b"\x00" * 64)
    with pytest.raises(UnsupportedImage) as err:
        load_image(path)
    message = str(err.value)
    assert message.startswith(f"{name} file") and "convert it to JPEG or PNG" in message and str(path) not in message
    assert check_image(str(path), 10**8).detail == message


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, on the cut TIFF
def test_a_file_of_a_read_format_whose_header_does_not_decode_is_corrupt_not_of_another_format(tmp_path):
    from facetrain.data.images import DamagedImage
    from facetrain.data.preflight import check_image

    for fmt, cut in (("PNG", 40), ("TIFF", 10), ("GIF", 10)):
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(_encoded(upright_face(), fmt)[:cut])
        with pytest.raises(DamagedImage, match=f"^truncated or damaged {fmt} file"):
            load_image(path)
        check = check_image(str(path), 10**8)
        assert check.problem == "corrupt" and f"damaged {fmt} file" in check.detail, check


def test_documented_formats_decode_and_the_others_are_refused():
    """JPEG (and phones' MPO), PNG, BMP, TIFF, WebP, GIF, PPM/PGM decode; formats PIL also knows do not."""
    from facetrain.data.images import UnsupportedImage

    img = upright_face()
    for fmt, kw in (("JPEG", {}), ("MPO", {"save_all": True, "append_images": [img]}), ("PNG", {}), ("BMP", {}),
                    ("TIFF", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("PPM", {})):
        assert load_image(_encoded(img, fmt, **kw)).size == img.size, fmt
    assert load_image(_encoded(img.convert("L"), "PPM"), keep_gray=True).mode == "L"  # PGM
    for fmt in ("PCX", "TGA", "ICO", "PDF", "JPEG2000"):
        with pytest.raises(UnsupportedImage):
            load_image(_encoded(img, fmt))


def test_no_module_opens_images_but_the_loader():
    """Every path decodes through `images.open_image` (the allow-list): no other `Image.open` call."""
    import ast
    from pathlib import Path

    import facetrain

    package = Path(facetrain.__file__).parent
    calls = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "open" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "Image":
                calls.append(f"{path.relative_to(package)}:{node.lineno}")
    assert calls and all(call.startswith("data/images.py:") for call in calls), calls


@pytest.mark.parametrize("top", [1.0, 255.0])
def test_a_float_tiff_is_scaled_to_8_bits_not_blackened(top, tmp_path):
    ramp = np.linspace(0.0, top, 64 * 48, dtype=np.float32).reshape(48, 64)
    path = tmp_path / "float.tif"
    Image.fromarray(ramp, "F").save(path)  # 32-bit float TIFF, as scientific and IR cameras write
    with Image.open(path) as raw:
        assert raw.mode == "F"
    want = (ramp * (255.0 / top)).astype(np.int16)
    rgb = np.asarray(load_image(path), dtype=np.int16)
    assert rgb.max() >= 254, f"nearly black: brightest pixel {rgb.max()}"
    assert all(np.abs(rgb[..., c] - want).max() <= 1 for c in range(3))
    gray = load_image(path, keep_gray=True)  # one channel, as the other single-channel modes
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), rgb[..., 0])
