"""The measurement tuner (tformer.accel.tune): choices, noise, bounds, the per-machine cache, threads.

No real timing anywhere: a fake clock advances by a scripted amount (with seeded jitter) each time a
candidate runs, so every schedule and every choice below is deterministic."""

from __future__ import annotations

import json
import random
import re
import threading
import time
import warnings
from pathlib import Path

import pytest

from tformer.accel import machine, tune
from tformer.accel.machine import cache_dir, fingerprint, fingerprint_key, mode, rows_bucket
from tformer.accel.tune import Tuner

KEY = ("linear", "float32", "train", "2-16", 768, 2304)
OTHER = ("linear", "float32", "infer", "1", 768, 2304)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Op:
    """A candidate that 'takes' `seconds` (x a seeded uniform jitter) on `clock`; counts its calls; raises
    `fail` from call number `fail_at` on."""

    def __init__(
        self, clock: Clock, seconds: float, *, jitter: float = 0.0, seed: int = 0, fail=None, fail_at=1
    ):
        self.clock, self.seconds, self.jitter = clock, seconds, jitter
        self.rng = random.Random(seed)
        self.fail, self.fail_at = fail, fail_at
        self.calls = 0
        self.real_sleep = 0.0

    def __call__(self) -> None:
        self.calls += 1
        if self.real_sleep:
            time.sleep(self.real_sleep)
        if self.fail is not None and self.calls >= self.fail_at:
            raise self.fail
        self.clock.now += self.seconds * (1 + self.rng.uniform(-self.jitter, self.jitter))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("TFORMER_ACCEL", raising=False)
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "cache" / "accel.json"


def ops(clock: Clock, jitter: float = 0.0, **seconds: float) -> dict[str, Op]:
    return {name: Op(clock, s, jitter=jitter, seed=i) for i, (name, s) in enumerate(seconds.items())}


def schedule(seconds_of_slowest: float) -> int:
    """Calls per candidate that the tuner's repeat rule gives when the slowest candidate takes this long."""
    repeats, spent = 0, 0.0
    while repeats < tune._MAX_REPEATS and (repeats < tune._MIN_REPEATS or spent < tune._TARGET_S):
        repeats, spent = repeats + 1, spent + seconds_of_slowest
    return tune._WARMUP + repeats


# -- choices -----------------------------------------------------------------------------------------


def test_the_faster_candidate_wins_and_the_entry_says_why(clock, path):
    cands = ops(clock, jitter=0.05, stock=1e-3, onednn=0.5e-3, slow=2e-3)
    tuner = Tuner(path, timer=clock)
    assert tuner.choose(KEY, cands, stock="stock") == "onednn"
    entry = tuner.record(KEY)
    assert entry["winner"] == "onednn" and entry["stock"] == "stock" and entry["excluded"] == {}
    assert set(entry["median_s"]) == set(entry["noise"]) == {"stock", "onednn", "slow"}
    assert entry["median_s"]["onednn"] == pytest.approx(0.5e-3, rel=0.05)
    assert 0 < entry["noise"]["stock"] < 0.1
    assert tuner.lookup(KEY) == "onednn"


def test_interleaved_round_robin(clock, path):
    order: list[str] = []
    cands = {name: (lambda name=name: order.append(name)) for name in ("stock", "a", "b")}
    Tuner(path, timer=clock).choose(KEY, cands, stock="stock")  # a zero-time clock: 25 rounds
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == ["a", "b", "stock"] for r in rounds)  # every round runs each once
    assert len({r[0] for r in rounds}) == 3  # in a rotating order


def test_warm_up_calls_are_not_timed(clock, path):
    compiled = Op(clock, 0.4e-3)
    first = [True]

    def compiled_kernel() -> None:  # compiles on its first call
        if first[0]:
            first[0] = False
            clock.now += 5.0
        compiled()

    cands = {"stock": Op(clock, 1e-3), "compiled": compiled_kernel}
    tuner = Tuner(path, timer=clock)
    assert tuner.choose(KEY, cands, stock="stock") == "compiled"
    assert cands["stock"].calls == compiled.calls == schedule(1e-3)  # 5 s of compiling is no repeat
    assert tuner.record(KEY)["median_s"]["compiled"] == pytest.approx(0.4e-3)
    assert tuner.spent_s > 5.0  # but it counts against the budget


def test_faster_only_within_the_noise_does_not_win(clock, path):
    # 2% faster, each call with its own +-15% jitter: the paired ratios straddle 1
    noisy = ops(clock, jitter=0.15, stock=1e-3, fast=0.98e-3)
    assert Tuner(path, timer=clock).choose(KEY, noisy, stock="stock") == "stock"
    # the same on a quiet machine is below the 3% floor; 8% there is a real difference
    quiet = ops(clock, stock=1e-3, fast=0.92e-3)
    assert Tuner(path.with_name("b.json"), timer=clock).choose(KEY, quiet, stock="stock") == "fast"


class Loaded:
    """Two candidates on a machine whose load changes from round to round (1x to 3x, seeded), the same
    for both calls of a round: what a neighbour's job does to back-to-back timings."""

    def __init__(self, clock: Clock, **seconds: float) -> None:
        self.clock, self.seconds, self.calls = clock, seconds, 0
        rng = random.Random(0)
        self.load = [rng.uniform(1.0, 3.0) for _ in range(100)]

    def candidate(self, name: str):
        def run() -> None:
            self.clock.now += self.seconds[name] * self.load[self.calls // len(self.seconds)]
            self.calls += 1

        return run


def test_a_gain_under_a_changing_load_still_wins(clock, path):
    """8% faster in every round, while the load moves each round's times by up to 3x: the medians' spreads
    overlap, the paired ratios do not; and the same load with no gain keeps stock."""
    loaded = Loaded(clock, stock=1e-3, fast=0.92e-3)
    cands = {name: loaded.candidate(name) for name in ("stock", "fast")}
    tuner = Tuner(path, timer=clock)
    assert tuner.choose(KEY, cands, stock="stock") == "fast"
    assert min(tuner.record(KEY)["noise"].values()) > 0.2  # what a medians-and-spreads rule would see
    same = Loaded(clock, stock=1e-3, fast=1e-3)
    cands = {name: same.candidate(name) for name in ("stock", "fast")}
    assert Tuner(path.with_name("c.json"), timer=clock).choose(KEY, cands, stock="stock") == "stock"


def test_the_noise_floor(clock, path):
    near = ops(clock, stock=1e-3, fast=0.98e-3)  # 2% faster, no noise: below the 3% floor
    assert Tuner(path, timer=clock).choose(KEY, near, stock="stock") == "stock"


def test_a_slower_candidate_never_wins(clock, path):
    for seed in range(5):
        cands = {
            "stock": Op(clock, 1e-3, jitter=0.1, seed=seed),
            "slower": Op(clock, 1.01e-3, jitter=0.1, seed=seed + 100),
            "much_slower": Op(clock, 3e-3, jitter=0.1, seed=seed + 200),
        }
        assert Tuner(path.with_name(f"{seed}.json"), timer=clock).choose(KEY, cands, stock="stock") == "stock"


def test_a_raising_candidate_is_excluded(clock, path):
    cands = ops(clock, stock=1e-3, fast=0.6e-3)
    cands["broken"] = Op(clock, 0.1e-3, fail=RuntimeError("no oneDNN here"))
    cands["flaky"] = Op(clock, 0.1e-3, fail=RuntimeError("wrong strides"), fail_at=6)  # fails while timed
    tuner = Tuner(path, timer=clock)
    assert tuner.choose(KEY, cands, stock="stock") == "fast"
    entry = tuner.record(KEY)
    assert entry["excluded"] == {
        "broken": "RuntimeError: no oneDNN here",
        "flaky": "RuntimeError: wrong strides",
    }
    assert set(entry["median_s"]) == {"stock", "fast"}
    assert cands["broken"].calls == 1 and cands["flaky"].calls == 6  # not called again once excluded


def test_stock_raising_propagates_and_caches_nothing(clock, path):
    cands = ops(clock, fast=0.5e-3)
    cands["stock"] = Op(clock, 1e-3, fail=ValueError("bad shapes"), fail_at=4)
    tuner = Tuner(path, timer=clock)
    with pytest.raises(ValueError, match="bad shapes"):
        tuner.choose(KEY, cands, stock="stock")
    assert tuner.record(KEY) is None and not path.exists()


def test_stock_must_be_offered_and_keys_must_be_plain(clock, path):
    tuner = Tuner(path, timer=clock)
    with pytest.raises(ValueError, match="'aten'"):
        tuner.choose(KEY, ops(clock, stock=1e-3), stock="aten")
    with pytest.raises(TypeError, match=r"\[768\] is a list"):
        tuner.lookup(("linear", [768]))
    with pytest.raises(TypeError, match="tuple"):
        tuner.lookup(["linear", 768])


def test_only_stock_offered_times_nothing(clock, path):
    cands = ops(clock, stock=1e-3)
    tuner = Tuner(path, timer=clock)
    assert tuner.choose(KEY, cands, stock="stock") == "stock"
    assert cands["stock"].calls == 0 and tuner.summary() is None


@pytest.mark.parametrize("seconds", [1e-5, 1e-3, 0.03, 0.1, 1.0])
def test_repeats_are_bounded(clock, path, seconds):
    cands = ops(clock, stock=seconds, fast=seconds / 3)
    Tuner(path, timer=clock, budget_s=1e9).choose(KEY, cands, stock="stock")
    calls = schedule(seconds)
    assert cands["stock"].calls == cands["fast"].calls == calls
    assert tune._WARMUP + tune._MIN_REPEATS <= calls <= tune._WARMUP + tune._MAX_REPEATS
    if seconds == 1e-5:
        assert calls == tune._WARMUP + tune._MAX_REPEATS
    if seconds >= 0.1:
        assert calls == tune._WARMUP + tune._MIN_REPEATS


def test_ratio(clock, path):
    tuner = Tuner(path, timer=clock)
    bf16, fp32 = Op(clock, 1e-3), Op(clock, 2.5e-3)
    assert tuner.ratio(("bf16-vs-fp32", 768), bf16, fp32) == pytest.approx(2.5)
    calls = bf16.calls
    assert tuner.ratio(("bf16-vs-fp32", 768), bf16, fp32) == pytest.approx(2.5) and bf16.calls == calls
    assert Tuner(path, timer=clock).ratio(("bf16-vs-fp32", 768), bf16, fp32) == pytest.approx(2.5)
    assert bf16.calls == calls  # cached for the next process too

    unsupported = Op(clock, 1e-3, fail=RuntimeError("no bf16"))
    assert tuner.ratio(("bf16-vs-fp32", 64), unsupported, fp32) == 0.0
    assert tuner.record(("bf16-vs-fp32", 64))["excluded"] == {"fast": "RuntimeError: no bf16"}
    with pytest.raises(RuntimeError, match="base broke"):
        tuner.ratio(("bf16-vs-fp32", 32), bf16, Op(clock, 1e-3, fail=RuntimeError("base broke")))


# -- the cache ---------------------------------------------------------------------------------------


def test_a_second_tuner_reuses_the_cache_without_timing(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    again = ops(clock, stock=1e-3, fast=0.5e-3)
    second = Tuner(path, timer=clock)
    assert second.lookup(KEY) == "fast"
    assert second.choose(KEY, again, stock="stock") == "fast"
    assert again["stock"].calls == again["fast"].calls == 0
    assert second.spent_s == 0 and second.summary() is None


def test_the_file_format(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["fingerprint"] == json.loads(json.dumps(fingerprint()))
    (skey, entry), *rest = data["entries"].items()
    assert not rest and json.loads(skey) == list(KEY)
    assert set(entry) == {"winner", "stock", "median_s", "noise", "excluded", "tformer", "time"}
    assert entry["tformer"] == __import__("tformer").__version__


def test_a_winner_not_offered_now_is_remeasured(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    without_winner = ops(clock, stock=1e-3, other=0.8e-3)
    assert Tuner(path, timer=clock).choose(KEY, without_winner, stock="stock") == "other"
    assert without_winner["other"].calls > 0


def test_a_new_candidate_is_measured(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    subset = ops(clock, stock=1e-3)  # a subset that keeps the winner: reused
    subset["fast"] = Op(clock, 0.5e-3)
    assert Tuner(path, timer=clock).choose(KEY, subset, stock="stock") == "fast" and subset["fast"].calls == 0
    more = ops(clock, stock=1e-3, fast=0.5e-3, compiled=0.2e-3)
    assert Tuner(path, timer=clock).choose(KEY, more, stock="stock") == "compiled"


def test_another_fingerprint_invalidates(clock, path, monkeypatch):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    other_machine = {**fingerprint(), "threads": fingerprint()["threads"] + 7}
    monkeypatch.setattr(tune, "fingerprint", lambda: other_machine)
    there = Tuner(path, timer=clock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a foreign file is not a corrupt one
        assert there.lookup(KEY) is None
    cands = ops(clock, stock=1e-3, fast=2e-3)
    assert there.choose(KEY, cands, stock="stock") == "stock" and cands["fast"].calls > 0
    data = json.loads(path.read_text())
    assert data["fingerprint"]["threads"] == other_machine["threads"]  # replaced
    assert data["entries"][json.dumps(list(KEY), separators=(",", ":"))]["winner"] == "stock"


def test_another_schema_invalidates(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tuner(path, timer=clock).lookup(KEY) is None
    data["schema"] = 1
    path.write_text(json.dumps(data))
    assert Tuner(path, timer=clock).lookup(KEY) == "fast"  # the same file with schema 1 is read


def test_another_tformer_version_is_remeasured(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["tformer"] = "0.0.1"
    path.write_text(json.dumps(data))
    cands = ops(clock, stock=1e-3, fast=0.5e-3)
    tuner = Tuner(path, timer=clock)
    assert tuner.lookup(KEY) is None
    assert tuner.choose(KEY, cands, stock="stock") == "fast" and cands["fast"].calls > 0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"schema": 1}', "\xff\xfe", ""])
def test_a_corrupt_file_warns_once_and_is_replaced(clock, path, text):
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("latin-1"))
    tuner = Tuner(path, timer=clock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.lookup(KEY) is None
        assert tuner.choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock") == "fast"
        assert tuner.choose(OTHER, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock") == "fast"
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and len(data["entries"]) == 2


def test_tampered_entries_are_remeasured_not_trusted(clock, path):
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    data = json.loads(path.read_text())
    (skey,) = data["entries"]
    for tampered in (
        {**data["entries"][skey], "winner": ["fast"]},
        {**data["entries"][skey], "median_s": 3},
        7,
    ):
        data["entries"][skey] = tampered
        path.write_text(json.dumps(data))
        cands = ops(clock, stock=1e-3, fast=0.5e-3)
        assert (
            Tuner(path, timer=clock).choose(KEY, cands, stock="stock") == "fast" and cands["fast"].calls > 0
        )
        data = json.loads(path.read_text())


def test_two_tuners_on_one_file_keep_both_entries(clock, path):
    first, second = Tuner(path, timer=clock), Tuner(path, timer=clock)
    assert first.lookup(KEY) is None and second.lookup(OTHER) is None  # both read the (absent) file
    first.choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    second.choose(OTHER, ops(clock, stock=1e-3, slow=2e-3), stock="stock")
    third = Tuner(path, timer=clock)
    assert third.lookup(KEY) == "fast" and third.lookup(OTHER) == "stock"
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_a_key_another_process_timed_meanwhile_is_not_timed_again(clock, path):
    late = Tuner(path, timer=clock)
    assert late.lookup(KEY) is None  # read before the other one wrote
    Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    cands = ops(clock, stock=1e-3, fast=0.5e-3)
    assert late.choose(KEY, cands, stock="stock") == "fast" and cands["fast"].calls == 0


def test_an_unwritable_cache_dir_warns_once_and_still_chooses(clock, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(blocker / "cache"))  # mkdir fails, even as root
    tuner = Tuner(timer=clock)
    with pytest.warns(UserWarning, match="cannot write the tuning cache") as caught:
        assert tuner.choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock") == "fast"
        assert tuner.choose(OTHER, ops(clock, stock=1e-3, slow=2e-3), stock="stock") == "stock"
    assert len(caught) == 1 and str(blocker) in str(caught[0].message)
    assert tuner.lookup(KEY) == "fast" and tuner.lookup(OTHER) == "stock"  # kept in memory
    assert "not cached" in tuner.summary()


def test_the_cache_dir_is_made_on_first_write_only(clock, tmp_path):
    tuner = Tuner(timer=clock)
    assert tuner.path.parent == tmp_path / "cache"
    assert tuner.path.name == f"accel-{fingerprint_key()}.json"
    assert tuner.lookup(KEY) is None and not (tmp_path / "cache").exists()
    tuner.choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    assert tuner.path.is_file()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TFORMER_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "tformer"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid by the XDG spec: ignored
    assert cache_dir() == tmp_path / "home" / ".cache" / "tformer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "tformer"


# -- bounds, modes, reporting ------------------------------------------------------------------------


def test_the_budget_returns_stock_uncached(clock, path):
    tuner = Tuner(path, timer=clock, budget_s=0.5)
    assert tuner.choose(KEY, ops(clock, stock=0.1, fast=0.05), stock="stock") == "fast"  # spends 1.2 s
    assert tuner.spent_s == pytest.approx(schedule(0.1) * 0.15)
    late = ops(clock, stock=0.1, fast=0.05)
    assert tuner.choose(OTHER, late, stock="stock") == "stock"
    assert late["fast"].calls == late["stock"].calls == 0
    assert tuner.record(OTHER) is None and tuner.ratio(("r",), late["fast"], late["stock"]) == 1.0
    assert late["fast"].calls == late["stock"].calls == 0
    # a decision asked for past the budget is timed all the same, and cached
    assert tuner.ratio(("r",), late["fast"], late["stock"], past_budget=True) == pytest.approx(2.0)
    assert late["fast"].calls > 0 and Tuner(path, timer=clock).ratio(
        ("r",), late["fast"], late["stock"]
    ) == pytest.approx(2.0)
    # a later process can still tune it
    assert Tuner(path, timer=clock).choose(OTHER, late, stock="stock") == "fast"


def test_the_budget_cuts_repeats_short(clock, path):
    cands = ops(clock, stock=0.01, fast=0.005)
    Tuner(path, timer=clock, budget_s=0.05).choose(KEY, cands, stock="stock")
    assert cands["stock"].calls == tune._WARMUP + tune._MIN_REPEATS < schedule(0.01)


def test_off_times_nothing(clock, path, monkeypatch):
    monkeypatch.setenv("TFORMER_ACCEL", "off")
    cands = ops(clock, stock=1e-3, fast=0.5e-3)
    tuner = Tuner(path, timer=clock)
    assert mode() == "off"
    assert tuner.choose(KEY, cands, stock="stock") == "stock"
    assert tuner.ratio(("r",), cands["fast"], cands["stock"]) == 1.0
    assert cands["stock"].calls == cands["fast"].calls == 0 and not path.exists()
    monkeypatch.setenv("TFORMER_ACCEL", "auto")  # read at each call
    assert tuner.choose(KEY, cands, stock="stock") == "fast"


def test_a_bad_mode_names_the_variable(clock, path, monkeypatch):
    assert mode() == "auto"
    monkeypatch.setenv("TFORMER_ACCEL", "fast")
    with pytest.raises(ValueError, match=re.escape("TFORMER_ACCEL='fast'") + ".*'auto'.*'off'"):
        mode()
    with pytest.raises(ValueError, match="TFORMER_ACCEL"):
        Tuner(path, timer=clock).choose(KEY, ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")


def test_report_once_and_summary(clock, path):
    lines: list[str] = []
    tuner = Tuner(path, timer=clock, report=lines.append)
    assert tuner.summary() is None
    tuner.choose(KEY, ops(clock, stock=0.01, fast=0.005), stock="stock")  # 0.35 s: not yet
    assert lines == []
    tuner.choose(OTHER, ops(clock, stock=0.1, fast=0.05), stock="stock")  # past 1 s
    tuner.choose(("third",), ops(clock, stock=0.1, fast=0.05), stock="stock")
    assert len(lines) == 1 and str(path) in lines[0]
    assert re.fullmatch(
        r"tformer accel: timed 3 kernel choices in \d+\.\d s on .+ \(cached in .+\)", tuner.summary()
    )


def test_threads_asking_for_one_key_time_it_once(clock, path):
    cands = ops(clock, stock=1e-3, fast=0.5e-3)
    for op in cands.values():
        op.real_sleep = 1e-4  # lets the other threads run while one is timing
    tuner = Tuner(path, timer=clock)
    barrier = threading.Barrier(4)
    answers: list[str] = []

    def ask() -> None:
        barrier.wait()
        answers.append(tuner.choose(KEY, cands, stock="stock"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["fast"] * 4
    assert cands["stock"].calls == cands["fast"].calls == schedule(1e-3)


def test_a_candidate_may_ask_for_an_inner_choice(clock, path):
    tuner = Tuner(path, timer=clock)
    inner = ops(clock, stock=1e-3, fast=0.5e-3)

    def outer_fast() -> None:
        tuner.choose(OTHER, inner, stock="stock")  # timed on the first call, then cached
        clock.now += 0.5e-3

    assert tuner.choose(KEY, {"stock": Op(clock, 2e-3), "fast": outer_fast}, stock="stock") == "fast"
    assert tuner.lookup(OTHER) == "fast" and inner["fast"].calls == schedule(1e-3)


# -- keys and fingerprints ---------------------------------------------------------------------------


def test_rows_bucket():
    assert [rows_bucket(n) for n in (1, 2, 16, 17, 4096)] == ["1", "2-16", "2-16", ">16", ">16"]
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            rows_bucket(bad)


def test_keys_that_differ_in_type_are_different(clock, path):
    tuner = Tuner(path, timer=clock)
    tuner.choose(("k", 1), ops(clock, stock=1e-3, fast=0.5e-3), stock="stock")
    assert tuner.lookup(("k", 1)) == "fast"
    assert (
        tuner.lookup(("k", 1.0)) is None
        and tuner.lookup(("k", True)) is None
        and tuner.lookup(("k", "1")) is None
    )


def test_fingerprint_key_is_stable_and_follows_every_field():
    fp = fingerprint()
    assert set(fp) == {"cpu", "isa", "cpu_count", "threads", "torch", "cuda"}
    key = fingerprint_key(fp)
    assert re.fullmatch(r"[0-9a-f]{12}", key)
    assert fingerprint_key() == key == fingerprint_key(dict(reversed(list(fp.items()))))
    assert fingerprint_key({**fp, "threads": fp["threads"] + 1}) != key
    assert fingerprint_key({**fp, "cpu": fp["cpu"] + " v2"}) != key
    assert fingerprint_key({**fp, "isa": [*fp["isa"], "amx_tile"]}) != key


def test_cpuinfo_parsing():
    x86 = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma avx512f amx_tile sha_ni\n"
    )
    assert machine._parse_cpuinfo(x86 * 2) == ("AMD EPYC 7B13", ["amx_tile", "avx2", "avx512f", "fma"])
    arm = (
        "processor\t: 0\nFeatures\t: fp asimd aes sve bf16 i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    )
    name, isa = machine._parse_cpuinfo(arm)
    assert name.endswith("implementer 0x41 part 0xd40") and isa == ["asimd", "bf16", "i8mm", "sve"]
    assert machine._parse_cpuinfo("") == (None, [])
