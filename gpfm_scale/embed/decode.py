"""Read tasks of the embedding pipeline: shards or image files -> columnar batches of uint8 tiles at model size.

Free of Ray (the stage hands these generators to Ray Data), so they are unit-testable and reusable by the
benchmark's DataLoader baseline.

Every input item is accounted for, never replaced: a sample that cannot be used (undecodable image, bad json) is
emitted as a row with `ok=False` and its reason, and an all-zero image the model skips. For shards, one marker row
per slide (`total` = samples of the slide this task read, `error` = the shard's damage, if any) closes the slide:
the driver, which sees rows out of order, finishes a slide once its marker arrived and all `total` rows did, then
compares `total` with the tiler manifest's `n_tiles` to detect tiles lost to a damaged or missing shard.

Columns of a shard batch: slide_id (str), index (int64: position of the tile in its slide, shard order = the
tiler's coordinate order; -1 for markers), x, y (int64 level-0 px, from the sample's json), ok (bool), error (str),
total (int64: -1 for tile rows), image (uint8 [B, 3, S, S]).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gpfm_scale.contracts.shards import parse_sample_key
from gpfm_scale.data.tar_samples import (CorruptSampleError, RawSample, decode_image_bytes, decode_sample,
                                         iter_raw_samples)
from gpfm_scale.errors import ShardError, UnsafeNameError
from gpfm_scale.names import child_path

log = logging.getLogger(__name__)

TILE_COLUMNS = ("slide_id", "index", "x", "y", "ok", "error", "total", "image")


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: bicubic with antialiasing on [0, 1] floats (the experts' own
    resize), rounded back to uint8; returned unchanged (a contiguous copy) when already at size."""
    if tuple(image.shape[-2:]) == (size, size):
        return image.contiguous()
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def rgb8(image: torch.Tensor, where: str) -> torch.Tensor:
    """uint8 or uint16 [C, H, W] (C = 3: RGB, 4: RGBA) -> uint8 RGB [3, H, W]; CorruptSampleError otherwise.

    16-bit samples keep their high byte (`x >> 8`: 65535 -> 255, 40000 -> 156), as libpng's strip-16 and PIL do;
    clamping them to 255 instead turned every 16-bit image white. Alpha is composited over white (the glass of a
    slide) rather than dropped: dropping it shows whatever colour a transparent pixel happens to hold (often black).
    """
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (3, 4):
        raise CorruptSampleError(f"{where}: unsupported pixel layout {image.dtype} {list(image.shape)} "
                                 "(expected 8- or 16-bit RGB/RGBA)")
    if image.shape[0] == 3:
        return image
    rgb, alpha = image[:3].to(torch.int32), image[3:].to(torch.int32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).to(torch.uint8)


def _pil_rgb8(img: Image.Image, where: str) -> torch.Tensor:
    """A PIL image of any 8- or 16-bit mode (L, P, LA, PA, RGBA, CMYK, I;16...) -> uint8 RGB [3, H, W]."""
    if img.mode.startswith("I;16"):  # 16-bit grayscale: PIL's convert() would clip it to 255
        gray = np.asarray(img).astype(np.uint16)
        return rgb8(torch.from_numpy(np.repeat(gray[None], 3, axis=0).copy()), where)
    if img.mode in ("I", "F"):
        raise CorruptSampleError(f"{where}: {img.mode}-mode image (32-bit samples): no known range to map to 8 bits")
    return rgb8(torch.from_numpy(np.asarray(img.convert("RGBA")).copy()).permute(2, 0, 1), where)


class _TileBatch:
    """Accumulates rows of one output batch (column lists), emitted every `rows` rows."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cols: dict[str, list[Any]] = {c: [] for c in TILE_COLUMNS}

    def add(self, slide_id: str, index: int, xy: tuple[int, int], image: torch.Tensor | None, error: str = "",
            total: int = -1) -> None:
        for col, value in zip(TILE_COLUMNS, (slide_id, index, xy[0], xy[1], image is not None, error, total)):
            self.cols[col].append(value)
        self.cols["image"].append(image.numpy() if image is not None
                                  else np.zeros((3, self.size, self.size), np.uint8))

    def __len__(self) -> int:
        return len(self.cols["ok"])

    def take(self) -> dict[str, np.ndarray]:
        out = {c: np.asarray(v, dtype=object if c in ("slide_id", "error") else None) for c, v in self.cols.items()
               if c != "image"}
        out["slide_id"] = out["slide_id"].astype(str)
        out["error"] = out["error"].astype(str)
        out["image"] = np.stack(self.cols["image"]) if self.cols["image"] else np.zeros((0, 3, self.size, self.size),
                                                                                          np.uint8)
        self.cols = {c: [] for c in TILE_COLUMNS}
        return out


def _decode_tile(raw: RawSample, size: int) -> tuple[tuple[int, int], torch.Tensor]:
    sample = decode_sample(raw)
    meta = sample["json"]
    try:
        xy = (int(meta["x"]), int(meta["y"]))
    except (KeyError, TypeError, ValueError):
        raise CorruptSampleError(f"{raw.key} in {raw.shard}: json has no integer x, y") from None
    return xy, resize_uint8(rgb8(sample["image"], f"{raw.key} in {raw.shard}"), size)


def iter_shard_batches(shard: str, size: int, rows: int, include: Iterable[str] | None = None,
                       exclude: Iterable[str] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Decoded tiles of one shard (slides in `include`, or all but `exclude`), `rows` per batch, then markers.

    A damaged shard (truncated, bad header) ends the tiles early: every complete sample before the damage is
    emitted, and the markers carry the error so the driver can fail exactly the slides that lost tiles.
    """
    wanted = set(include) if include is not None else None
    skipped = set(exclude)
    counts: dict[str, int] = {s: 0 for s in wanted} if wanted is not None else {}
    batch, errors, current = _TileBatch(size), {}, None
    try:
        for raw in iter_raw_samples(shard):
            slide_id, key_xy = parse_sample_key(raw.key)
            current = slide_id
            if (wanted is not None and slide_id not in wanted) or slide_id in skipped:
                continue
            index = counts.get(slide_id, 0)
            counts[slide_id] = index + 1
            try:
                xy, image = _decode_tile(raw, size)
                batch.add(slide_id, index, xy, image)
            except CorruptSampleError as err:
                batch.add(slide_id, index, key_xy or (-1, -1), None, error=str(err))
            if len(batch) >= rows:
                yield batch.take()
    except ShardError as err:
        log.error("damaged shard: %s", err)
        # slides end at a key change (whole slides per shard), so only the slide read last (its tail may be lost;
        # from here it cannot be told) and those never reached can miss tiles; the tiler's counts decide later
        errors = {sid: str(err) for sid, n in counts.items() if sid == current or n == 0}
    for slide_id, total in counts.items():
        batch.add(slide_id, -1, (-1, -1), None, error=errors.get(slide_id, ""), total=total)
    if len(batch):
        yield batch.take()


def read_image_file(path: Path) -> torch.Tensor:
    """An image file -> uint8 RGB [3, H, W] (16-bit, gray, palette and alpha converted: `rgb8`); CorruptSampleError
    when it cannot be decoded or converted."""
    where = str(path)
    try:
        data = path.read_bytes()
        if path.suffix.lower() in (".jpg", ".jpeg"):
            return decode_image_bytes(data, "jpg")
        # PIL, not torchvision, for PNG: torchvision's RGB_ALPHA gives some palette PNGs alpha 0 (measured here,
        # torchvision 0.29), which compositing would turn white; PIL expands palettes and keeps 16-bit high bytes
        with Image.open(BytesIO(data)) as img:
            return _pil_rgb8(img, where)
    except CorruptSampleError:
        raise
    except Exception as err:  # noqa: BLE001 - libpng, libjpeg and PIL's plugins raise OSError, ValueError,
        # RuntimeError, SyntaxError, struct.error, DecompressionBombError...: each means this one file is unusable,
        # and one file must never end the run
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CorruptSampleError(f"{path}: undecodable image: {reason}") from None


def iter_image_batches(root: str, files: list[str], first_row: int, size: int,
                       rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Decoded images `root/files[i]` as batches of `row` (first_row + i), ok, error, image [B, 3, S, S].

    A file whose path is not plain components under `root` (a hidden class folder such as `.ipynb_checkpoints/`,
    a symlink leading outside `root`) fails with its reason instead of joining the cohort as a class of its own."""
    cols: dict[str, list[Any]] = {"row": [], "ok": [], "error": [], "image": []}

    def take() -> dict[str, np.ndarray]:
        out = {"row": np.asarray(cols["row"], np.int64), "ok": np.asarray(cols["ok"], bool),
               "error": np.asarray(cols["error"], dtype=object).astype(str), "image": np.stack(cols["image"])}
        for v in cols.values():
            v.clear()
        return out

    for i, rel in enumerate(files):
        try:
            path = Path(child_path(root, *rel.split("/")))
            image, error = resize_uint8(read_image_file(path), size).numpy(), ""
        except UnsafeNameError as err:
            image, error = np.zeros((3, size, size), np.uint8), f"{rel}: {err}"
        except CorruptSampleError as err:
            image, error = np.zeros((3, size, size), np.uint8), str(err)
        for col, value in zip(cols, (first_row + i, not error, error, image)):
            cols[col].append(value)
        if len(cols["row"]) >= rows:
            yield take()
    if cols["row"]:
        yield take()


def read_task(batch: dict[str, np.ndarray], size: int, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read UDF: each input row holds one JSON task (a shard, or a chunk of image files).

    Runs torch single-threaded: resizing one small image with a thread pool is slower, not faster (measured here:
    224-px tiles to 32 px, 65 images/s with 2 threads on a busy 2-core machine vs 970 with 1); the
    parallelism is across read tasks. The previous setting is restored for whatever the worker runs next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for text in batch["task"]:
            task = json.loads(str(text))
            if "shard" in task:
                yield from iter_shard_batches(task["shard"], size, rows, task.get("include"),
                                              task.get("exclude", ()))
            else:
                yield from iter_image_batches(task["root"], task["files"], task["first_row"], size, rows)
    finally:
        torch.set_num_threads(threads)
