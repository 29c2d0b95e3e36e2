"""The main job at a reduced size (seconds): it learns its task, writes its outputs, and its checkpoint works."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tformer.cli import main
from tformer.data.synthetic import number_translation, number_words
from tformer.data.tokenizers import Tokenizer
from tformer.demo import run_demo
from tformer.tasks import Translator


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, quick=True, progress=False, log=lambda _: None)


def test_quick_demo_learns_well_above_chance(demo):
    # Chance is ~0% exact match (outputs are 1-15 words from a 46-word vocabulary).
    assert demo.exact_match >= 0.5, demo.exact_match
    assert demo.bleu >= 70.0, demo.bleu
    assert demo.bleu_signature.startswith("nrefs:1|case:mixed")


def test_demo_writes_pngs_and_checkpoint(demo):
    for png in (demo.heatmap, demo.curve):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not blank
    assert (demo.checkpoint / "model.safetensors").exists()


def test_translate_from_checkpoint_args_and_stdin(demo, capsys):
    translator = Translator.load(demo.checkpoint)
    src, ref, hyp = demo.examples[0]
    assert translator.translate([src], beam_size=2) == [hyp]
    assert main(["translate", str(demo.checkpoint), "--beam", "2", src]) == 0
    assert capsys.readouterr().out.strip() == hyp
    lines = "\n".join(s for s, _, _ in demo.examples[:3]) + "\n"
    proc = subprocess.run(
        [sys.executable, "-m", "tformer", "translate", str(demo.checkpoint), "--beam", "2"],
        input=lines,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.splitlines() == [h for _, _, h in demo.examples[:3]]


def test_synthetic_data_is_deterministic_and_disjoint():
    a = number_translation(300, 50, 50, seed=3)
    b = number_translation(300, 50, 50, seed=3)
    assert a == b
    train, test = {p.src for p in a["train"]}, {p.src for p in a["test"]}
    assert not train & test
    assert number_words(97).tgt == "ninety-seven" and number_words(97).src == "quatre-vingt-dix-sept"


def test_tokenizer_round_trip_and_reload(tmp_path):
    texts = ["vingt et un", "quatre-vingt-dix-sept mille, deux"]
    tok = Tokenizer.train(texts)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.encode(texts[1]) == tok.encode(texts[1])
    assert tok.encode("zebra") == [tok.unk_id]
    bpe = Tokenizer.train(texts * 5, kind="bpe", vocab_size=60)
    assert bpe.decode(bpe.encode(texts[1])) == texts[1]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer file"):
        Tokenizer.load(tmp_path / "bad.json")
