"""tformer.families is the one source of the model families: config, build_model, pipeline, predictors,
evaluation and the CLI all read it, and a family registered here (a toy one) is reached by every one of
them with no other edit."""

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tformer import config, families
from tformer.cli import build_parser, main
from tformer.config import ConfigError, LMConfig, RunConfig
from tformer.tasks.lm import LanguageModelTask, TextGenerator, mean_nll


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _train_choices() -> tuple[str, ...]:
    train = _subcommands(build_parser())["train"]
    (task,) = [a for a in train._actions if a.dest == "task"]
    return tuple(task.choices)


def test_config_cli_and_tasks_read_the_registry():
    names = families.names()
    assert names == ("translation", "classification", "lm", "vision")
    assert names == config.TASKS
    assert _train_choices() == names
    verbs = set(_subcommands(build_parser()))
    for family in families.FAMILIES.values():
        assert set(family.verbs) <= verbs, family.name
        assert config.model_config_class(family.name) is family.config_class()
        assert families.for_config(family.config_class()) is family
        assert isinstance(RunConfig(task=family.name).model, family.config_class())


def test_every_entry_resolves_to_its_role():
    from torch import nn

    for family in families.FAMILIES.values():
        cls = family.config_class()
        for arch in family.architectures:
            assert isinstance(family.model_builder(arch)(cls(architecture=arch)), nn.Module)
        family.task_builder(), family.predictor_class(), family.evaluator(), family.command_adder()
        assert family.predictor_class().family == family.name  # the task name its checkpoints carry


def test_architectures_come_from_the_family():
    with pytest.raises(
        ConfigError, match="not available for translation; choose one of transformer, lstm, gru"
    ):
        config.ModelConfig(architecture="cnn")
    assert config.ClassifierConfig(architecture="cnn").architecture == "cnn"


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'audio'; expected one of translation"):
        families.get("audio")
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.get("lm"))
    with pytest.raises(ValueError, match="not an import path"):
        families.resolve("tformer.models.Seq2Seq")
    with pytest.raises(ValueError, match="has no architecture 'cnn'"):
        families.get("lm").model_builder("cnn")


def test_config_stays_torch_free():
    code = "import tformer.config, tformer.families, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- a toy family, registered by this test only: its config, task, predictor, evaluation and verb ------


@dataclass(frozen=True)
class ToyConfig(LMConfig):
    """The toy family's [model] section: a language model under another task name."""


class ToyTask(LanguageModelTask):
    name = "toy"


class ToyGenerator(TextGenerator):
    family = "toy"


def toy_build(run: RunConfig, saved: Path | None = None):
    from tformer.data.readers import read_text
    from tformer.data.tokenizers import Tokenizer
    from tformer.models import build_model

    text = read_text(run.data.paths("train")[0])
    tok = Tokenizer.train([text], kind="char")
    model_config = run.model.replace(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    return ToyTask(model_config, run.train, tok, text, text), build_model(model_config)


def toy_evaluate(path, data, request):
    import torch

    predictor = ToyGenerator.load(path, precision=request.precision)
    ids = torch.tensor(predictor.tok.encode(Path(data[0]).read_text()), dtype=torch.long)
    return {"toy_nll": mean_nll(predictor.model, ids)}


def _toy_verb(args):
    print(f"toy says: {ToyGenerator.load(args.checkpoint).generate('a', max_new_tokens=3, greedy=True)!r}")
    return 0


def toy_commands(sub):
    toy = sub.add_parser("toy-say", help="a toy family's own verb")
    toy.add_argument("checkpoint")
    toy.set_defaults(func=_toy_verb)


@pytest.fixture
def toy():
    here = __name__
    family = families.register(
        families.Family(
            name="toy",
            config=f"{here}:ToyConfig",
            models={"transformer": "tformer.models.lm:LanguageModel"},
            build=f"{here}:toy_build",
            predictor=f"{here}:ToyGenerator",
            evaluate=f"{here}:toy_evaluate",
            commands=f"{here}:toy_commands",
            verbs=("toy-say",),
            train_data="a text file",
        )
    )
    yield family
    families.unregister("toy")


def test_a_registered_family_is_reached_everywhere(toy, tmp_path, capsys):
    from tformer.models import LanguageModel, build_model
    from tformer.pipeline import evaluate_checkpoint
    from tformer.tasks import open_predictor

    assert "toy" in _train_choices()
    assert isinstance(RunConfig(task="toy").model, ToyConfig)
    assert RunConfig.from_dict({"task": "toy", "model": {"d_model": 12}}).model.d_model == 12
    with pytest.raises(ConfigError, match="not available for toy"):
        ToyConfig(architecture="lstm")
    assert isinstance(build_model(ToyConfig(d_model=16, n_heads=2, d_ff=32, n_layers=1)), LanguageModel)

    (tmp_path / "t.txt").write_text("ab" * 200)
    tiny = [
        "model.d_model=16",
        "model.n_heads=2",
        "model.d_ff=32",
        "model.n_layers=1",
        "model.max_seq_len=16",
    ]
    steps = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1"]
    argv = ["train", "toy", "--train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run")]
    assert main([*argv, "--no-progress", *tiny, *steps]) == 0
    ckpt = tmp_path / "run" / "checkpoint"
    assert '"task": "toy"' in (ckpt / "config.json").read_text()

    assert isinstance(open_predictor(ckpt), ToyGenerator)  # load_predictor's union is the built-ins only
    metrics = evaluate_checkpoint(ckpt, [str(tmp_path / "t.txt")])
    assert set(metrics) == {"toy_nll"} and metrics["toy_nll"] > 0
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "t.txt")]) == 0
    assert "toy_nll:" in capsys.readouterr().out
    assert main(["toy-say", str(ckpt)]) == 0
    assert "toy says:" in capsys.readouterr().out


def test_the_toy_family_is_gone_after_its_test():
    assert "toy" not in families.names() and "toy" not in _train_choices()
