"""Multi-crop augmentation of one tile (DINOv2/GPFM recipe), on uint8 CHW tensors until the last step.

Input contract: one RGB tile as a `torch.uint8` tensor [3, H, W] (what the loader's JPEG decode gives). Crops stay
uint8 through every augmentation (faster, 4x smaller than float32) and are normalised in CHW at the very end.

Per crop, in this order: RandomResizedCrop (bicubic, antialias) -> horizontal flip -> [vertical flip] ->
[90-degree rotation] -> [HED stain jitter] -> colour jitter (random order of brightness/contrast/saturation/hue)
-> grayscale -> Gaussian blur -> solarize (global crop 2 only). Bracketed steps are off by default. Sizes, areas,
counts and the odds of each step per crop come from `crop_recipe.CropRecipe`, which the DALI backend reads too.

Reproducibility: every random draw comes from one `torch.Generator` passed to `__call__` (or made from an int
seed), in a fixed order, so the same image and seed give bit-identical crops; the global torch RNG is neither
read nor changed in that case. With no generator, a seed is drawn from the global torch RNG, which DataLoader
seeds per worker, so workers differ and a run with a fixed base seed repeats. For exact resume, derive the seed
from (run seed, epoch, sample index).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from gpfm_scale.data.batch_keys import GLOBAL_CROPS, GLOBAL_CROPS_UINT8, LOCAL_CROPS, LOCAL_CROPS_UINT8
from gpfm_scale.data.config import CropConfig
from gpfm_scale.data.crop_recipe import CropKind, CropRecipe

logger = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as scikit-image uses.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# Stain densities are in scikit-image's units (optical density / -ln(1e-6)), the units of the widely copied
# `HEDJitter(theta)` transforms, so their strengths carry over. In these units beta is strong: measured on
# synthetic H&E tiles, s = 0.01 / 0.02 / 0.05 change pixels by 12 / 20 / 37 grey levels on average and
# saturate 2% / 8% / 17% of them; 0.01-0.05 is the useful range.
_OD_SCALE = -math.log(1e-6)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(p: float, g: torch.Generator) -> bool:
    """True with probability p; always draws, so the random stream does not depend on p."""
    return float(torch.rand((), generator=g)) < p


def _randint(n: int, g: torch.Generator) -> int:
    """Uniform integer in [0, n)."""
    return int(torch.randint(0, n, (1,), generator=g))


def sample_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect w/h in `ratio` (pixels).

    The RandomResizedCrop rule: ten tries of area ~ U(scale) and log-uniform aspect; if none fits, the largest
    centred crop whose aspect lies in `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], g)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], g))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h + 1, g), _randint(width - w + 1, g), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """Stain densities of a uint8 RGB image [..., 3, H, W] -> float64 [..., 3 (H, E, D), H, W] (scikit-image units,
    without its clipping at 0, so that `hed_to_rgb(rgb_to_hed(x)) == x`)."""
    rgb = image.to(torch.float64).div(255.0).clamp_min(1e-6)
    od = -torch.log(rgb) / _OD_SCALE
    return torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB)


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`: float stains [..., 3, H, W] -> uint8 RGB [..., 3, H, W] (rounded, clipped)."""
    od = torch.einsum("...dhw,dc->...chw", stains.to(torch.float64), RGB_FROM_HED)
    rgb = torch.exp(-od * _OD_SCALE)
    return rgb.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def hed_jitter(image: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb each stain channel c as s_c * alpha[c] + beta[c] (Tellez et al.); uint8 [..., 3, H, W] in and out.

    alpha, beta: [3] (H, E, D). alpha = 1, beta = 0 returns the image unchanged.
    """
    stains = rgb_to_hed(image)
    a = alpha.to(torch.float64).view(3, 1, 1)
    b = beta.to(torch.float64).view(3, 1, 1)
    return hed_to_rgb(stains * a + b)


def sample_hed_params(strength: float, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha ~ U[1-s, 1+s]^3, beta ~ U[-s, s]^3 for `hed_jitter`."""
    u = torch.rand(6, generator=g, dtype=torch.float64) * 2.0 - 1.0
    return 1.0 + strength * u[:3], strength * u[3:]


class RandomHedJitter(v2.Transform):
    """torchvision-v2 transform form of `hed_jitter`, for v2.Compose pipelines (draws from the global torch RNG).

    Applies to uint8 RGB image tensors (plain or tv_tensors.Image); other inputs pass through unchanged.
    """

    def __init__(self, strength: float, p: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p) and self.strength > 0.0
        alpha, beta = sample_hed_params(self.strength)
        return {"apply": apply, "alpha": alpha, "beta": beta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        is_image = isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor
        if not params["apply"] or not is_image:
            return inpt
        out = hed_jitter(inpt.as_subclass(torch.Tensor), params["alpha"], params["beta"])
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def normalize_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, computed in CHW as one multiply-subtract."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return images.to(torch.float32).mul_(scale).sub_(shift)


def denormalize_to_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of `normalize_uint8` (rounded): float [..., 3, H, W] -> uint8."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (images * s + m).mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def _check_image(image: Any) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(f"MultiCropTransform takes a uint8 RGB tensor [3, H, W], got {got}")


def _make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    seed = int(torch.randint(0, 2**62, (1,))) if generator is None else int(generator)
    return torch.Generator().manual_seed(seed)


class MultiCropTransform:
    """One uint8 tile [3, H, W] -> 2 global crops [3, G, G] + `n_local` local crops [3, L, L] (`CropRecipe`).

    Returns a dict of lists (one tensor per crop):
      global_crops_uint8 [2 x uint8 [3, G, G]]: the global crops after every augmentation, before normalisation;
        these are exactly what the student/teacher see (their float form), and what expert teachers receive
        (each expert then applies its own resize and normalisation).
      local_crops_uint8 [n_local x uint8 [3, L, L]]
      global_crops, local_crops: float32, (x/255 - mean)/std of the uint8 crops; only when `cfg.normalize`.
    """

    def __init__(self, cfg: CropConfig) -> None:
        self.cfg = cfg
        self.recipe = CropRecipe.from_config(cfg)
        logger.debug("multi-crop transform: %s", cfg.model_dump())

    def __call__(self, image: torch.Tensor, generator: torch.Generator | int | None = None) -> dict[str, list]:
        """`generator`: a torch.Generator (consumed), an int seed, or None (seed drawn from the global RNG)."""
        _check_image(image)
        cfg, g = self.cfg, _make_generator(generator)
        globals_u8 = [self._crop(image, kind, g) for kind in self.recipe.global_crops]
        locals_u8 = [self._crop(image, kind, g) for kind in self.recipe.local_crops]
        out: dict[str, list] = {GLOBAL_CROPS_UINT8: globals_u8, LOCAL_CROPS_UINT8: locals_u8}
        if cfg.normalize:
            out[GLOBAL_CROPS] = [normalize_uint8(x, cfg.mean, cfg.std) for x in globals_u8]
            out[LOCAL_CROPS] = [normalize_uint8(x, cfg.mean, cfg.std) for x in locals_u8]
        return out

    def _crop(self, image: torch.Tensor, kind: CropKind, g: torch.Generator) -> torch.Tensor:
        """One augmented uint8 crop [3, kind.size, kind.size]."""
        cfg = self.cfg
        top, left, h, w = sample_crop_box(image.shape[-2], image.shape[-1], kind.scale, kind.ratio, g)
        size = [kind.size, kind.size]
        x = F.resized_crop(image, top, left, h, w, size, F.InterpolationMode.BICUBIC, antialias=True)
        x = _geometric(x, kind, g)
        if _coin(kind.hed_jitter_p, g) and cfg.hed_jitter > 0.0:
            x = hed_jitter(x, *sample_hed_params(cfg.hed_jitter, g))
        if _coin(kind.jitter_p, g):
            x = self._color_jitter(x, g)
        if _coin(kind.grayscale_p, g):
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if _coin(kind.blur_p, g):
            sigma = _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], g)
            x = F.gaussian_blur(x, [cfg.blur_kernel, cfg.blur_kernel], [sigma, sigma])
        if _coin(kind.solarize_p, g):
            x = F.solarize(x, threshold=cfg.solarize_threshold)
        return x.contiguous()

    def _color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision ColorJitter semantics: four factors, applied in a random order."""
        cfg = self.cfg
        b = _uniform(max(0.0, 1.0 - cfg.jitter_brightness), 1.0 + cfg.jitter_brightness, g)
        c = _uniform(max(0.0, 1.0 - cfg.jitter_contrast), 1.0 + cfg.jitter_contrast, g)
        s = _uniform(max(0.0, 1.0 - cfg.jitter_saturation), 1.0 + cfg.jitter_saturation, g)
        hue = _uniform(-cfg.jitter_hue, cfg.jitter_hue, g)
        return color_jitter(x, (b, c, s, hue), torch.randperm(4, generator=g).tolist())


def _geometric(x: torch.Tensor, kind: CropKind, g: torch.Generator) -> torch.Tensor:
    """Flips, then a 90-degree rotation (k drawn whether or not it applies, so the stream does not depend on p)."""
    if _coin(kind.hflip_p, g):
        x = F.horizontal_flip(x)
    if _coin(kind.vflip_p, g):
        x = F.vertical_flip(x)
    k = 1 + _randint(3, g)
    if _coin(kind.rot90_p, g):
        x = torch.rot90(x, k, dims=(-2, -1))
    return x


def color_jitter(x: torch.Tensor, factors: tuple[float, float, float, float], order: list[int]) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation and hue adjustments (factors in that order; hue in turns)
    applied to a uint8 [3, H, W] image in `order` (a permutation of 0..3 indexing `factors`).

    The DALI path reproduces this function (`dali_colour.color_jitter`); tests compare the two on fixed values.
    """
    b, c, s, hue = factors
    ops = (
        lambda im: F.adjust_brightness(im, b),
        lambda im: F.adjust_contrast(im, c),
        lambda im: F.adjust_saturation(im, s),
        lambda im: F.adjust_hue(im, hue),
    )
    for i in order:
        x = ops[i](x)
    return x
