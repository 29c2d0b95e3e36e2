"""Load a trained nanoGPT checkpoint into tformer's LanguageModel and compare: same logits, same loss.

    .venv/bin/python benchmarks/nanogpt_parity.py /path/to/nanoGPT [out-shakespeare-char/ckpt.pt]

Imports nanoGPT's own `model.py` from its checkout (not part of this repository) to rebuild its model,
maps its tensor names onto tformer's (c_attn -> in_proj, c_fc -> linear1, ...), and scores both on the
whole validation split with tformer's evaluation (consecutive block-size windows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tformer.config import LMConfig
from tformer.models import LanguageModel
from tformer.tasks.lm import mean_nll


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    ckpt_path = root / (sys.argv[2] if len(sys.argv) > 2 else "out-shakespeare-char/ckpt.pt")
    if not ckpt_path.exists():
        print(f"skipping: {ckpt_path} not found (run nanoGPT's baby configuration first)")
        return 0
    sys.path.insert(0, str(root))
    from model import GPT, GPTConfig  # nanoGPT's, from its checkout

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    a = ck["model_args"]
    theirs = GPT(GPTConfig(**a))
    theirs.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in ck["model"].items()})
    ours = LanguageModel(
        LMConfig(
            vocab_size=a["vocab_size"],
            d_model=a["n_embd"],
            n_heads=a["n_head"],
            d_ff=4 * a["n_embd"],
            n_layers=a["n_layer"],
            max_seq_len=a["block_size"],
            bias=a["bias"],
            dropout=0.0,
        )
    )
    sd = theirs.state_dict()
    mapped = {
        "blocks.embed.weight": sd["transformer.wte.weight"],
        "blocks.positions.table": sd["transformer.wpe.weight"],
        "blocks.norm.weight": sd["transformer.ln_f.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    names = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.c_attn": "self_attn.in_proj",
        "attn.c_proj": "self_attn.out_proj",
        "mlp.c_fc": "ff.linear1",
        "mlp.c_proj": "ff.linear2",
    }
    for i in range(a["n_layer"]):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                key = f"transformer.h.{i}.{src}.{kind}"
                if key in sd:
                    mapped[f"blocks.layers.{i}.{dst}.{kind}"] = sd[key]
    ours.load_state_dict(mapped, strict=True)
    theirs.eval(), ours.eval()
    val = torch.from_numpy(
        np.fromfile(root / "data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
    )
    x = torch.stack([val[i : i + a["block_size"]] for i in range(0, 10 * a["block_size"], a["block_size"])])
    with torch.no_grad():
        want, _ = theirs(x, x)  # with targets nanoGPT returns logits for every position
        got = ours(x).logits
    print(
        f"nanoGPT checkpoint at iteration {ck['iter_num']}, its own val estimate {float(ck['best_val_loss']):.4f}"
    )
    print(f"max |logit difference| tformer vs nanoGPT: {(want - got).abs().max().item():.2e}")
    print(f"whole-validation-split loss, scored by tformer: {mean_nll(ours, val):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
