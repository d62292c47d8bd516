"""Read tasks: every sample accounted for (tiles, corrupt rows, per-slide markers), pixels resized as the experts do."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gpfm_scale.embed.decode import iter_image_batches, iter_shard_batches, resize_uint8


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tile(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _sample(slide: str, x: int, y: int, image: bytes) -> list[tuple[str, bytes]]:
    meta = json.dumps({"slide_id": slide, "x": x, "y": y}).encode()
    return [(f"{slide}/{x}_{y}.png", image), (f"{slide}/{x}_{y}.json", meta)]


@pytest.fixture
def shard(tmp_path):
    members = _sample("a", 0, 0, _png(_tile(0))) + _sample("a", 8, 0, b"not a png") + \
        _sample("a", 16, 0, _png(_tile(2))) + _sample("b", 0, 8, _png(_tile(3)))
    return _write_tar(tmp_path / "s.tar", members)


def _concat(batches: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_tiles_corrupt_rows_and_markers(shard):
    out = _concat(list(iter_shard_batches(str(shard), size=8, rows=2)))
    tiles = out["total"] < 0
    assert out["slide_id"][tiles].tolist() == ["a", "a", "a", "b"]
    assert out["index"][tiles].tolist() == [0, 1, 2, 0]
    assert out["x"][tiles].tolist() == [0, 8, 16, 0] and out["y"][tiles].tolist() == [0, 0, 0, 8]
    assert out["ok"][tiles].tolist() == [True, False, True, True]
    assert "undecodable png" in out["error"][tiles][1]
    np.testing.assert_array_equal(out["image"][0], _tile(0).transpose(2, 0, 1))  # at size: pixels unchanged
    assert not out["image"][1].any()  # the corrupt tile is a zero placeholder the model skips, never a neighbour
    markers = {s: (t, e) for s, t, e in zip(out["slide_id"][~tiles], out["total"][~tiles], out["error"][~tiles])}
    assert markers == {"a": (3, ""), "b": (1, "")}


def test_include_and_exclude_filter_before_decoding(shard):
    only_b = _concat(list(iter_shard_batches(str(shard), 8, 16, include=["b", "c"])))
    rows = sorted(zip(only_b["slide_id"].tolist(), only_b["total"].tolist()))
    assert rows == [("b", -1), ("b", 1), ("c", 0)]  # b's tile and marker; c was asked for and is not there
    not_a = _concat(list(iter_shard_batches(str(shard), 8, 16, exclude=["a"])))
    assert set(not_a["slide_id"]) == {"b"}


def test_truncated_shard_keeps_whole_samples_and_flags_the_last_slides(shard, tmp_path):
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"b/0_8.png") + 600])  # inside b's image
    out = _concat(list(iter_shard_batches(str(cut), 8, 16, include=["a", "b", "c"])))
    markers = {s: (t, e) for s, t, e in zip(out["slide_id"], out["total"], out["error"]) if t >= 0}
    assert markers["a"][0] == 3 and markers["b"][0] == 0 and markers["c"][0] == 0
    # a was read last (it may have lost its tail: unknowable here), b and c never arrived: all three carry the damage
    assert all("truncated" in markers[s][1] for s in "abc")
    full = _concat(list(iter_shard_batches(str(shard), 8, 16, include=["a", "b", "c"])))
    assert {s: e for s, t, e in zip(full["slide_id"], full["total"], full["error"]) if t >= 0} == \
        {"a": "", "b": "", "c": ""}


def test_resize_matches_expert_bicubic():
    img = torch.from_numpy(_tile(5, 64).transpose(2, 0, 1).copy())
    expected = F.interpolate(img[None].float() / 255, size=(32, 32), mode="bicubic", antialias=True,
                             align_corners=False).clamp(0, 1)[0]
    got = resize_uint8(img, 32)
    assert got.dtype == torch.uint8 and got.shape == (3, 32, 32)
    assert (got.float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6  # only the uint8 rounding


def test_image_batches_keep_rows_and_flag_bad_files(tmp_path):
    Image.fromarray(_tile(1, 16)).save(tmp_path / "x.png")
    (tmp_path / "y.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(_tile(2, 16)).save(tmp_path / "z.tif")
    out = _concat(list(iter_image_batches(str(tmp_path), ["x.png", "y.png", "z.tif"], 10, size=16, rows=2)))
    assert out["row"].tolist() == [10, 11, 12] and out["ok"].tolist() == [True, False, True]
    np.testing.assert_array_equal(out["image"][2], _tile(2, 16).transpose(2, 0, 1))
    assert "y.png" in out["error"][1]


def _png16(rgb16: np.ndarray) -> bytes:
    """A real 16-bit PNG (cv2 writes uint16 arrays as 16-bit PNGs; it takes BGR order)."""
    import cv2

    image = rgb16[..., ::-1] if rgb16.ndim == 3 else rgb16
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    assert ok
    return buf.tobytes()


def _pixels16(seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    values = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    values.flat[:4] = [0, 255, 257, 65535]
    return values


def test_16_bit_pngs_keep_their_high_byte_instead_of_turning_white(tmp_path):
    rgb, gray = _pixels16(0), _pixels16(1, channels=1)
    (tmp_path / "rgb.png").write_bytes(_png16(rgb))
    (tmp_path / "gray.png").write_bytes(_png16(gray))
    # at model size (8 px: no resize) the image used to reach the model as uint16 and abort the run
    out = _concat(list(iter_image_batches(str(tmp_path), ["rgb.png", "gray.png"], 0, size=8, rows=4)))
    assert out["ok"].tolist() == [True, True] and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"][0], (rgb >> 8).astype(np.uint8).transpose(2, 0, 1))
    np.testing.assert_array_equal(out["image"][1], np.repeat((gray >> 8).astype(np.uint8)[None], 3, axis=0))
    assert out["image"][0][:, 0, 0].tolist() == [0, 0, 1] and out["image"][0][0, 0, 1] == 255  # 0,255,257 | 65535


def test_16_bit_png_tiles_in_a_shard_are_scaled_to_8_bits(tmp_path):
    rgb = _pixels16(2)
    path = _write_tar(tmp_path / "s16.tar", _sample("a", 0, 0, _png16(rgb)) + _sample("a", 8, 0, _png(_tile(5))))
    out = _concat(list(iter_shard_batches(str(path), size=8, rows=4)))
    tiles = out["total"] < 0
    assert out["ok"][tiles].tolist() == [True, True] and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"][tiles][0], (rgb >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_alpha_palette_and_odd_images_convert_or_fail_alone(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 40, 255
    rgba[0, 0] = [10, 20, 30, 0]  # fully transparent: the white background, not its stored colour
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 128, 255])
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 1.5, np.float32), "F").save(tmp_path / "float.tif")  # 32-bit: no known range
    (tmp_path / "cut.png").write_bytes(_png(_tile(3))[:40])
    Image.fromarray(_tile(4)).save(tmp_path / "good.bmp")
    files = ["rgba.png", "palette.png", "float.tif", "cut.png", "good.bmp"]
    out = _concat(list(iter_image_batches(str(tmp_path), files, 0, size=8, rows=2)))
    assert out["ok"].tolist() == [True, True, False, False, True] and out["image"].dtype == np.uint8
    assert out["image"][0][:, 0, 0].tolist() == [255, 255, 255] and out["image"][0][:, 1, 1].tolist() == [40] * 3
    assert out["image"][1][:, 3, 3].tolist() == [0, 128, 255]
    assert "float.tif" in out["error"][2] and "32-bit" in out["error"][2] and "cut.png" in out["error"][3]
    np.testing.assert_array_equal(out["image"][4], _tile(4).transpose(2, 0, 1))


def test_hidden_folders_and_links_leading_outside_the_image_folder_fail_alone(tmp_path):
    root = tmp_path / "images"
    for rel in ("a/x.png", ".ipynb_checkpoints/y.png", "a/._z.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_tile(7)).save(root / rel, format="PNG")
    Image.fromarray(_tile(8)).save(tmp_path / "secret.png")
    (root / "a" / "link.png").symlink_to(tmp_path / "secret.png")
    files = ["a/x.png", ".ipynb_checkpoints/y.png", "a/._z.png", "a/link.png"]
    out = _concat(list(iter_image_batches(str(root), files, 0, size=8, rows=8)))
    assert out["ok"].tolist() == [True, False, False, False]
    assert all(f in e for f, e in zip(files[1:], out["error"][1:])) and "outside" in out["error"][3]
