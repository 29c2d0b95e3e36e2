"""The CLI end to end on tiny files, for each family: train -> eval -> predict; exit codes and outputs."""

import json
import subprocess
import sys

import pytest

from tformer.cli import main

TINY = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=1", "train.log_every=5"]


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_translation_train_eval_translate(tmp_path, capsys):
    pairs = [(f"{a} {b}", f"{b} {a}") for a in "abcdefgh" for b in "ijklmnop"]
    (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    code, out, err = _run(
        [
            "train",
            "translation",
            "--train",
            str(tmp_path / "train.tsv"),
            "--valid",
            str(tmp_path / "train.tsv"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "data.tokenizer=word",
            "train.epochs=2",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, err
    assert "final evaluation:" in out and "bleu" in out
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["data"]["tokenizer"] == "word"
    code, out, err = _run(["eval", str(ckpt), "--data", str(tmp_path / "train.tsv"), "--beam", "2"], capsys)
    assert code == 0 and "sentences: 64" in out and "bleu_signature: nrefs:1" in out
    code, out, _ = _run(["translate", str(ckpt), "a i", "b j"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 2


def test_classification_train_eval_classify_and_resume(tmp_path, capsys):
    rows = [("great fun", "pos"), ("awful bore", "neg"), ("loved it", "pos"), ("hated it", "neg")] * 4
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in rows))
    args = [
        "train",
        "classification",
        "--train",
        str(tmp_path / "t.jsonl"),
        "--valid",
        str(tmp_path / "t.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "data.text_column=review",
        "data.label_column=y",
        "data.tokenizer=word",
        "train.lr=0.003",
        "train.warmup_steps=2",
        *TINY,
    ]
    code, out, err = _run([*args, "train.epochs=10"], capsys)
    assert code == 0, err
    assert "accuracy 1" in out
    # --resume alone: the run's own config (data, columns, model) comes from the checkpoint
    code, out, err = _run(
        [
            "train",
            "classification",
            "--out",
            str(tmp_path / "run"),
            "--resume",
            "--no-progress",
            "train.epochs=12",
        ],
        capsys,
    )
    assert code == 0 and "resumed at step 10" in err, err
    ckpt = str(tmp_path / "run" / "checkpoint")
    code, out, _ = _run(["eval", ckpt, "--data", str(tmp_path / "t.jsonl")], capsys)
    assert code == 0 and "accuracy: 1.0000" in out and "macro_f1: 1.0000" in out
    proc = subprocess.run(
        [sys.executable, "-m", "tformer", "classify", ckpt],
        input="great fun\nhated it\n",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    labels = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert labels == ["pos", "neg"]
    assert all(0.5 < float(line.split("\t")[1]) <= 1.0 for line in proc.stdout.splitlines())


def test_lm_train_eval_generate(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the cat sat on the mat.\n" * 60)
    code, out, err = _run(
        [
            "train",
            "lm",
            "--train",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "data.tokenizer=char",
            "data.valid_fraction=0.2",
            "model.max_seq_len=32",
            "train.max_steps=60",
            "train.epochs=100",
            "train.eval_every_epochs=100",
            "train.batch_size=8",
            "train.lr=0.01",
            "train.warmup_steps=5",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, err
    assert "valid_ppl" in out
    ckpt = str(tmp_path / "run" / "checkpoint")
    code, out, _ = _run(["eval", ckpt, "--data", str(tmp_path / "t.txt")], capsys)
    assert code == 0 and "perplexity:" in out
    ppl = float(out.split("perplexity:")[1].split()[0])
    assert ppl < 3.0  # 12 distinct characters: chance would be 12+
    code, out, _ = _run(
        ["generate", ckpt, "--prompt", "the cat", "--greedy", "--max-new-tokens", "20", "--stop", "."], capsys
    )
    assert code == 0 and out.startswith("the cat") and "." not in out
    greedy = ["generate", ckpt, "--prompt", "the", "--greedy", "--max-new-tokens", "12"]
    assert _run(greedy, capsys)[1] == _run([*greedy, "--compile"], capsys)[1]  # compiled kernels, same text
    code, a, _ = _run(["generate", ckpt, "--prompt", "the", "--seed", "4", "--top-k", "5"], capsys)
    code, b, _ = _run(["generate", ckpt, "--prompt", "the", "--seed", "4", "--top-k", "5"], capsys)
    assert a == b


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "lm", "--train", "missing.txt", "data.valid_fraction=0.1"], "missing.txt: file not found"),
        (["train", "lm", "model.d_modl=3"], "unknown model key 'd_modl'"),
        (["train", "classification"], "no train data: give --train FILE"),
        (["generate", "nowhere"], "nowhere: checkpoint not found"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
