"""Synthetic MIL bags with a known signal, for tests and the demo (no slides, no model needed).

- Two-class bags: every tile is Gaussian noise N(0, I_D); in class-1 bags a fraction of the tiles (10% by default)
  is shifted by `shift` along a hidden unit direction. Mean pooling dilutes that signal tenfold; attention finds it.
- Survival bags: each case has a latent risk z ~ N(0, 1); its tiles carry z along a hidden direction (tile
  projection ~ N(z, 1), the rest noise), so the bag mean of the projection estimates z. Event times are exponential
  with rate base_rate x exp(effect x z); censoring times are uniform on [0, censor_max] (patients entering a study
  at random and followed to its end), time = min(T, C), event = 1 when T <= C.
"""

from __future__ import annotations

import numpy as np

from gpfm_scale.contracts.features import Bag


def _direction(rng: np.random.Generator, dim: int) -> np.ndarray:
    u = rng.normal(size=dim)
    return u / np.linalg.norm(u)


def _coords(n: int) -> np.ndarray:
    """A plausible tile grid: level-0 (x, y) of 224-px tiles, row-major."""
    side = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    return np.stack([idx % side, idx // side], axis=1).astype(np.int64) * 224


def make_two_class_bags(num_cases: int = 40, dim: int = 16, bag_size: tuple[int, int] = (20, 40),
                        informative_fraction: float = 0.1, shift: float = 4.0, seed: int = 0,
                        slides_per_case: int = 1) -> list[Bag]:
    """Bags [N, dim] float32 for `num_cases` cases (half of each class), `slides_per_case` slides each.

    row: slide_id, case_id, label (0/1: class 1 holds the shifted tiles), kind "slide" and informative_tiles (the
    shifted rows, the ground truth an attention map should find).
    """
    rng = np.random.default_rng(seed)
    u = _direction(rng, dim)
    labels = np.arange(num_cases) % 2
    rng.shuffle(labels)
    bags = []
    for case, label in enumerate(labels):
        for s in range(slides_per_case):
            n = int(rng.integers(bag_size[0], bag_size[1] + 1))
            x = rng.normal(size=(n, dim))
            informative = np.array([], dtype=np.int64)
            if label == 1:
                k = max(1, round(informative_fraction * n))
                informative = np.sort(rng.choice(n, k, replace=False))
                x[informative] += shift * u
            slide_id = f"case{case:03d}_s{s}"
            row = {"slide_id": slide_id, "case_id": f"case{case:03d}", "label": int(label), "kind": "slide",
                   "informative_tiles": informative.tolist()}
            bags.append(Bag(slide_id, x.astype(np.float32), _coords(n), row))
    return bags


def make_survival_bags(num_cases: int = 60, dim: int = 16, bag_size: tuple[int, int] = (20, 40),
                       effect: float = 2.0, censor_max: float = 60.0, seed: int = 0) -> list[Bag]:
    """One bag per case; row: slide_id, case_id, time (months), event (1 = observed), risk_z (the hidden truth).

    base rate 1/12 per month at z = 0 (median survival ~8 months); `effect` scales how strongly z drives the rate.
    """
    rng = np.random.default_rng(seed)
    u = _direction(rng, dim)
    z = rng.normal(size=num_cases)
    true_times = rng.exponential(12.0 * np.exp(-effect * z))
    censor_times = rng.uniform(0.0, censor_max, size=num_cases)
    bags = []
    for case in range(num_cases):
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        noise = rng.normal(size=(n, dim))
        noise -= np.outer(noise @ u, u)
        x = noise + np.outer(rng.normal(z[case], 1.0, size=n), u)
        event = int(true_times[case] <= censor_times[case])
        slide_id = f"case{case:03d}"
        row = {"slide_id": slide_id, "case_id": slide_id, "kind": "slide",
               "time": float(min(true_times[case], censor_times[case])), "event": event, "risk_z": float(z[case])}
        bags.append(Bag(slide_id, x.astype(np.float32), _coords(n), row))
    return bags
