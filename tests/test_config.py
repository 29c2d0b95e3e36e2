"""Config values that cannot train are refused on construction, and every error names where it came from."""

import json

import pytest

from tformer.config import (
    ClassifierConfig,
    ConfigError,
    DataConfig,
    LMConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_toml,
)

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", INF, r"TrainConfig.lr = inf is not a finite number"),
        ("lr", NAN, r"TrainConfig.lr = nan is not a finite number"),
        ("lr", 0.0, r"TrainConfig.lr must be > 0, got 0.0"),
        ("lr", -1e-3, r"TrainConfig.lr must be > 0"),
        ("lr", 10**400, r"TrainConfig.lr = 1000.* is too large for a float"),
        ("eps", 0.0, r"TrainConfig.eps must be > 0, got 0.0"),
        ("eps", -1e-9, r"TrainConfig.eps must be > 0"),
        ("eps", INF, r"TrainConfig.eps = inf is not a finite number"),
        ("clip_norm", -1.0, r"TrainConfig.clip_norm must be >= 0"),
        ("clip_norm", INF, r"TrainConfig.clip_norm = inf is not a finite number"),
        ("weight_decay", -0.1, r"TrainConfig.weight_decay must be >= 0, got -0.1"),
        ("weight_decay", NAN, r"TrainConfig.weight_decay = nan is not a finite number"),
        ("min_lr", -1e-5, r"TrainConfig.min_lr must be >= 0"),
        ("min_lr", INF, r"TrainConfig.min_lr = inf is not a finite number"),
        ("max_time", INF, r"TrainConfig.max_time = inf is not a finite number"),
        ("betas", (0.9, NAN), r"TrainConfig.betas\[1\] = nan is not a finite number"),
        ("betas", (0.9, "a"), r"TrainConfig.betas\[1\] = 'a' \(str\); expected float"),
        ("betas", (0.9,), r"TrainConfig.betas has 1 item; expected 2"),
        ("label_smoothing", NAN, r"TrainConfig.label_smoothing = nan is not a finite number"),
        ("eval_beam_size", 0, r"TrainConfig.eval_beam_size must be > 0"),
        ("batch_size", 0, r"TrainConfig.batch_size must be > 0"),
        ("eval_every_steps", 0, r"TrainConfig.eval_every_steps must be > 0"),
        ("eval_max_sentences", 0, r"TrainConfig.eval_max_sentences must be > 0"),
        ("seed", 2**64, r"TrainConfig.seed = 18446744073709551616 is outside the 64-bit integers"),
        ("seed", 2**40, r"TrainConfig.seed must be in \[0, 2\*\*32\)"),
        ("warmup_steps", 10**30, r"TrainConfig.warmup_steps = 1000.* is outside the 64-bit integers"),
    ],
)
def test_train_values_that_cannot_train(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{key: value})


def test_clip_norm_none_is_no_clipping():
    assert TrainConfig(clip_norm=None).clip_norm is None
    assert TrainConfig(clip_norm=0).clip_norm == 0.0  # fairseq's spelling of "no clipping", TOML can write it
    assert TrainConfig(max_time=None, lr=None).lr is None


@pytest.mark.parametrize(
    ("cls", "key", "value", "message"),
    [
        (ModelConfig, "layer_norm_eps", INF, r"Seq2SeqConfig.layer_norm_eps = inf is not a finite number"),
        (LMConfig, "dropout", NAN, r"LMConfig.dropout = nan is not a finite number"),
        (ClassifierConfig, "attention_dropout", -INF, r"attention_dropout = -inf is not a finite number"),
        (ModelConfig, "linformer_rank", 0, r"Seq2SeqConfig.linformer_rank must be > 0"),
        (ClassifierConfig, "cnn_widths", (3, True), r"ClassifierConfig.cnn_widths\[1\] = True \(bool\)"),
        (DataConfig, "valid_fraction", NAN, r"DataConfig.valid_fraction = nan is not a finite number"),
        (DataConfig, "train", (1,), r"DataConfig.train\[0\] = 1 \(int\); expected str"),
        (DataConfig, "train", 3, r"DataConfig.train = 3 \(int\); expected tuple\[str, ...\]"),
        (DataConfig, "valid", {"a": 1}, r"DataConfig.valid = \{'a': 1\} \(dict\)"),
    ],
)
def test_model_and_data_values_that_make_no_sense(cls, key, value, message):
    with pytest.raises(ConfigError, match=message):
        cls(**{key: value})


def test_run_config_parts_match_the_task():
    with pytest.raises(ConfigError, match=r"RunConfig.model is a Seq2SeqConfig; task 'lm' needs an LMConfig"):
        RunConfig(task="lm", model=ModelConfig())
    with pytest.raises(ConfigError, match=r"RunConfig.train = 3 \(int\); expected a TrainConfig"):
        RunConfig(train=3)
    with pytest.raises(ConfigError, match=r"RunConfig.task = 3 is not a string; expected one of translation"):
        RunConfig(task=3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model = 3\n", r"run.toml: \[model\] must be a table of Seq2SeqConfig keys, got 3 \(int\)"),
        ('train = "x"\n', r"run.toml: \[train\] must be a table of TrainConfig keys, got 'x' \(str\)"),
        ("data = [1, 2]\n", r"run.toml: \[data\] must be a table of DataConfig keys, got \[1, 2\] \(list\)"),
        ("task = 3\n", r"run.toml: task = 3 is not a string; expected one of translation"),
        ('task = ["lm"]\n', r"run.toml: task = \['lm'\] is not a string"),
        ("[train]\nlr = 'abc'\n", r"run.toml: TrainConfig.lr = 'abc' \(str\); expected float \| None"),
        ("[train]\nlr = inf\n", r"run.toml: TrainConfig.lr = inf is not a finite number"),
        ("[model]\nd_model = 100\n", r"run.toml: Seq2SeqConfig.d_model = 100 must be divisible"),
        (
            'task = "lm"\n[model]\narchitecture = "lstm"\n[train]\nlora_rank = 4\n',
            r"run.toml: train.lora_rank = 4: LoRA adapts a Transformer's projections",
        ),
        ("[train]\nseed = " + "9" * 5000 + "\n", r"run.toml: not valid TOML"),
    ],
)
def test_toml_sections_and_values_name_the_file(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_toml(path)


def test_unreadable_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot read the config file"):
        load_toml(tmp_path)
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xff\xfe[model]\n")
    with pytest.raises(ConfigError, match=r"run.toml: not valid TOML.*utf-8"):
        load_toml(path)


def test_from_dict_errors_name_the_source():
    src = "ckpt/config.json"
    with pytest.raises(ConfigError, match=r"^ckpt/config.json: TrainConfig.lr = 'abc' \(str\)"):
        RunConfig.from_dict({"train": {"lr": "abc"}}, source=src)
    with pytest.raises(ConfigError, match=r"^ckpt/config.json: Seq2SeqConfig.n_heads must be > 0"):
        ModelConfig.from_dict({"n_heads": 0}, source=src)
    with pytest.raises(ConfigError, match=r"^ckpt/config.json: DataConfig.tokenizer = 'x' is not one of"):
        DataConfig.from_dict({"tokenizer": "x"}, source=src)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            [1, 2],
            r"ckpt/config.json: expected a mapping of sections \(task, model, train, data\), got a list",
        ),
        (["model"], r"ckpt/config.json: expected a mapping of sections"),
        ("x", r"ckpt/config.json: expected a mapping of sections .*got a str"),
        (None, r"ckpt/config.json: expected a mapping of sections .*got a NoneType"),
        ({"model": None}, r"ckpt/config.json: \[model\] must be a table of Seq2SeqConfig keys, got None"),
    ],
)
def test_from_dict_of_a_non_mapping(data, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(data, source="ckpt/config.json")


def test_section_from_dict_of_a_non_mapping():
    with pytest.raises(ConfigError, match=r"^x.json: expected a mapping of TrainConfig keys, got a list"):
        TrainConfig.from_dict([("lr", 1.0)], source="x.json")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.lr=abc", r"^override 'train.lr=abc': TrainConfig.lr = 'abc' \(str\); expected float \| None"),
        ("lr=inf", r"^override 'lr=inf': TrainConfig.lr = inf is not a finite number"),
        ("lr=nan", r"^override 'lr=nan': TrainConfig.lr = nan is not a finite number"),
        (
            "lr=1" + "0" * 400,
            r"^override 'lr=1000.*': TrainConfig.lr = 1000.*\.\.\. is too large for a float",
        ),
        ("seed=" + "1" * 5000, r"^override 'seed=1111.*': the value is not usable TOML"),
        ("lr={a = 1}", r"^override 'lr=\{a = 1\}': TrainConfig.lr = \{'a': 1\} \(dict\)"),
        ("betas=[1, 'a']", r"^override 'betas=\[1, 'a'\]': TrainConfig.betas\[1\] = 'a' \(str\)"),
        ("data.train=[1]", r"^override 'data.train=\[1\]': DataConfig.train\[0\] = 1 \(int\); expected str"),
        ("data.train=3", r"^override 'data.train=3': DataConfig.train = 3 \(int\)"),
        ("=5", r"^override '=5': the key is empty"),
        (" =5", r"^override ' =5': the key is empty"),
        ("train.=5", r"^override 'train.=5': the key is empty"),
        (".lr=5", r"^override '.lr=5': the section is empty"),
        ("lr=1\nwarmup_steps=2", r"^override 'lr=1\nwarmup_steps=2': TrainConfig.lr = '1\\nwarmup_steps=2'"),
        ("n_heads=3", r"^override 'n_heads=3': Seq2SeqConfig.d_model = 512 must be divisible by n_heads = 3"),
    ],
)
def test_override_errors_name_the_argument(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), ["epochs=2", item, "dropout=0.2"])


def test_override_errors_name_only_the_arguments_involved():
    with pytest.raises(
        ConfigError,
        match=r"^overrides 'd_model=33', 'n_heads=2': Seq2SeqConfig.d_model = 33 must be divisible",
    ):
        apply_overrides(RunConfig(), ["d_model=33", "dropout=0.2", "n_heads=2"])
    with pytest.raises(ConfigError, match=r"^override 'train.lora_rank=4': train.lora_rank = 4: LoRA adapts"):
        apply_overrides(
            RunConfig(task="lm", model=LMConfig(architecture="lstm")), ["epochs=2", "train.lora_rank=4"]
        )
    with pytest.raises(
        ConfigError, match=r"^override 'schedule=cosine': TrainConfig.schedule = 'cosine' needs"
    ):
        apply_overrides(RunConfig(), ["epochs=2", "schedule=cosine"])


def test_valid_configs_still_round_trip(tmp_path):
    cfg = apply_overrides(
        RunConfig(task="classification"),
        ["lr=1", "betas=[0, 0.5]", "cnn_widths=[2, 3]", "data.train=a.csv", "clip_norm=2", "seed=4294967295"],
    )
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.betas == (0.0, 0.5)
    assert cfg.model.cnn_widths == (2, 3) and cfg.data.train == ("a.csv",)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_model_config_is_the_deprecated_name_of_seq2seq_config():
    import tformer
    from tformer.config import Seq2SeqConfig

    assert ModelConfig is Seq2SeqConfig is tformer.Seq2SeqConfig is tformer.ModelConfig
    assert Seq2SeqConfig.__name__ == "Seq2SeqConfig"
