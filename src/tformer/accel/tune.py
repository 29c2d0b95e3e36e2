"""Choose machine-specific kernels by timing them on the machine at hand, once, and remember the choice.

Why: a kernel that one CPU measured faster (oneDNN's linear over `F.linear`, a compiled one-row product, a
bfloat16 path) is a hypothesis on the next CPU, whose cores, ISA, caches, thread count and PyTorch build
differ. So tformer does not hard-code what one machine once measured: it times the candidates on the
user's machine, keeps a non-stock path only where it measured faster than stock by more than the
measurement's own noise, and caches the winner per machine so that the timing happens once.

Keys: the caller forms shape classes, named by a tuple of str/int/float/bool/None (stored as its canonical
JSON string): the operation, dtype, mode, then the sizes that matter, with sizes that vary per call in
buckets so that one timing covers a class of calls, e.g. `("linear", "float32", "train",
rows_bucket(rows), 768, 2304)` (`rows_bucket`: "1", "2-16", ">16"). `1`, `1.0` and `True` differ.

Timing (`Tuner.choose`): each candidate callable runs the whole operation once. All are called `_WARMUP`
times, then timed round-robin in a rotating order (a noisy neighbour hits all alike) for `_MIN_REPEATS` to
`_MAX_REPEATS` rounds, until the slowest has taken `_TARGET_S`. Noise is the spread between the quartiles
relative to the median (recorded). A non-stock candidate wins only if, in the paired rounds, stock's time
over its own exceeds 1 + `_NOISE_FLOOR` in three rounds of four: the two ran back to back, so a
neighbour's load that slows both cancels, where comparing medians against the quartile spreads would
need a loaded machine to show a 2x gain before trusting it. A candidate that raises is excluded (the entry says why);
`stock` raising propagates. `Tuner.ratio` caches median(base) / median(fast) the same way. After `budget_s`
seconds of timing, and always under `TFORMER_ACCEL=off`, nothing is timed: `choose` returns `stock` and
`ratio` 1.0 (unless asked with `past_budget=True`), uncached, so that a later process can still tune.

Cache (accel/tune_cache.py): one JSON file per machine `fingerprint()` (accel/machine.py), written
atomically and merged with what other processes wrote. An entry is re-measured if another tformer version
or another stock made it, or if its winner is not offered now, or a name offered now was not measured
then. If the cache cannot be written, the Tuner warns once and keeps its results in memory.

Threads: one re-entrant lock covers timing and the cache, so threads asking for one key time it once and
no two timings overlap (a candidate may itself ask for an inner choice). Reporting: `summary()` is a line
for the caller to print; `report`, if given, is called once, when timing first passes `_REPORT_AFTER_S`,
to say that tuning is running and where it is cached.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeAlias

from tformer import __version__
from tformer.accel.machine import Fingerprint, cache_dir, fingerprint, fingerprint_key, mode
from tformer.accel.tune_cache import CacheFile
from tformer.jsontypes import JSONObject

# A shape class's name: str/int/float/bool/None parts, stored as its canonical JSON string
Key: TypeAlias = tuple[str | int | float | bool | None, ...]

_WARMUP = 3  # untimed calls per candidate (first-call allocation, compilation, caches)
_MIN_REPEATS = 5
_MAX_REPEATS = 25
_TARGET_S = 0.2  # stop adding repeats once the slowest candidate has taken this long
_NOISE_FLOOR = 0.03  # a non-stock winner must be at least this much (relative) faster than stock
_REPORT_AFTER_S = 1.0


def _canonical(key: Key) -> str:
    if not isinstance(key, tuple):
        raise TypeError(f"a tuning key is a tuple of str/int/float/bool/None, got {key!r}")
    for part in key:
        if part is not None and not isinstance(part, (str, int, float)):
            raise TypeError(
                f"tuning key {key!r}: {part!r} is a {type(part).__name__}; expected str, int, float, bool or None"
            )
        if isinstance(part, float) and not math.isfinite(part):
            raise ValueError(f"tuning key {key!r}: {part!r} is not a finite float")
    return json.dumps(list(key), separators=(",", ":"))


def _stats(samples: list[float]) -> tuple[float, float]:
    """-> (median, relative spread between the quartiles)."""
    median = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    spread = q3 - q1
    if median > 0:
        return median, spread / median
    return median, 0.0 if spread == 0 else 1.0  # a zero median (a coarse clock): no evidence either way


def _winner(stock: str, samples: dict[str, list[float]]) -> str:
    """The candidate that beat stock in the paired rounds: stock's time over its time, round by round (the
    two ran back to back, so a load that slows both cancels), must exceed 1 + `_NOISE_FLOOR` in three
    rounds of four (the lower quartile of those ratios); among several, the fastest by median ratio."""
    best, best_ratio = stock, 1.0
    for name, times in samples.items():
        if name == stock or len(times) != len(samples[stock]) or not times:
            continue
        ratios = [s / t if t > 0 else math.inf for s, t in zip(samples[stock], times, strict=True)]
        q1 = statistics.quantiles(ratios, n=4, method="inclusive")[0] if len(ratios) > 1 else ratios[0]
        median = statistics.median(ratios)
        if q1 > 1 + _NOISE_FLOOR and median > best_ratio:
            best, best_ratio = name, median
    return best


def _reason(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def _display(path: Path) -> str:
    with contextlib.suppress(RuntimeError, ValueError):
        return f"~/{path.relative_to(Path.home())}"
    return str(path)


class Tuner:
    """Times candidate kernels once per machine and caches the winners in one JSON file (see the module doc).

    path: the cache file, default `cache_dir() / f"accel-{fingerprint_key()}.json"`. timer: the clock (the
    tests inject a fake one). budget_s: seconds of timing after which this Tuner only answers from its cache.
    report: called once with a line saying that tuning is running, once timing has taken over a second.
    The machine's fingerprint is taken when the Tuner is made (set torch's thread count before)."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        timer: Callable[[], float] = time.perf_counter,
        budget_s: float = 20.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s >= 0:
            raise ValueError(f"budget_s={budget_s!r}: expected a number of seconds >= 0")
        fp = fingerprint()
        self._fingerprint: Fingerprint = json.loads(json.dumps(fp))  # as it reads back from the file
        self.path = Path(path) if path is not None else cache_dir() / f"accel-{fingerprint_key(fp)}.json"
        self._file = CacheFile(self.path, self._fingerprint)
        self._timer = timer
        self._budget_s = float(budget_s)
        self._report = report
        self._lock = threading.RLock()
        self._entries: dict[str, JSONObject] | None = None  # loaded on first use
        self._measured: dict[str, JSONObject] = {}  # what this Tuner timed: wins when merging
        self._writable = True
        self._reported = False
        self._spent = 0.0
        self._count = 0
        self._depth = 0

    # -- answers -----------------------------------------------------------------------------------

    def lookup(self, key: Key, *, stock: str | None = None) -> str | None:
        """The cached winner for this shape class (made by this tformer version; against `stock` where
        given, as `choose` would take it), or None."""
        skey = _canonical(key)
        with self._lock:
            entry = self._cached(skey)
        if entry is None or entry.get("tformer") != __version__ or stock not in (None, entry.get("stock")):
            return None
        winner = entry.get("winner")
        return winner if isinstance(winner, str) else None

    def record(self, key: Key) -> JSONObject | None:
        """A copy of the cached entry (winner, median_s, noise, excluded, tformer, time), or None."""
        skey = _canonical(key)
        with self._lock:
            entry = self._cached(skey)
            return copy.deepcopy(entry)

    def choose(self, key: Key, candidates: Mapping[str, Callable[[], object]], *, stock: str) -> str:
        """The name of the fastest candidate for this shape class, `stock` unless another is reliably faster."""
        skey = _canonical(key)
        if stock not in candidates:
            raise ValueError(f"stock={stock!r} is not among the candidates {sorted(candidates)}")
        if mode() == "off" or len(candidates) == 1:
            return stock
        with self._lock:
            entry = self._cached(skey)
            if entry is not None and self._reusable(entry, candidates, stock):
                return str(entry["winner"])
            if self._spent >= self._budget_s:
                return stock
            entry = self._cached(skey, refresh=True)
            if entry is not None and self._reusable(entry, candidates, stock):
                return str(entry["winner"])
            median_s, noise, excluded, samples = self._measure(candidates, must_run=stock)
            winner = _winner(stock, {n: t for n, t in samples.items() if n not in excluded})
            self._store(skey, {"winner": winner, "stock": stock, **self._facts(median_s, noise, excluded)})
            message = self._due_report()
        if message is not None and self._report is not None:
            self._report(message)
        return winner

    def ratio(
        self,
        key: Key,
        fast: Callable[[], object],
        base: Callable[[], object],
        *,
        past_budget: bool = False,
        warmup: int = _WARMUP,
        min_repeats: int = _MIN_REPEATS,
        extra: JSONObject | None = None,
    ) -> float:
        """median(base) / median(fast), cached: > 1 where `fast` is faster (with `extra` facts in its entry,
        which `record` gives back). 1.0 untimed (off, out of budget;
        `past_budget=True` times it even after the budget is spent, for a decision too coarse to default,
        such as the precision of a whole run); 0.0 where `fast` raises (it cannot run here); `base` raising
        propagates. `warmup` untimed calls and at least `min_repeats` timed rounds each: fewer for calls
        that take seconds (a whole training step)."""
        skey = _canonical(key)
        if mode() == "off":
            return 1.0
        with self._lock:
            cached = self._cached_ratio(skey)
            if cached is not None:
                return cached
            if self._spent >= self._budget_s and not past_budget:
                return 1.0
            cached = self._cached_ratio(skey, refresh=True)
            if cached is not None:
                return cached
            median_s, noise, excluded, _ = self._measure(
                {"base": base, "fast": fast}, must_run="base", warmup=warmup, min_repeats=min_repeats
            )
            if "fast" in excluded:
                value = 0.0
            else:
                value = median_s["base"] / median_s["fast"] if median_s["fast"] > 0 else 1.0
            self._store(skey, {**(extra or {}), "ratio": value, **self._facts(median_s, noise, excluded)})
            message = self._due_report()
        if message is not None and self._report is not None:
            self._report(message)
        return value

    def cached_ratio(self, key: Key) -> float | None:
        """The ratio `ratio(key, ...)` would return from the cache without timing (made by this tformer
        version), or None where this machine has not measured it."""
        skey = _canonical(key)
        with self._lock:
            return self._cached_ratio(skey)

    def _cached_ratio(self, skey: str, *, refresh: bool = False) -> float | None:
        entry = self._cached(skey, refresh=refresh)
        value = entry.get("ratio") if entry is not None and entry.get("tformer") == __version__ else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def spent_s(self) -> float:
        """Seconds this Tuner spent timing (warm-up included)."""
        return self._spent

    def summary(self) -> str | None:
        """One line on what this Tuner timed, for the caller to print; None if it timed nothing."""
        if self._count == 0:
            return None
        n = self._count
        where = (
            f"cached in {_display(self.path)}"
            if self._writable
            else f"not cached: {_display(self.path)} unwritable"
        )
        return (
            f"tformer accel: timed {n} kernel choice{'' if n == 1 else 's'} in {self._spent:.{2 if self._spent < 1 else 1}f} s"
            f" on {self._fingerprint['cpu']} ({where})"
        )

    # -- timing ------------------------------------------------------------------------------------

    def _measure(
        self,
        candidates: Mapping[str, Callable[[], object]],
        *,
        must_run: str,
        warmup: int = _WARMUP,
        min_repeats: int = _MIN_REPEATS,
    ) -> tuple[dict[str, float], dict[str, float], dict[str, str], dict[str, list[float]]]:
        """Warm up, then time the candidates in rotating round-robin. -> (median_s, noise, excluded, the
        timed samples by round)."""
        names = list(candidates)
        samples: dict[str, list[float]] = {name: [] for name in names}
        excluded: dict[str, str] = {}
        self._depth += 1
        start = self._timer()
        try:
            for r in range(warmup + _MAX_REPEATS):
                alive = [name for name in names if name not in excluded]
                shift = r % len(alive)
                for name in alive[shift:] + alive[:shift]:
                    t0 = self._timer()
                    try:
                        candidates[name]()
                    except Exception as exc:
                        if name == must_run:
                            raise
                        excluded[name] = _reason(exc)
                        continue
                    if r >= warmup:
                        samples[name].append(self._timer() - t0)
                if r + 1 - warmup >= min_repeats:
                    slowest = max(sum(samples[name]) for name in names if name not in excluded)
                    out_of_budget = self._spent + (self._timer() - start) >= self._budget_s
                    if slowest >= _TARGET_S or out_of_budget:
                        break
        finally:
            self._depth -= 1
            if self._depth == 0:  # an inner choice made inside a candidate is in the outer's time already
                self._spent += self._timer() - start
        self._count += 1
        median_s: dict[str, float] = {}
        noise: dict[str, float] = {}
        for name in names:
            if name not in excluded:
                median_s[name], noise[name] = _stats(samples[name])
        return median_s, noise, excluded, samples

    @staticmethod
    def _facts(median_s: dict[str, float], noise: dict[str, float], excluded: dict[str, str]) -> JSONObject:
        return {
            "median_s": dict(median_s),
            "noise": dict(noise),
            "excluded": dict(excluded),
            "tformer": __version__,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    @staticmethod
    def _reusable(entry: JSONObject, candidates: Mapping[str, Callable[[], object]], stock: str) -> bool:
        """A cached choice stands if made by this version for this stock, its winner is offered, and every
        name offered now was measured (or excluded) then."""
        measured: set[str] = set()
        for field in ("median_s", "excluded"):
            names = entry.get(field)
            if not isinstance(names, dict):
                return False
            measured |= set(names)
        winner = entry.get("winner")
        return (
            entry.get("tformer") == __version__
            and entry.get("stock") == stock
            and isinstance(winner, str)
            and winner in candidates
            and set(candidates) <= measured
        )

    def _due_report(self) -> str | None:
        if self._reported or self._spent <= _REPORT_AFTER_S:
            return None
        self._reported = True
        return (
            "tformer accel: timing kernel candidates on this machine, once "
            f"(cached in {_display(self.path)}; TFORMER_ACCEL=off skips it)"
        )

    # -- the cache -----------------------------------------------------------------------------------

    def _cached(self, skey: str, *, refresh: bool = False) -> JSONObject | None:
        """The entry in memory, the file read on first use; refresh: read it again (another process may have
        timed this key meanwhile), done only right before timing."""
        if self._entries is None or refresh:
            self._entries = {**self._file.read(), **self._measured}
        return self._entries.get(skey)

    def _store(self, skey: str, entry: JSONObject) -> None:
        self._measured[skey] = entry
        assert self._entries is not None  # _cached ran first
        self._entries[skey] = entry
        if not self._writable:
            return
        try:
            self._entries = dict(self._file.write(self._measured))
        except OSError as exc:
            self._writable = False
            warnings.warn(
                f"tformer accel: cannot write the tuning cache {self.path} ({type(exc).__name__}: {exc}); "
                "keeping the results in memory only",
                stacklevel=3,  # the caller of choose/ratio
            )
