"""`tformer` on the command line. Each subcommand calls one library function; errors print one line."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Sequence


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
    texts = args.text
    if not texts:
        if sys.stdin.isatty():
            print("reading sentences from stdin, one per line (Ctrl-D to end)", file=sys.stderr)
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    outputs = translator.translate(
        texts, beam_size=args.beam, length_penalty=args.length_penalty, max_len=args.max_len
    )
    for line in outputs:
        print(line)
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
    tr.set_defaults(func=_translate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a `nargs="*"` positional at the first option: `translate CKPT --beam 2 "text"` leaves
    # "text" over. Texts after options still belong to the command.
    if extra and getattr(args, "text", None) is not None and not any(e.startswith("-") for e in extra):
        args.text = [*args.text, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"tformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
