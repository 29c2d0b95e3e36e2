"""The built-in families' own subcommands: `tformer translate | classify | generate` (classify: text and
vision checkpoints). Each family's
`commands` entry names its adder here (a new family's lives in its own files); imports no torch until a
command runs, so `tformer --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8", "auto"],
        default="fp32",
        help="inference precision: bf16 weights, int8 linear layers (needs torchao: tformer[quant]), or "
        "auto: bf16 where this machine computes it >= 2x faster than fp32",
    )


def compile_option(parser: argparse.ArgumentParser) -> None:
    """`--compile / --no-compile` for language-model decoding (`tformer generate`, `tformer serve`)."""
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the CPU matrix-vector products of decoding (seconds once, then faster tokens; "
        "it also measures them against the eager kernels for this machine). Default: compiled where "
        "this machine measured them faster (tformer bench tune), else not",
    )


def read_inputs(texts: list[str]) -> list[str]:
    """The texts given as arguments, or one per line from stdin."""
    if texts:
        return texts
    if sys.stdin.isatty():
        print("reading one input per line from stdin (Ctrl-D to end)", file=sys.stderr)
    lines = [line.rstrip("\n") for line in sys.stdin]
    while lines and not lines[-1].strip():  # trailing blank lines only; others are reported as empty inputs
        lines.pop()
    return lines


def _translate(args: argparse.Namespace) -> int:
    from tformer.tasks import Translator

    translator = Translator.load(args.checkpoint, precision=args.precision, accel=True)
    texts = read_inputs(args.text)
    if args.stream:  # each sentence's text as decided (greedy: as it grows; beam: what its beams agree on)
        translator.encode(texts)  # every input checked before the first is printed
        for text in texts:
            for delta in translator.translate_stream(
                text, beam_size=args.beam, length_penalty=args.length_penalty, max_len=args.max_len
            ):
                print(delta, end="", flush=True)
            print(flush=True)
        return 0
    outputs = translator.translate(
        texts, beam_size=args.beam, length_penalty=args.length_penalty, max_len=args.max_len
    )
    for line in outputs:
        print(line)
    return 0


def add_translate(sub: Subparsers) -> None:
    tr = sub.add_parser("translate", help="translate text with a checkpoint (arguments, or stdin lines)")
    tr.add_argument("checkpoint", help="checkpoint directory (e.g. runs/demo/checkpoint)")
    tr.add_argument("text", nargs="*", help="sentences; none: read one per line from stdin")
    tr.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    tr.add_argument("--length-penalty", type=float, default=0.6)
    tr.add_argument("--max-len", type=int, default=None, help="maximum output tokens")
    tr.add_argument(
        "--stream",
        action="store_true",
        help="print each translation as it is decoded (beam search: the words all beams agree on); "
        "the same text as without --stream",
    )
    precision_option(tr)
    tr.set_defaults(func=_translate, rest="text")


def _classify(args: argparse.Namespace) -> int:
    """Text or images, by the checkpoint's family: a text classifier reads texts (arguments or stdin
    lines), a vision one image files and folders."""
    from tformer.tasks import TextClassifier, open_predictor
    from tformer.tasks.vision import ImageClassifier

    predictor = open_predictor(args.checkpoint, precision=args.precision, accel=True)
    if isinstance(predictor, ImageClassifier):
        if not args.text:
            raise ValueError("classify: name image files or folders after the checkpoint")
        for path, label, prob in predictor.predict_files(args.text):
            print(f"{path}\t{label}\t{prob:.4f}")
        return 0
    if not isinstance(predictor, TextClassifier):
        raise ValueError(f"{args.checkpoint}: not a classifier checkpoint (a {type(predictor).__name__})")
    for label, prob in predictor.predict(read_inputs(args.text)):
        print(f"{label}\t{prob:.4f}")
    return 0


def add_classify(sub: Subparsers) -> None:
    """`classify`, once for both families that have it (classification's texts, vision's images)."""
    if "classify" in sub.choices:
        return
    cl = sub.add_parser(
        "classify",
        help="label texts (arguments, or stdin lines) or images (files, folders) with a classifier checkpoint",
    )
    cl.add_argument("checkpoint")
    cl.add_argument("text", nargs="*", metavar="TEXT|IMAGE", help="texts, or image files / folders")
    precision_option(cl)
    cl.set_defaults(func=_classify, rest="text")


def _generate(args: argparse.Namespace) -> int:
    from tformer.tasks import TextGenerator

    generator = TextGenerator.load(args.checkpoint, precision=args.precision, accel=True)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop=args.stop or (),
        compile=args.compile,
    )
    if args.stream:  # each delta as soon as it is decided, flushed: the same text as without --stream
        print(args.prompt, end="", flush=True)
        for delta in generator.generate(args.prompt, **options, stream=True):
            print(delta, end="", flush=True)
        print()
        return 0
    print(args.prompt + generator.generate(args.prompt, **options))
    return 0


def add_generate(sub: Subparsers) -> None:
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
    ge.add_argument(
        "--stream", action="store_true", help="print the text as it is generated (the same text, sooner)"
    )
    compile_option(ge)
    precision_option(ge)
    ge.set_defaults(func=_generate)
