"""`tformer` on the command line. Each subcommand calls one library function; errors print one line. The
families' own verbs (translate, classify, generate) and `train`'s task choices come from tformer.families."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tformer import families
from tformer.families.commands import precision_option
from tformer.merge import add_parser as add_merge_parser
from tformer.serve.command import add_serve_parser


def _demo(args: argparse.Namespace) -> int:
    from tformer.demo import run_demo

    result = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress, accel=True)
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


def _train(args: argparse.Namespace) -> int:
    from tformer.config import RunConfig, apply_overrides, load_toml
    from tformer.pipeline import train
    from tformer.training import run_dir
    from tformer.training.checkpoint import read_config

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite starts it again: give one")

    if args.nproc is not None:  # the same command in N processes under torchrun
        from tformer.training.distributed import launch, without_option

        return launch(args.nproc, without_option(args.argv, "--nproc"))
    saved = run_dir.latest(args.out) if args.resume else None
    if args.config:
        config = load_toml(args.config, task=args.task)
    elif saved is not None:  # resume with the run's own config, unless told otherwise
        raw = read_config(saved)
        config = RunConfig.from_dict(
            {k: raw[k] for k in ("task", "model", "train", "data") if k in raw},
            source=str(saved / "config.json"),
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
    result = train(
        config,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        accel=True,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
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
        precision=args.precision,
        accel=True,
    )
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _average(args: argparse.Namespace) -> int:
    from tformer.training.average import average_checkpoints, last_checkpoints

    *sources, out = args.paths
    if not sources:
        raise ValueError("give the checkpoints (or a run directory with --last K) and then OUT")
    if args.last is not None:
        if len(sources) != 1:
            raise ValueError(f"--last {args.last} takes one run directory, got {len(sources)}: {sources}")
        sources = last_checkpoints(sources[0], args.last)
    path = average_checkpoints(sources, out, ema=args.ema, overwrite=args.overwrite)
    what = "moving average" if args.ema else "weights"
    print(f"averaged the {what} of {', '.join(str(p) for p in sources)}\ncheckpoint: {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what != "attention":  # train / generate / tune: options and output in tformer.bench.<what>
        import importlib

        return int(importlib.import_module(f"tformer.bench.{args.what}").cli(args))
    from tformer.bench.attention import BACKENDS, run

    args.out = args.out or "runs/bench-attention"

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


def _viz(args: argparse.Namespace) -> int:
    from tformer.viz.command import run_viz

    for line in run_viz(args.source, args.arg, vars(args)):
        print(line)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from tformer.training import run_dir
    from tformer.viz.plots import run_curves

    run = Path(args.run)
    if not (run / run_dir.LOG).is_file():
        raise ValueError(f"{run}: no {run_dir.LOG} here; give the run directory `tformer train --out` wrote")
    records, bad = [], 0
    for _, record, _ in run_dir.log_records(run):
        if record is None:
            bad += 1
        else:
            records.append(record)
    if bad:
        print(
            f"warning: {run / run_dir.LOG}: {bad} incomplete or unreadable line(s) left out", file=sys.stderr
        )
    out = Path(args.out) if args.out else run / "curves.png"
    print(f"written: {run_curves(records, out, title=str(run))}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from tformer.export.onnx import export_onnx

    for graph in export_onnx(args.checkpoint, args.out, opset=args.opset):
        print(f"{graph.path}  (ONNX Runtime vs PyTorch: max |difference| {graph.max_abs_diff:.2e})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from tformer.interop import import_hf, save_imported

    imported = import_hf(args.dir)
    path = save_imported(imported, args.out)
    print(f"{imported.family} -> tformer {imported.task} checkpoint: {path}")
    for name, why in imported.ignored.items():
        print(f"  not used: {name} ({why})")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from tformer.interop import export_hf

    print(f"GPT2LMHeadModel directory: {export_hf(args.checkpoint, args.out)}")
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

    names = families.names()
    tn = sub.add_parser("train", help=f"train a model on your files ({', '.join(names[:-1])} or {names[-1]})")
    tn.add_argument("task", choices=names)
    tn.add_argument("--config", help="a TOML file with [model], [train] and [data] sections (see configs/)")
    tn.add_argument(
        "--train",
        nargs="+",
        help="training data: " + "; ".join(f"{f.name}: {f.train_data}" for f in families.FAMILIES.values()),
    )
    tn.add_argument("--valid", nargs="+", help="validation data, same format")
    tn.add_argument("--out", default="runs/train", help="output directory (checkpoint, log.jsonl)")
    tn.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    tn.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out another run wrote (deletes its checkpoints and log.jsonl)",
    )
    tn.add_argument("--no-progress", action="store_true")
    tn.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train in N processes on this machine (runs torchrun; DDP, or FSDP with train.parallel=fsdp)",
    )
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
    precision_option(ev)
    ev.set_defaults(func=_eval)
    for family in families.FAMILIES.values():  # each family's own verbs: translate, classify, generate
        family.command_adder()(sub)
    add_serve_parser(sub)

    av = sub.add_parser(
        "average",
        help="average checkpoints' weights into one checkpoint (a run's last K, or the ones named)",
        usage="tformer average RUN_DIR --last K OUT [--ema] [--overwrite]\n"
        "       tformer average CHECKPOINT [CHECKPOINT ...] OUT [--ema] [--overwrite]",
    )
    av.add_argument("paths", nargs="+", metavar="CHECKPOINT|RUN_DIR ... OUT")
    av.add_argument(
        "--last", type=int, default=None, metavar="K", help="the run directory's newest K checkpoints"
    )
    av.add_argument(
        "--ema", action="store_true", help="average their moving averages (train.ema): with one, it alone"
    )
    av.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at OUT")
    av.set_defaults(func=_average, rest="paths")

    be = sub.add_parser(
        "bench",
        help="benchmarks: `bench attention` times every attention backend, `bench train` / `bench generate` "
        "the language model against Hugging Face GPT-2, `bench tune` measures tformer.accel's kernel choices",
    )
    be.add_argument("what", choices=["attention", "train", "generate", "tune"])
    be.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384")
    be.add_argument("--backends", default=None, help="comma-separated (default: all)")
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop a backend's sweep after a slower point"
    )
    be.add_argument("--out", default=None, help="output directory (default: runs/bench-WHAT)")
    from tformer.bench import add_cli_options

    add_cli_options(be)
    be.set_defaults(func=_bench)

    vz = sub.add_parser(
        "viz",
        help="pictures: `viz CHECKPOINT TEXT|IMAGE` attention maps (PNG + HTML); `viz positions|softmax OUT.png`",
        usage='tformer viz CHECKPOINT "text" [--out DIR] [--target TEXT] [--beam N]\n'
        "       tformer viz VISION-CHECKPOINT IMAGE [--out DIR]   (per head over the patches, rollout)\n"
        "       tformer viz positions OUT.png [--positions N] [--d-model D]\n"
        "       tformer viz softmax OUT.png [--keys N] [--samples N] [--seed S]",
    )
    vz.add_argument("source", metavar="CHECKPOINT|positions|softmax")
    vz.add_argument(
        "arg", nargs="*", metavar="TEXT|IMAGE|OUT.png", help="the input text or image, or the picture's file"
    )
    vz.add_argument("--out", default=None, help="checkpoint: output directory (default: runs/viz)")
    vz.add_argument(
        "--target", default=None, help="translation: teacher-force this target, not the model's own"
    )
    vz.add_argument(
        "--beam", type=int, default=None, help="translation: beam size of its own (default 4; 1: greedy)"
    )
    vz.add_argument("--positions", type=int, default=None, help="positions: how many (default 100)")
    vz.add_argument("--d-model", type=int, default=None, help="positions: d_model (default 512)")
    vz.add_argument("--keys", type=int, default=None, help="softmax: keys per query (default 16)")
    vz.add_argument("--samples", type=int, default=None, help="softmax: queries per d_k (default 2000)")
    vz.add_argument("--seed", type=int, default=None, help="softmax: random seed (default 0)")
    vz.set_defaults(func=_viz, rest="arg")
    pl = sub.add_parser("plot", help="a run's curves from its log.jsonl as one PNG (no TensorBoard needed)")
    pl.add_argument("run", metavar="RUN_DIR", help="the directory `tformer train --out` wrote")
    pl.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    pl.set_defaults(func=_plot)
    im = sub.add_parser("import", help="convert another library's model into a tformer checkpoint")
    im_sub = im.add_subparsers(dest="format", required=True, metavar="FORMAT")
    im_hf = im_sub.add_parser(
        "hf", help="a Hugging Face directory (GPT-2, BERT, Marian, ViT; config.json + safetensors)"
    )
    im_hf.add_argument("dir", help="the Hugging Face model directory (no hub: a local path)")
    im_hf.add_argument("out", help="the tformer checkpoint directory to write")
    im_hf.set_defaults(func=_import)

    ex = sub.add_parser("export", help="write a checkpoint in another format: `export onnx | hf`")
    formats = ex.add_subparsers(dest="format", required=True, metavar="FORMAT")
    eo = formats.add_parser("onnx", help="ONNX graphs, each checked with ONNX Runtime (extra: tformer[onnx])")
    eo.add_argument("checkpoint")
    eo.add_argument("out", help="output directory (*.onnx, onnx.json, config and tokenizers)")
    eo.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    eo.set_defaults(func=_export_onnx)
    ex_hf = formats.add_parser("hf", help="a language model as a Hugging Face GPT-2 directory")
    ex_hf.add_argument("checkpoint")
    ex_hf.add_argument("out", help="the directory to write (config.json, model.safetensors, tokenizer)")
    ex_hf.set_defaults(func=_export_hf)
    from tformer.experiments import EXPERIMENTS

    xp = sub.add_parser("experiment", help="measure a claim of the literature: plots, JSON, markdown")
    xp.add_argument("name", choices=[*EXPERIMENTS, "all"])
    xp.add_argument("--size", choices=["quick", "medium", "full"], default="full")
    xp.add_argument("--quick", action="store_true", help="the same as --size quick (about a minute)")
    xp.add_argument("--out", default=None, help="output directory (default: runs/experiments[/NAME])")
    xp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick: 1)")
    xp.set_defaults(func=_experiment)
    add_merge_parser(sub)  # `tformer merge` (LoRA adapters; tformer/merge.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` hands it on to torchrun
    # argparse ends a `nargs="*"` positional at the first option: `translate CKPT --beam 2 "text"` leaves
    # "text" over. Texts after options still belong to the command.
    rest = getattr(args, "rest", None)
    if extra and rest and not any(e.startswith("-") for e in extra):
        setattr(args, rest, [*getattr(args, rest), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from tformer import accel
    from tformer.allocator import reuse_freed_memory

    try:
        if accel.mode() != "off":  # TFORMER_ACCEL=off: stock PyTorch, and the C library's own malloc
            reuse_freed_memory()  # before any big tensor: freed memory stays for reuse (tformer.allocator)
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as exc:
        print(f"tformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # training's Interrupted carries the signal: 130 SIGINT, 143 SIGTERM
        return 128 + int(getattr(exc, "signum", signal.SIGINT))


if __name__ == "__main__":
    sys.exit(main())
