"""Survival targets from index rows, with the censoring convention checked on load.

The convention: `event` = 1 when the death/progression was observed, 0 when the patient was censored (alive or
lost at the last follow-up). The GPFM benchmark once shipped a column named `censorship` that actually held the
status (1 = dead), i.e. flipped, and every c-index computed with it was wrong without any error. So:

1. **Structure (always refused).** The event column (`event` by default) must exist and hold only 0/1 (or
   booleans); times must be finite and >= 0. Rows that carry a censorship-like column (`censorship`, `censored`,
   `censor`, `is_censored`) or an ambiguous `status` but no event column are refused with a message that says how
   to state the meaning explicitly (`survival.censorship_column`, converted as event = 1 - censorship and logged,
   or `survival.event_column`), instead of guessing. Rows that carry both an event column and a censorship-like
   column must have them complementary (event + censorship = 1 on every row); equal columns are refused as "one
   of them is flipped".
2. **Plausibility (refused by default; `censoring_check: warn` only warns).** The statistic is
   P(event time > censored time) over every (event, censored) pair, ties counted 1/2 (a Mann-Whitney AUC). When
   censoring is independent of a homogeneous risk it is about 0.5; it falls below 0.5 when censoring happens at
   the end of follow-up (the data cut-off: censored patients are the long survivors) and when high-risk patients
   die early, which is what cohorts look like. A flipped column swaps the two groups and turns the statistic
   around (1 - p). With at least `min_each` events and censored patients, a value >= `flip_threshold` (0.65)
   marks the labels as likely flipped. It is a heuristic: a cohort with heavy early drop-out can trip it, hence
   the `warn` escape, which is recorded with the results.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from gpfm_scale.errors import ConfigError, GpfmError
from gpfm_scale.evaluate.slide_config import SurvivalConfig

log = logging.getLogger(__name__)

CENSORSHIP_NAMES = ("censorship", "censored", "censor", "is_censored")
AMBIGUOUS_NAMES = ("status",)


@dataclass(frozen=True)
class CensoringCheck:
    """What was read and what the plausibility test found (recorded beside the results)."""

    source: str
    num_events: int
    num_censored: int
    event_later_prob: float
    suspect: bool


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _binary_column(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    values = np.zeros(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        value = row.get(column)
        if _missing(value) or value not in (0, 1):
            raise GpfmError(f"slide {row.get('slide_id')!r}: {column}={value!r}; expected 0 or 1")
        values[i] = int(value)
    return values


def _times(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    times = np.array([np.nan if _missing(r.get(column)) else float(r[column]) for r in rows], dtype=np.float64)
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        row = rows[int(np.flatnonzero(bad)[0])]
        raise GpfmError(f"slide {row.get('slide_id')!r}: {column}={row.get(column)!r}; expected a finite time >= 0 "
                        f"({int(bad.sum())} such rows)")
    return times


def _events(rows: list[dict[str, Any]], cfg: SurvivalConfig) -> tuple[np.ndarray, str]:
    """Event indicator [n] (1 = observed) and a sentence saying where it came from."""
    columns = set().union(*(r.keys() for r in rows))
    used = (cfg.event_column, cfg.censorship_column)
    others = [c for c in CENSORSHIP_NAMES if c in columns and c not in used]
    ambiguous = [c for c in AMBIGUOUS_NAMES if c in columns and c not in used]
    if cfg.censorship_column is not None:
        if cfg.censorship_column not in columns:
            raise ConfigError(f"survival.censorship_column={cfg.censorship_column!r} is not a column of the index")
        log.warning("survival: event = 1 - %s (column given as 1 = censored)", cfg.censorship_column)
        return 1 - _binary_column(rows, cfg.censorship_column), f"1 - {cfg.censorship_column}"
    if cfg.event_column not in columns:
        found = others + ambiguous
        hint = (f" The index has {found}: if 1 there means censored, set survival.censorship_column={found[0]!r}; "
                f"if 1 means death/progression, set survival.event_column={found[0]!r}. Beware: the GPFM "
                f"benchmark's 'censorship' column held the status (1 = dead)." if found else "")
        raise ConfigError(f"survival needs an event column {cfg.event_column!r} (1 = event observed).{hint}")
    events = _binary_column(rows, cfg.event_column)
    for other in others:
        if any(_missing(r.get(other)) for r in rows):
            continue
        censorship = _binary_column(rows, other)
        if (events == censorship).all():
            raise GpfmError(f"{cfg.event_column!r} equals {other!r} on every row: one of them is flipped "
                            f"(expected event = 1 - censorship); fix the labels before evaluating")
        if not (events + censorship == 1).all():
            raise GpfmError(f"{cfg.event_column!r} and {other!r} disagree (event + censorship != 1 on "
                            f"{int((events + censorship != 1).sum())} rows)")
    return events, cfg.event_column


def event_later_probability(times: np.ndarray, events: np.ndarray) -> float:
    """P(time of a random event > time of a random censored patient), ties 1/2; NaN without both kinds."""
    events = np.asarray(events, dtype=bool)
    n_event, n_censored = int(events.sum()), int((~events).sum())
    if n_event == 0 or n_censored == 0:
        return float("nan")
    ranks = rankdata(times)
    u = ranks[events].sum() - n_event * (n_event + 1) / 2
    return float(u / (n_event * n_censored))


def check_censoring(times: np.ndarray, events: np.ndarray, cfg: SurvivalConfig, source: str) -> CensoringCheck:
    """Run the plausibility test; raise (censoring_check=error) or warn when the events look flipped."""
    events = np.asarray(events, dtype=bool)
    n_event, n_censored = int(events.sum()), int((~events).sum())
    prob = event_later_probability(times, events)
    testable = n_event >= cfg.min_each and n_censored >= cfg.min_each
    suspect = bool(testable and prob >= cfg.flip_threshold)
    check = CensoringCheck(source, n_event, n_censored, prob, suspect)
    if not testable:
        log.info("censoring check skipped: %d events, %d censored (need %d of each)", n_event, n_censored,
                 cfg.min_each)
    if suspect:
        message = (f"survival labels look flipped: event times are later than censored times in "
                   f"{prob:.0%} of (event, censored) pairs (threshold {cfg.flip_threshold:.0%}; {n_event} events, "
                   f"{n_censored} censored, event from {source}). Expected: event = 1 when death/progression "
                   f"was observed. Check the column; if the data are right, set survival.censoring_check=warn.")
        if cfg.censoring_check == "error":
            raise GpfmError(message)
        log.warning(message)
    return check


def read_survival_labels(rows: list[dict[str, Any]], cfg: SurvivalConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Index rows -> (times [n] float64, events [n] bool, where the events came from); structural checks only."""
    if not rows:
        raise GpfmError("no rows to read survival targets from")
    events, source = _events(rows, cfg)
    return _times(rows, cfg.time_column), events.astype(bool), source


def survival_targets(rows: list[dict[str, Any]], cfg: SurvivalConfig) -> tuple[np.ndarray, np.ndarray, CensoringCheck]:
    """Index rows -> (times [n] float64, events [n] bool, the check), refusing inconsistent or flipped labels."""
    times, events, source = read_survival_labels(rows, cfg)
    return times, events, check_censoring(times, events, cfg, source)
