"""The whole encoder-decoder on the device against torch.nn.Transformer on copied weights (issue 19), in
float32 and bfloat16, post-norm and pre-norm, with the "math" and "sdpa" backends.

Truth is float64 on the CPU. float32 on the device: within 1e-4 of it (logits of order 1; cuBLAS sums in
another order, TF32 off by PyTorch's default), gradients too. bfloat16: no more than twice the error of
torch's own nn.Transformer in bfloat16 on the same device and weights, plus 1e-2, so the test fails if
ours rounds worse than PyTorch's.
"""

import copy

import pytest
import torch

from support.weights import torch_stack_logits, torch_transformer_like
from tformer.config import ModelConfig
from tformer.models import Seq2Seq

pytestmark = pytest.mark.cuda

SRC = torch.tensor([[5, 6, 7, 8, 9, 10, 2], [5, 6, 7, 2, 0, 0, 0], [11, 2, 0, 0, 0, 0, 0]])
TGT = torch.tensor([[1, 4, 5, 6, 7], [1, 8, 9, 0, 0], [1, 3, 0, 0, 0]])
FP32_TOL = 1e-4


def _models(attention, norm_first):
    torch.manual_seed(0)
    config = ModelConfig(
        src_vocab_size=20, tgt_vocab_size=15, d_model=32, n_heads=4, d_ff=64, n_layers=2,
        n_decoder_layers=2, dropout=0.0, max_seq_len=32, attention=attention, norm_first=norm_first,
        final_norm=True,
    )  # fmt: skip
    model = Seq2Seq(config).double().eval()
    return model, torch_transformer_like(model)


def _error(out, truth):
    return (out.double().cpu() - truth).abs().max().item()


@pytest.mark.parametrize("attention", ["math", "sdpa"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_whole_model_matches_torch_transformer_on_the_device(device, bf16, attention, norm_first):
    model, ref = _models(attention, norm_first)
    truth = model(SRC, TGT).logits.detach()
    assert _error(torch_stack_logits(model, ref.encoder, ref.decoder, SRC, TGT), truth) < 1e-10
    src, tgt = SRC.to(device), TGT.to(device)

    ours32, ref32 = copy.deepcopy(model).float().to(device), copy.deepcopy(ref).float().to(device)
    logits = ours32(src, tgt).logits
    assert _error(logits, truth) < FP32_TOL
    assert _error(torch_stack_logits(ours32, ref32.encoder, ref32.decoder, src, tgt), truth) < FP32_TOL
    (grad,) = torch.autograd.grad((logits**2).sum(), [ours32.encoder.layers[0].self_attn.in_proj.weight])
    (want,) = torch.autograd.grad(
        (model(SRC, TGT).logits ** 2).sum(),
        [model.encoder.layers[0].self_attn.in_proj.weight],
    )
    assert _error(grad, want) < FP32_TOL * max(1.0, want.abs().max().item())

    with torch.no_grad():
        ours16, ref16 = copy.deepcopy(model).to(device, bf16), copy.deepcopy(ref).to(device, bf16)
        err = _error(ours16(src, tgt).logits, truth)
        ref_err = _error(torch_stack_logits(ours16, ref16.encoder, ref16.decoder, src, tgt), truth)
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)
