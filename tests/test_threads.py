"""Several threads at once: predictors loaded from checkpoints give the serial results, generation's compiled
products are per thread, and nothing changes a shared model's mode or the process's
malloc policy behind the caller's back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tformer.accel.linear as tl
import tformer.allocator
from support import models as viz_models
from tformer.config import ClassifierConfig, LMConfig, ModelConfig, TrainConfig
from tformer.data.batching import pad
from tformer.data.tokenizers import Tokenizer
from tformer.inference import beam_search, generate, greedy_decode
from tformer.models import Classifier, LanguageModel
from tformer.models.seq2seq import Seq2Seq
from tformer.tasks import TextClassifier, TextGenerator, TranslationTask, Translator
from tformer.training import Trainer
from tformer.training.checkpoint import save_checkpoint

THREADS, ROUNDS = 4, 2
PROMPTS = ["the black", "a white dog", "the house"]


def _generator() -> TextGenerator:
    """d_ff = d_model: three weight shapes, so three kernels for compile=True to compile (each about 1 s
    with inductor's disk cache warm, 3 s cold, on 2 cores)."""
    torch.manual_seed(0)
    tok = Tokenizer.train(viz_models.ENGLISH, kind="char")
    config = LMConfig(**{**viz_models.SMALL, "d_ff": viz_models.SMALL["d_model"]}, vocab_size=tok.vocab_size)
    return TextGenerator(LanguageModel(config), tok)


def _save_generator(g: TextGenerator, path: Path) -> Path:
    config = {"task": "lm", "model": g.model.config.to_dict()}
    return save_checkpoint(
        path, model=g.model, config=config, write_extra=lambda d: g.tok.save(d / "tokenizer.json")
    )


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three predictors, each loaded from a tiny checkpoint (untrained: the outputs only need to be
    deterministic)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "translator": Translator.load(
            viz_models.save_translator(viz_models.translator(), root / "tr"), accel=True
        ),
        "classifier": TextClassifier.load(
            viz_models.save_classifier(viz_models.classifier(), root / "clf"), accel=True
        ),
        "generator": TextGenerator.load(_save_generator(_generator(), root / "lm"), accel=True),
    }


class GemvSpy:
    """Records which threads reached the compiled matrix-vector path (tformer.accel.linear._gemv), and flags a
    thread that reached it while its current job asked for compile=False."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real, self.local = real, threading.local()
        self.lock = threading.Lock()
        self.compiled_threads: set[int] = set()
        self.wrong: list[str] = []

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.compiled_threads.add(threading.get_ident())
            if getattr(self.local, "compile", None) is False:
                self.wrong.append(getattr(self.local, "job", "?"))
        return self.real(*args)


@pytest.fixture
def gemv(monkeypatch: pytest.MonkeyPatch) -> Iterator[GemvSpy]:
    """Every product takes the compiled path where it is on (the tiny models' products are below the size
    at which it normally starts), with a spy in front of it."""
    spy = GemvSpy(tl._gemv)
    monkeypatch.setattr(tl, "ONEDNN_MIN_MNK", 0)
    monkeypatch.setattr(tl, "_gemv", spy)
    yield spy


def _gemv_is_on(spy: GemvSpy) -> bool:
    """Whether a one-row product in this thread goes to the compiled path now. The probe's weight is not
    contiguous, so the real path declines it and nothing is compiled."""
    me = threading.get_ident()
    with spy.lock:
        spy.compiled_threads.discard(me)
    weight = torch.randn(16, 8).t()  # (8, 16), not contiguous
    with torch.no_grad():
        tl.accel_linear(torch.randn(1, 16), weight)
    return me in spy.compiled_threads


def _jobs(p: dict[str, Any]) -> list[tuple[str, bool, Callable[[], Any]]]:
    """(name, compile, call): each predictor's calls, generation both compiled and not."""
    tr, clf, gen = p["translator"], p["classifier"], p["generator"]
    jobs: list[tuple[str, bool, Callable[[], Any]]] = [
        ("translate greedy", False, lambda: tr.translate(viz_models.FRENCH, beam_size=1)),
        ("translate beam", False, lambda: tr.translate(viz_models.FRENCH, beam_size=3)),
        ("classify", False, lambda: clf.predict(viz_models.ENGLISH)),
    ]
    for compile_ in (True, False):
        for n, prompt in enumerate(PROMPTS):
            jobs.append(
                (
                    f"generate {prompt!r} compile={compile_}",
                    compile_,
                    lambda prompt=prompt, n=n, c=compile_: (
                        gen.generate(prompt, max_new_tokens=14, greedy=True, compile=c),
                        gen.generate(prompt, max_new_tokens=14, seed=n, top_k=5, compile=c),
                    ),
                )
            )
    return jobs


def test_predictors_from_threads_give_the_serial_results(predictors, gemv, monkeypatch):
    """4 threads x 2 rounds of every job (translation, classification, generation compiled and not), a
    barrier at each round so that they overlap: exactly the serial outputs; compiled products only in
    the compile=True calls; no model's mode touched."""
    jobs = _jobs(predictors)
    t0 = time.perf_counter()
    serial = {name: call() for name, _, call in jobs}  # (compiles the generator's kernels, once)
    print(f"serial pass, compiling included: {time.perf_counter() - t0:.1f} s")
    assert gemv.compiled_threads and not gemv.wrong  # the compiled path is exercised

    mode_calls: list[bool] = []
    real_train = nn.Module.train

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        mode_calls.append(mode)
        return real_train(self, mode)

    monkeypatch.setattr(nn.Module, "train", train)
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> list[tuple[str, Any]]:
        out = []
        for r in range(ROUNDS):
            barrier.wait()
            # each thread starts each round at a different job: compiled and uncompiled generations overlap
            for name, compile_, call in jobs[(i * 3 + r) % len(jobs) :] + jobs[: (i * 3 + r) % len(jobs)]:
                gemv.local.compile, gemv.local.job = compile_, name
                out.append((name, call()))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for rs in pool.map(worker, range(THREADS)) for r in rs]
    print(f"threaded pass: {time.perf_counter() - t0:.1f} s")
    assert len(results) == THREADS * ROUNDS * len(jobs)
    for name, got in results:
        assert got == serial[name], name
    assert not gemv.wrong, f"compiled products in compile=False calls: {sorted(set(gemv.wrong))}"
    assert not mode_calls, "a predictor switched its model's mode"
    assert not any(m.training for p in predictors.values() for m in p.model.modules())


def test_overlapping_generations_leave_each_thread_its_own_setting(predictors, gemv):
    """A compile=True generation entered first and left first while a compile=False one runs: neither
    sees the other's setting, and the main thread's is what it was (once, both were left on)."""
    model = predictors["generator"].model
    prompt = torch.tensor([[1, 2, 3]])
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def compiled() -> None:
        def stop(ids: torch.Tensor) -> bool:
            if not a_inside.is_set():
                a_inside.set()
                assert b_inside.wait(30)
            return False

        generate(model, prompt, max_new_tokens=4, greedy=True, compile=True, stop=stop)
        seen["a after"] = _gemv_is_on(gemv)
        a_done.set()

    def uncompiled() -> None:
        def stop(ids: torch.Tensor) -> bool:
            if not b_inside.is_set():
                b_inside.set()
                assert a_done.wait(30)
                seen["b inside, after a left"] = _gemv_is_on(gemv)
            return False

        assert a_inside.wait(30)
        generate(model, prompt, max_new_tokens=4, greedy=True, compile=False, stop=stop)
        seen["b after"] = _gemv_is_on(gemv)

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(compiled), pool.submit(uncompiled)]:
            f.result(timeout=60)
    seen["main"] = _gemv_is_on(gemv)
    assert seen == {"a after": False, "b inside, after a left": False, "b after": False, "main": False}


def test_compiled_setting_is_per_thread(gemv):
    """A block in one thread is not seen by another, nor by the main thread once the threads are done."""
    inside, checked = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def setter() -> None:
        with tl.compiled_decoding():
            seen["setter"] = _gemv_is_on(gemv)
            inside.set()
            assert checked.wait(30)
        seen["setter after"] = _gemv_is_on(gemv)

    def other() -> None:
        assert inside.wait(30)
        seen["other"] = _gemv_is_on(gemv)
        checked.set()

    with tl.compiled_decoding(False):  # the main thread's own block, around the threads
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(setter), pool.submit(other)]:
                f.result(timeout=60)
        seen["main inside"] = _gemv_is_on(gemv)
    seen["main"] = _gemv_is_on(gemv)
    assert seen == {
        "setter": True,
        "other": False,
        "setter after": False,
        "main inside": False,
        "main": False,
    }


def _mode_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_generate_on_a_training_model_runs_it_in_eval_mode_and_restores_each_flag():
    """Dropout off for the call; afterwards every module's own flag is back (here one submodule was in
    eval mode within a training model: `model.train(True)` would have switched it)."""
    torch.manual_seed(0)
    tok = Tokenizer.train(viz_models.ENGLISH, kind="char")
    config = LMConfig(**{**viz_models.SMALL, "dropout": 0.5}, vocab_size=tok.vocab_size)
    model = LanguageModel(config)
    prompt = torch.tensor([[1, 2, 3]])
    expected = generate(model.eval(), prompt, max_new_tokens=10, greedy=True)
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.Dropout)).eval()
    flags = _mode_flags(model)
    assert generate(model, prompt, max_new_tokens=10, greedy=True).tolist() == expected.tolist()
    assert _mode_flags(model) == flags


def test_decoding_a_training_model_runs_it_in_eval_mode_and_restores_its_mode():
    torch.manual_seed(0)
    tr = viz_models.translator(dropout=0.5)
    model, t = tr.model, tr.tgt_tok
    src = pad(tr.encode(viz_models.FRENCH[:2]), tr.src_tok.pad_id)  # (2, S)
    kw: dict[str, Any] = {"bos_id": t.bos_id, "eos_id": t.eos_id, "max_len": 12}
    expected = (greedy_decode(model.eval(), src, **kw), beam_search(model, src, beam_size=3, **kw))
    model.train()
    flags = _mode_flags(model)
    assert (greedy_decode(model, src, **kw), beam_search(model, src, beam_size=3, **kw)) == expected
    assert _mode_flags(model) == flags


def test_predictors_put_their_model_in_eval_mode_once_when_made():
    torch.manual_seed(0)
    tok = Tokenizer.train(viz_models.ENGLISH, kind="word")
    config = ClassifierConfig(**viz_models.SMALL, vocab_size=tok.vocab_size, n_classes=2)
    clf = TextClassifier(Classifier(config).train(), tok, ["neg", "pos"])
    mc = ModelConfig(**viz_models.SMALL, src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size)
    tr = Translator(Seq2Seq(mc).train(), tok, tok)
    lm = TextGenerator(LanguageModel(LMConfig(**viz_models.SMALL, vocab_size=tok.vocab_size)).train(), tok)
    for p in (clf, tr, lm):
        assert not any(m.training for m in p.model.modules()), type(p).__name__


def test_fit_leaves_the_malloc_policy_alone(tmp_path, monkeypatch):
    """`Trainer.fit` is a library call: the process's malloc policy is its owner's (the CLI sets it)."""
    calls: list[str] = []

    def record() -> bool:
        calls.append("reuse_freed_memory")
        return True

    monkeypatch.setattr(tformer.allocator, "reuse_freed_memory", record)
    import tformer.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "reuse_freed_memory", record, raising=False)
    pairs = [(f, e) for f, e in zip(viz_models.FRENCH, viz_models.ENGLISH, strict=True)]
    src_tok = Tokenizer.train(viz_models.FRENCH, kind="word")
    tgt_tok = Tokenizer.train(viz_models.ENGLISH, kind="word")
    mc = ModelConfig(
        **{**viz_models.SMALL, "n_layers": 1},
        src_vocab_size=src_tok.vocab_size,
        tgt_vocab_size=tgt_tok.vocab_size,
    )
    tc = TrainConfig(epochs=1, max_steps=2, batch_tokens=40, lr=1e-3, warmup_steps=1, seed=0)
    task = TranslationTask(mc, tc, src_tok, tgt_tok, pairs, pairs, eval_max_sentences=1)
    Trainer(Seq2Seq(mc), task, tc, out_dir=str(tmp_path / "run"), progress=False).fit()
    assert calls == []
