"""The capability table (tformer/backends.py): torch-free, complete, read by config and attention alike."""

import subprocess
import sys
import warnings

import pytest
import torch

from tformer import backends
from tformer.attention import MultiHeadAttention, get_backend
from tformer.attention import backends as kernels
from tformer.config import ConfigError, LMConfig, ModelConfig
from tformer.models import Seq2Seq


def test_table_and_config_import_no_torch():
    code = "import sys, tformer.backends, tformer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", list(backends.BACKENDS))
def test_every_entry_resolves(name):
    spec = backends.BACKENDS[name]
    backend = get_backend(name)
    assert backend.spec is spec and callable(backend.fn)
    assert backend.supports_weights == spec.weights and backend.options == spec.options
    for path in (spec.params, spec.reference_mask):
        if path is not None:
            assert callable(kernels.load(path))
    assert spec.masks in backends.MASKS and set(spec.scores) <= set(backends.SCORES)


def test_roles_are_explicit_and_impossible_ones_are_config_errors():
    # without a named role, `attention` fills every role it declares, "sdpa" the others
    local = ModelConfig(attention="local")
    assert (local.decoder_backend, local.cross_backend) == ("local", "sdpa")
    lin = ModelConfig(attention="linformer")
    assert (lin.decoder_backend, lin.cross_backend) == ("sdpa", "linformer")
    named = ModelConfig(attention="local", cross_attention="math", decoder_attention="chunked")
    assert (named.decoder_backend, named.cross_backend) == ("chunked", "math")
    with pytest.raises(ConfigError, match=r"cross_attention = 'local' cannot be cross-attention \(a window"):
        ModelConfig(cross_attention="local")
    with pytest.raises(ConfigError, match=r"decoder_attention = 'linformer' cannot be causal"):
        ModelConfig(decoder_attention="linformer")
    with pytest.raises(ConfigError, match=r"LMConfig.attention \(the causal self-attention\) = 'linformer'"):
        LMConfig(attention="linformer")
    with pytest.raises(
        ConfigError, match=r"cross_attention = 'performer' does not support attention_dropout"
    ):
        ModelConfig(attention_dropout=0.1, cross_attention="performer")
    with pytest.raises(ConfigError, match=r"cross_attention = 'flash' is not one of math, sdpa"):
        ModelConfig(cross_attention="flash")
    assert ModelConfig.from_dict(named.to_dict()) == named


def test_model_layers_use_the_resolved_roles():
    c = ModelConfig(
        d_model=8, n_heads=2, d_ff=16, n_layers=1, src_vocab_size=10, tgt_vocab_size=10,
        attention="local", cross_attention="math",
    )  # fmt: skip
    layer = Seq2Seq(c).decoder.layers[0]
    assert layer.self_attn.backend.name == "local" and layer.cross_attn.backend.name == "math"


def test_attention_module_refuses_what_its_backend_cannot_do():
    with pytest.raises(ValueError, match="'local' cannot be cross-attention"):
        MultiHeadAttention(8, 2, backend="local", cross=True)
    with pytest.raises(ValueError, match="'chunked' does not support attention_dropout"):
        MultiHeadAttention(8, 2, backend="chunked", dropout=0.1)


def test_a_new_backend_is_one_entry(monkeypatch):
    """A kernel file plus one entry: config accepts it, MultiHeadAttention runs it, with its own parameters
    (here linformer's factory, under a new name) and options by their user-facing names."""
    entry = backends.Backend(
        "lowrank",
        "tformer.attention.linformer:linformer_attention",
        causal=False,
        masks="key_padding",
        options=("rank", "max_seq_len"),
        params="tformer.attention.linformer:linformer_parameters",
    )
    monkeypatch.setitem(backends.BACKENDS, "lowrank", entry)
    monkeypatch.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    ModelConfig(attention="lowrank")  # the config reads the same table
    with pytest.raises(ConfigError, match="'lowrank' cannot be causal"):
        LMConfig(attention="lowrank")
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, backend="lowrank", backend_options={"rank": 3, "max_seq_len": 6, "x": 1})
    assert mha.backend_params == ("proj_k", "proj_v") and mha.backend_options == {"rank": 3, "max_seq_len": 6}
    assert [k for k in mha.state_dict() if k.startswith("proj")] == ["proj_k", "proj_v"]
    torch.manual_seed(0)
    ref = MultiHeadAttention(8, 2, backend="linformer", backend_options={"rank": 3, "max_seq_len": 6})
    ref.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 8)
    assert torch.equal(mha(x).out, ref(x).out)


def test_weights_fallback_reads_the_reference_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, backend="local", backend_options={"window": 1}).eval()
    x = torch.randn(1, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        weights = mha(x, need_weights=True).weights
    assert weights is not None
    outside = ~backends_band(5, 1)
    assert torch.all(weights[..., outside] == 0)


def backends_band(t: int, window: int) -> torch.Tensor:
    return kernels.load("tformer.attention.local:reference_mask")(t, t, causal=False, window=window)
