"""The DALI pretraining loader: the same batch dict as `shard_stream`, with decode and crops in a DALI pipeline.

Graph: `fn.readers.webdataset` (this rank's 1/world_size of the samples, shuffled in an `initial_fill` buffer,
seeded from (seed, rank)) -> `fn.decoders.image` ("mixed" = nvJPEG on the GPU when a device id is given, "cpu"
without) -> per crop of `crop_recipe.CropRecipe` (the recipe the torch path reads: sizes, scale and ratio ranges,
counts, the odds of each step per crop): random_resized_crop (bicubic, antialiased) -> flips [-> 90-degree
rotation] -> colour jitter with p -> grayscale with p -> Gaussian blur with p -> solarize with p (global crop 2)
-> uint8 CHW crop and crop_mirror_normalize float CHW crop. Probabilities are DALI conditionals.
iBOT masks and the collate fields are made on the host per batch by `collate_multicrop`, with the mask seed of
the torch path (`batch_mask_rng`).

Deviations from the torch path (`augmentations.py`):
  - no HED stain jitter (`hed_jitter` > 0 is ignored with a warning);
  - none in colour: jitter (torchvision's brightness / mean-grey contrast / saturation / HSV hue maths, in a random
    order per sample) and grayscale are `dali_colour`'s arithmetic copies of torchvision's kernels; a pixel may
    differ by a grey level through float32 rounding;
  - DALI's own crop sampling and resampling kernels: crops follow the same distributions, not the same pixels.
Other differences: no exact resume (`start_step` only numbers the steps and seeds the masks; the data order
restarts from the pipeline's seed), so the torch backend is the one to use when a run must replay its data.
Ranks split the samples (DALI's shard_id/num_shards, moving to the next part each DALI epoch) instead of
resampling shards; `open_shards`, `random_start`, `epoch_length` and `num_workers` do not apply (the shuffle
buffer is DALI's `initial_fill`, the threads `decode_threads`). Shards must be local or mounted paths (DALI reads
files, not fsspec URLs); `.idx` files beside the shards (`wds2idx`) are used when every shard has one, else DALI
infers them when it starts (~0.2 s per 1,000 samples). Sample keys come from DALI's source info, so no json
padding (`fn.pad`) is needed: outputs are read per sample from `Pipeline.run()`, not through a DALI iterator.

Corrupt data: DALI cannot skip a sample. Measured (DALI 2.4, CPU): a truncated JPEG fails the decoder ("Failed to
decode sample #3 : run-000000.tar:13824:slide0/3_0.jpg") and a truncated tar fails the reader ("Invalid seek");
either way the pipeline object is dead. Samples missing the image or the json are skipped by the reader
(uncounted). So the DALI path needs validated shards (`tar_samples.validate_shards`); with `backend: auto` the
loader continues with the torch path from the failed step (`loader.with_fallback`), with `dali` it raises.
`stats` are therefore always {"corrupt": 0, "shard_errors": 0, "samples": batch_size}.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gpfm_scale.data import dali_colour
from gpfm_scale.data.batch_keys import (
    GLOBAL_CROPS,
    GLOBAL_CROPS_UINT8,
    LOCAL_CROPS,
    LOCAL_CROPS_UINT8,
    STATS,
    STATS_CORRUPT,
    STATS_SAMPLES,
    STATS_SHARD_ERRORS,
    STEP,
)
from gpfm_scale.data.collate import collate_multicrop
from gpfm_scale.data.config import CropConfig, MaskConfig
from gpfm_scale.data.crop_recipe import CropKind, CropRecipe
from gpfm_scale.data.loader_config import LoaderConfig
from gpfm_scale.data.seeds import TAG_PIPELINE, batch_mask_rng, derive_seed
from gpfm_scale.data.shard_urls import expand_shard_urls
from gpfm_scale.data.tar_samples import split_member_name
from gpfm_scale.errors import ConfigError, ShardError
from gpfm_scale.extras import install_hint

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError:  # DALI not installed: dali_available() is False and nothing below runs
    fn = pipeline_def = types = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


def dali_available() -> bool:
    """True when DALI imports in this process."""
    return fn is not None


def _coin(p: float) -> Any:
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _coin_int(p: float) -> Any:
    """An int32 flag (what fn.flip takes); coin_flip makes only bool, uint8 or int32."""
    return fn.random.coin_flip(probability=p, dtype=types.INT32)


def _factor(strength: float) -> Any:
    """A jitter factor ~ U[max(0, 1 - s), 1 + s] (torchvision ColorJitter); exactly 1.0 when s = 0."""
    if strength == 0.0:
        return fn.random.uniform(values=[1.0])
    return fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])


def _jitter_draws(cfg: CropConfig) -> tuple[tuple[Any, Any, Any, Any], Any]:
    """Per-sample ColorJitter draws as torchvision makes them: (brightness, contrast, saturation, hue shift in
    turns) and the index of the order in `dali_colour.PERMUTATIONS` (uniform over the 24)."""
    hue = fn.random.uniform(range=[-cfg.jitter_hue, cfg.jitter_hue]) if cfg.jitter_hue else 0.0
    factors = (_factor(cfg.jitter_brightness), _factor(cfg.jitter_contrast), _factor(cfg.jitter_saturation), hue)
    return factors, fn.random.uniform(values=list(range(len(dali_colour.PERMUTATIONS))), dtype=types.INT32)


def _rot90(x: Any, p: float) -> Any:
    """torch.rot90(x, k) for k ~ U{1, 2, 3} with probability p, on HWC: k=1 transpose+vflip, 2 both flips,
    3 transpose+hflip."""
    if _coin(p):
        k = fn.random.uniform(values=[1, 2, 3], dtype=types.INT32)
        if k != 2:
            x = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)
        x = fn.flip(x, horizontal=fn.cast(k >= 2, dtype=types.INT32), vertical=fn.cast(k <= 2, dtype=types.INT32))
    return x


def _solarize(x: Any, threshold: int) -> Any:
    """torchvision's solarize (x >= threshold -> 255 - x) in DALI arithmetic: x + [x >= t] * (255 - 2x), in int16."""
    wide = fn.cast(x, dtype=types.INT16)
    return fn.cast(wide + (wide >= threshold) * (255 - 2 * wide), dtype=types.UINT8)


def _colour(x: Any, kind: CropKind, cfg: CropConfig) -> Any:
    """Colour jitter with p (torchvision factors, random order per sample) then grayscale with p, on uint8 HWC."""
    # Nested ifs on purpose here and below: the outer test is a Python bool (no op in the graph when p = 0), the
    # inner one a per-sample DALI conditional; `and` would mix the two in AutoGraph.
    if kind.jitter_p > 0.0:
        if _coin(kind.jitter_p):
            factors, order = _jitter_draws(cfg)
            x = dali_colour.to_uint8(dali_colour.color_jitter(dali_colour.to_float(x), factors, order))
    if kind.grayscale_p > 0.0:
        if _coin(kind.grayscale_p):
            x = dali_colour.to_uint8(dali_colour.grayscale(dali_colour.to_float(x)))
    return x


def _augment(image: Any, kind: CropKind, cfg: CropConfig) -> Any:
    """One augmented uint8 HWC crop [S, S, 3] of a decoded tile (DataNode); S = kind.size."""
    x = fn.random_resized_crop(image, size=[kind.size, kind.size], random_area=list(kind.scale),
                               random_aspect_ratio=list(kind.ratio), interp_type=types.INTERP_CUBIC,
                               antialias=True, num_attempts=10)
    x = fn.flip(x, horizontal=_coin_int(kind.hflip_p), vertical=_coin_int(kind.vflip_p))
    if kind.rot90_p > 0.0:
        x = _rot90(x, kind.rot90_p)
    x = _colour(x, kind, cfg)
    if kind.blur_p > 0.0:
        if _coin(kind.blur_p):
            x = fn.gaussian_blur(x, window_size=cfg.blur_kernel, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
    if kind.solarize_p > 0.0:
        if _coin(kind.solarize_p):
            x = _solarize(x, cfg.solarize_threshold)
    return x


def _multicrop_graph(paths: list[str], index_paths: list[str] | None, loader_cfg: LoaderConfig,
                     crop_cfg: CropConfig, shard: tuple[int, int], decoder_device: str) -> tuple[Any, ...]:
    """Outputs: per crop (global 1, global 2, locals) uint8 [B, 3, S, S] [and float32 [B, 3, S, S]], then the
    json bytes and the source info ("shard.tar:offset:member") of each sample."""
    shuffle = loader_cfg.shuffle_buffer > 1
    encoded, meta = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg;jpeg;png", "json"], missing_component_behavior="skip",
        shard_id=shard[0], num_shards=shard[1], random_shuffle=shuffle,
        initial_fill=max(1, loader_cfg.shuffle_buffer), name="shards")
    source = fn.get_property(encoded, key="source_info")
    decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    mean = [255.0 * m for m in crop_cfg.mean]
    std = [255.0 * s for s in crop_cfg.std]
    outputs = []
    for kind in CropRecipe.from_config(crop_cfg).crops:
        crop = _augment(decoded, kind, crop_cfg)
        outputs.append(fn.transpose(crop, perm=[2, 0, 1]))
        if crop_cfg.normalize:
            outputs.append(fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std))
    return (*outputs, meta, source)


def _local_paths(urls: list[str]) -> list[str]:
    paths = []
    for url in urls:
        if "://" in url and not url.startswith("file://"):
            raise ConfigError(f"loader.shards: the DALI backend reads local or mounted files only, got {url!r}")
        paths.append(url.removeprefix("file://"))
    return paths


def build_dali_pipeline(urls: list[str], loader_cfg: LoaderConfig, crop_cfg: CropConfig, rank: int,
                        world_size: int, device_id: int | None) -> Any:
    """The (unbuilt) DALI pipeline of one rank; device_id None = CPU only (decode "cpu"), else "mixed"."""
    if not dali_available():
        raise ConfigError(f"loader.backend 'dali' needs nvidia-dali, not installed: {install_hint('gpu')}")
    if crop_cfg.hed_jitter > 0.0:
        logger.warning("DALI backend: HED stain jitter (crops.hed_jitter=%s) is not available and is skipped",
                       crop_cfg.hed_jitter)
    paths = _local_paths(urls)
    index = [p + ".idx" for p in paths]
    index_paths = index if all(os.path.isfile(p) for p in index) else None
    define = pipeline_def(enable_conditionals=True)(_multicrop_graph)
    return define(paths, index_paths, loader_cfg, crop_cfg, (rank, world_size),
                  "cpu" if device_id is None else "mixed",
                  batch_size=loader_cfg.batch_size, num_threads=loader_cfg.decode_threads, device_id=device_id,
                  seed=derive_seed(loader_cfg.seed, rank, TAG_PIPELINE) % (2**31 - 1),
                  prefetch_queue_depth=loader_cfg.prefetch)


def _to_torch(tensor_list: Any, device: torch.device | None) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor that owns its memory (DALI reuses its buffers)."""
    dense = tensor_list.as_tensor()
    if device is None:
        return torch.from_numpy(np.array(dense))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _sample_meta(meta: Any, source: Any, i: int) -> dict[str, Any]:
    """{"__key__", "shard", "json"} of sample i, from the json bytes and DALI's "path:offset:member" source."""
    path, _, member = bytes(np.array(source.at(i))).decode("utf-8", "surrogateescape").rsplit(":", 2)
    key = (split_member_name(member) or (member, ""))[0]
    try:
        parsed = json.loads(bytes(np.array(meta.at(i))))
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"{key} in {path}: invalid json ({err}); the DALI backend needs validated shards") from None
    return {"__key__": key, "shard": path, "json": parsed}


def _samples(crops: list[torch.Tensor], num_global: int, normalize: bool, metas: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """Per-sample dicts in `MultiCropTransform` form (views into the crop batches), for `collate_multicrop`.
    crops: the pipeline's crop outputs, per crop of the recipe its uint8 batch [and its float batch]."""
    step = 2 if normalize else 1
    u8, f32 = crops[0::step], crops[1::step] if normalize else []
    out = []
    for i, meta in enumerate(metas):
        sample: dict[str, Any] = {GLOBAL_CROPS_UINT8: [c[i] for c in u8[:num_global]],
                                  LOCAL_CROPS_UINT8: [c[i] for c in u8[num_global:]]}
        if normalize:
            sample[GLOBAL_CROPS] = [c[i] for c in f32[:num_global]]
            sample[LOCAL_CROPS] = [c[i] for c in f32[num_global:]]
        sample.update(meta)
        out.append(sample)
    return out


def build_dali_loader(loader_cfg: LoaderConfig, crop_cfg: CropConfig, mask_cfg: MaskConfig,
                      grid_hw: tuple[int, int], rank: int, world_size: int, device_id: int | None = None,
                      start_step: int = 0) -> Iterator[dict[str, Any]]:
    """Infinite iterator of this rank's batches (same dict as `shard_stream.build_torch_loader`; tensors on
    cuda:device_id when given). No exact resume. The pipeline is built on the first `next`, so DALI errors
    surface there."""
    urls = expand_shard_urls(loader_cfg.shards)
    pipe = build_dali_pipeline(urls, loader_cfg, crop_cfg, rank, world_size, device_id)
    device = None if device_id is None else torch.device("cuda", device_id)
    grid = (int(grid_hw[0]), int(grid_hw[1]))
    logger.info("DALI loader, rank %d/%d: %d shards, device %s, batch %d", rank, world_size, len(urls),
                device_id, loader_cfg.batch_size)
    return _dali_batches(pipe, CropRecipe.from_config(crop_cfg), crop_cfg.normalize, mask_cfg, grid,
                         (loader_cfg.seed, rank, device, start_step))


def _dali_batches(pipe: Any, recipe: CropRecipe, normalize: bool, mask_cfg: MaskConfig, grid: tuple[int, int],
                  where: tuple[int, int, torch.device | None, int]) -> Iterator[dict[str, Any]]:
    seed, rank, device, step = where
    n_crops, num_global = len(recipe.crops) * (2 if normalize else 1), len(recipe.global_crops)
    pipe.build()
    while True:
        outputs = pipe.run()
        crops = [_to_torch(t, device) for t in outputs[:n_crops]]
        metas = [_sample_meta(outputs[n_crops], outputs[n_crops + 1], i) for i in range(len(outputs[n_crops]))]
        samples = _samples(crops, num_global, normalize, metas)
        batch = collate_multicrop(samples, mask_cfg, grid, batch_mask_rng(seed, rank, step))
        batch[STEP] = step
        batch[STATS] = {STATS_CORRUPT: 0, STATS_SHARD_ERRORS: 0, STATS_SAMPLES: len(metas)}
        yield batch
        step += 1
