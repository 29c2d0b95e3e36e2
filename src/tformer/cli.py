"""`tformer` on the command line. Each subcommand calls one library function; errors print one line."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from tformer.demo import run_demo

    result = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    print()
    print(f"exact match: {100 * result.exact_match:.1f}%  (held-out numbers the model never saw)")
    print(f"BLEU: {result.bleu:.2f}  ({result.bleu_signature})")
    print()
    wrong = [e for e in result.examples if e[1] != e[2]]
    shown = result.examples[: args.show] + [e for e in wrong[:3] if e not in result.examples[: args.show]]
    for src, ref, hyp in shown:
        mark = "ok " if hyp == ref else "ERR"
        print(f"  {mark} {src}\n      -> {hyp}" + ("" if hyp == ref else f"\n      reference: {ref}"))
    print(f"  ({len(wrong)} of {len(result.examples)} held-out translations differ from the reference)")
    print()
    print(f"cross-attention heatmap: {result.heatmap}")
    print(f"loss curve:              {result.curve}")
    print(f"checkpoint:              {result.checkpoint}")
    print(f"total time:              {result.seconds:.0f} s")
    print()
    # The console script may sit in a virtual environment that is not on PATH (./dev runs it from .venv).
    exe = "tformer"
    if not shutil.which("tformer") and sys.argv[0].endswith("tformer"):
        exe = shlex.quote(sys.argv[0])
    print("Translate with it (sentences as arguments, or one per line on stdin):")
    print(f'  {exe} translate {shlex.quote(str(result.checkpoint))} "deux cent quarante-sept"')
    return 0


def _translate(args: argparse.Namespace) -> int:
    from tformer.tasks import Translator

    translator = Translator.load(args.checkpoint)
    texts = _read_inputs(args.text)
    outputs = translator.translate(
        texts, beam_size=args.beam, length_penalty=args.length_penalty, max_len=args.max_len
    )
    for line in outputs:
        print(line)
    return 0


def _read_inputs(texts: list[str]) -> list[str]:
    if texts:
        return texts
    if sys.stdin.isatty():
        print("reading one input per line from stdin (Ctrl-D to end)", file=sys.stderr)
    lines = [line.rstrip("\n") for line in sys.stdin]
    while lines and not lines[-1].strip():  # trailing blank lines only; others are reported as empty inputs
        lines.pop()
    return lines


def _train(args: argparse.Namespace) -> int:
    from tformer.config import RunConfig, apply_overrides, load_toml
    from tformer.pipeline import train

    saved = Path(args.out) / "checkpoint" / "config.json"
    if args.config:
        config = load_toml(args.config, task=args.task)
    elif args.resume and saved.exists():  # resume with the run's own config, unless told otherwise
        raw = json.loads(saved.read_text())
        config = RunConfig.from_dict(
            {k: raw[k] for k in ("task", "model", "train", "data") if k in raw},
            source=str(saved),
            task=args.task,
        )
    else:
        config = RunConfig(task=args.task)
    overrides = list(args.overrides)
    for key in ("train", "valid"):
        # `--train a.txt lr=1e-3`: argparse hands the override to --train; give it back.
        paths = [p for p in getattr(args, key) or [] if "=" not in p or Path(p).exists()]
        overrides += [p for p in getattr(args, key) or [] if p not in paths]
        if paths:
            overrides.append(f"data.{key}={json.dumps(paths)}")
    config = apply_overrides(config, overrides)
    result = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    evals = [r for r in result.history if r.get("type") == "eval"]
    if evals:
        shown = {k: v for k, v in evals[-1].items() if k not in ("type", "eval_seconds", "time")}
        print(
            "final evaluation: "
            + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        )
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tformer.pipeline import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        beam_size=args.beam,
        text_column=args.text_column,
        label_column=args.label_column,
    )
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from tformer.tasks import TextClassifier

    classifier = TextClassifier.load(args.checkpoint)
    for label, prob in classifier.predict(_read_inputs(args.text)):
        print(f"{label}\t{prob:.4f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tformer.tasks import TextGenerator

    generator = TextGenerator.load(args.checkpoint)
    text = generator.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop=args.stop or (),
    )
    print(args.prompt + text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from tformer.bench.attention import BACKENDS, run

    lengths = tuple(int(x) for x in args.lengths.split(","))
    backends = tuple(args.backends.split(",")) if args.backends else BACKENDS
    report = run(
        backends=backends,
        lengths=lengths,
        repeats=args.repeats,
        out_dir=args.out,
        max_seconds=args.max_seconds,
    )
    from tformer.bench.attention import markdown

    print(markdown(report))
    print(f"written: {args.out}/attention.json, attention.md, attention.png")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from tformer.experiments import run_all, run_experiment

    size = "quick" if args.quick else args.size
    if args.name == "all":
        print(f"report: {run_all(args.out or 'runs/experiments', size, threads=args.threads)}")
    else:
        out = args.out or f"runs/experiments/{args.name}"
        result = run_experiment(args.name, out, size, threads=args.threads)
        print(result.markdown())
        print(f"written: {out}/result.json, summary.md, " + ", ".join(result.plots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tformer", description="The Transformer of 'Attention Is All You Need': train, decode, inspect."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a French->English number translator and report its accuracy")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a seconds-long run (smaller data and model)")
    demo.add_argument("--show", type=int, default=8, help="how many held-out translations to print")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("translate", help="translate text with a checkpoint (arguments, or stdin lines)")
    tr.add_argument("checkpoint", help="checkpoint directory (e.g. runs/demo/checkpoint)")
    tr.add_argument("text", nargs="*", help="sentences; none: read one per line from stdin")
    tr.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    tr.add_argument("--length-penalty", type=float, default=0.6)
    tr.add_argument("--max-len", type=int, default=None, help="maximum output tokens")
    tr.set_defaults(func=_translate, rest="text")

    tn = sub.add_parser("train", help="train a model on your files (translation, classification or lm)")
    tn.add_argument("task", choices=["translation", "classification", "lm"])
    tn.add_argument("--config", help="a TOML file with [model], [train] and [data] sections (see configs/)")
    tn.add_argument(
        "--train",
        nargs="+",
        help="training data: translation: a TSV or SOURCE TARGET files; "
        "classification: a CSV/TSV/JSONL; lm: a text file",
    )
    tn.add_argument("--valid", nargs="+", help="validation data, same format")
    tn.add_argument("--out", default="runs/train", help="output directory (checkpoint, log.jsonl)")
    tn.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    tn.add_argument("--no-progress", action="store_true")
    tn.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.d_model=256 lr=1e-3"
    )
    tn.set_defaults(func=_train, rest="overrides")

    ev = sub.add_parser("eval", help="score a checkpoint on a file (BLEU, accuracy / macro-F1, perplexity)")
    ev.add_argument("checkpoint")
    ev.add_argument(
        "--data", nargs="+", required=True, help="a file of the checkpoint's task (two for aligned text)"
    )
    ev.add_argument("--beam", type=int, default=4, help="translation: beam size")
    ev.add_argument("--text-column", default=None, help="classification: text column (default: as trained)")
    ev.add_argument("--label-column", default=None, help="classification: label column (default: as trained)")
    ev.set_defaults(func=_eval)

    cl = sub.add_parser(
        "classify", help="label texts with a classifier checkpoint (arguments, or stdin lines)"
    )
    cl.add_argument("checkpoint")
    cl.add_argument("text", nargs="*")
    cl.set_defaults(func=_classify, rest="text")

    ge = sub.add_parser("generate", help="continue a prompt with a language-model checkpoint")
    ge.add_argument("checkpoint")
    ge.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    ge.add_argument("--max-new-tokens", type=int, default=200)
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--top-p", type=float, default=None)
    ge.add_argument("--greedy", action="store_true", help="always the most probable token")
    ge.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    ge.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    ge.set_defaults(func=_generate)

    be = sub.add_parser("bench", help="benchmarks: `bench attention` times every attention backend")
    be.add_argument("what", choices=["attention"])
    be.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384")
    be.add_argument("--backends", default=None, help="comma-separated (default: all)")
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop a backend's sweep after a slower point"
    )
    be.add_argument("--out", default="runs/bench-attention")
    be.set_defaults(func=_bench)

    from tformer.experiments import EXPERIMENTS

    ex = sub.add_parser("experiment", help="measure a claim of the literature: plots, JSON, markdown")
    ex.add_argument("name", choices=[*EXPERIMENTS, "all"])
    ex.add_argument("--size", choices=["quick", "medium", "full"], default="full")
    ex.add_argument("--quick", action="store_true", help="the same as --size quick (about a minute)")
    ex.add_argument("--out", default=None, help="output directory (default: runs/experiments[/NAME])")
    ex.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick: 1)")
    ex.set_defaults(func=_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a `nargs="*"` positional at the first option: `translate CKPT --beam 2 "text"` leaves
    # "text" over. Texts after options still belong to the command.
    rest = getattr(args, "rest", None)
    if extra and rest and not any(e.startswith("-") for e in extra):
        setattr(args, rest, [*getattr(args, rest), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as exc:
        print(f"tformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
