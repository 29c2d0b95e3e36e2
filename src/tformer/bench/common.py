"""Pieces the benchmarks share: this machine's matrix-multiply ceiling and copy bandwidth (measured in the
same run as what they bound), medians, and the GPT-2-shaped peers (Hugging Face `GPT2LMHeadModel`, an
`nn.TransformerEncoder` stack) with their weights copied into / from tformer's `LanguageModel`.

Hugging Face `transformers` is an optional extra (`pip install -e .[bench]`), imported only here and only
when a benchmark asks for it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import LMConfig
from tformer.models.lm import LanguageModel

PlotFn = Callable[[dict[str, Any], Path], None]


def bench_device(name: str) -> torch.device:
    """`--device NAME` as a torch.device: "cpu", "cuda" or "cuda:N", present here; else a ValueError that
    says what is."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}; expected cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: the benchmarks run on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {name!r}: no CUDA GPU here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); use --device cpu"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a GPU's kernels run asynchronously): before and after a timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(
    n: int = 2048,
    repeats: int = 5,
    precisions: tuple[str, ...] = ("float32", "bfloat16"),
    device: torch.device | None = None,
) -> dict[str, float]:
    """GFLOP/s of an (n, n) @ (n, n) product on this machine, per precision the faster of PyTorch's
    default kernel (`torch.matmul`: MKL for float32 on x86, oneDNN for bfloat16) and tformer's `linear`
    (oneDNN called directly for float32; F.linear, i.e. oneDNN again, for bfloat16): {"float32",
    "bfloat16"} are the ceilings, "<precision>_matmul" and "<precision>_onednn" the two figures. On a GPU
    (`device`) the ceiling is `torch.matmul`'s measured rate (cuBLAS; float32 without TF32 unless the
    process allowed it), not the datasheet's."""
    from tformer.accel.linear import onednn_linear

    device = torch.device("cpu") if device is None else device
    out = {}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for name, dtype in ((p, dtypes[p]) for p in precisions):
        size = _affordable_size(n, dtype, device)
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        seconds = median_seconds(partial(torch.matmul, a, b), repeats, device=device)
        out[f"{name}_matmul"] = 2 * size**3 / seconds / 1e9
        if device.type == "cpu":
            with torch.no_grad():
                bt = b.t().contiguous()  # linear(a, w) = a @ w^T
                onednn = median_seconds(partial(onednn_linear, a, bt), repeats)
                out[f"{name}_onednn"] = 2 * size**3 / onednn / 1e9
        out[name] = max(out[f"{name}_matmul"], out.get(f"{name}_onednn", 0.0))
    return out


def _affordable_size(n: int, dtype: torch.dtype, device: torch.device, call_s: float = 0.5) -> int:
    """`n`, halved (not below 256) while one (n, n) product would take over `call_s` at the rate a
    256-sized one measures: where a precision is emulated (bfloat16 without AVX-512 BF16 or AMX runs at
    about 1 GFLOP/s) a 2048-sized ceiling would take minutes; the rate of such a path barely depends on n."""
    small = 256
    if n <= small or device.type != "cpu":
        return n
    a, b = (torch.randn(small, small, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    t0 = time.perf_counter()
    torch.matmul(a, b)
    rate = 2 * small**3 / max(time.perf_counter() - t0, 1e-9)
    while n > small and 2 * n**3 / rate > call_s:
        n //= 2
    return n


class CopyProbe:
    """Copies of a `mib` MiB float32 tensor, timed one at a time: GB/s with read + write counted (2 bytes
    moved per byte copied). A decoding step must read every weight once; this is the rate at which this
    machine (or `device`'s memory) can stream them. Kept alive, so a benchmark can measure between its own
    timings. `read_gbs` times a sum over the same tensor instead: reading only, which is all a decoding
    step does."""

    def __init__(self, mib: int = 512, device: torch.device | None = None):
        self.device = torch.device("cpu") if device is None else device
        self.src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=self.device).uniform_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # every page touched before the first timing

    def _seconds(self, fn: Callable[[], object]) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - t0

    def gbs(self) -> float:
        return 2 * self.src.numel() * 4 / self._seconds(lambda: self.dst.copy_(self.src)) / 1e9

    def read_gbs(self) -> float:
        return self.src.numel() * 4 / self._seconds(self.src.sum) / 1e9


def machine_facts(choices: dict[str, str] | None, device: torch.device | None = None) -> dict[str, Any]:
    """What a benchmark report says about where it ran: the machine's fingerprint (CPU model, ISA flags,
    threads, torch), the GPU where `device` is one, tformer.accel's mode and the path each of tformer's
    shape classes took, and the process's peak resident memory so far (and the GPU's peak allocation)."""
    from tformer import accel
    from tformer.accel.tune import fingerprint
    from tformer.memory import peak_rss_bytes

    facts: dict[str, Any] = {
        "machine": fingerprint(),
        "device": "cpu" if device is None else str(device),
        "accel_mode": accel.mode(),
        "accel_choices": choices or {},
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
    return facts


def machine_line(report: dict[str, Any]) -> str:
    """One markdown paragraph from `machine_facts`' entries of a report."""
    from collections import Counter

    from tformer.memory import format_bytes

    m = report["machine"]
    paths = Counter(report["accel_choices"].values())
    chosen = ", ".join(f"{n} on {p}" for p, n in sorted(paths.items())) or "none measured"
    peak = report.get("peak_rss_bytes")
    gpu = report.get("gpu")
    on_gpu = (
        ""
        if gpu is None
        else f" Timed on the GPU: {gpu['name']} (compute capability {gpu['capability']}, "
        f"{format_bytes(gpu['memory_bytes'])}, CUDA {gpu['cuda']}), peak allocated "
        f"{format_bytes(gpu['peak_allocated_bytes'])}."
    )
    return (
        f"Machine: {m['cpu']} ({' '.join(m['isa']) or 'no listed ISA extensions'}), {m['threads']} threads, "
        f"torch {m['torch']}. tformer.accel ({report['accel_mode']}): shape classes (linear and dropout) {chosen} "
        f"(measured here, cached per machine). Peak resident memory of the benchmark process: "
        f"{'n/a' if peak is None else format_bytes(peak)}." + on_gpu
    )


def write_outputs(
    out: Path, stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str], plot: PlotFn
) -> None:
    """The three files every benchmark writes: STEM.json, STEM.md (the markdown table), STEM.png."""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def median_seconds(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | None = None
) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed ones: the timer the
    benchmarks share (a median, so one call stalled by another process does not move it). On a GPU
    (`device`) each call is timed from an idle device to the end of its kernels."""
    device = torch.device("cpu") if device is None else device
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class GPTShape:
    """A GPT-2-style language model and the batch it is run at."""

    n_layers: int
    n_heads: int
    d_model: int
    vocab_size: int
    block: int  # context length (max_seq_len) and training sequence length
    batch: int

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model

    def lm_config(self) -> LMConfig:
        """tformer's LanguageModel of this shape with GPT-2's choices (tanh-approximated GELU, "gelu_new")."""
        return LMConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_layers=self.n_layers,
            max_seq_len=self.block,
            dropout=0.0,
            activation="gelu_tanh",
        )

    def flops_per_token(self, context: int | None = None) -> float:
        """Model FLOPs of one training token (forward + backward): 6 N for the weight matrices (N counts
        the tied token matrix once, as the output projection, and no position table) plus 12 L C T for the
        attention products over a context of T (the convention of PaLM's appendix B and nanoGPT)."""
        t = self.block if context is None else context
        c, L = self.d_model, self.n_layers
        n = L * 12 * c * c + self.vocab_size * c  # per layer: 4 C^2 attention + 8 C^2 feed-forward
        return 6 * n + 12 * L * c * t


def require_transformers() -> ModuleType:
    """Import Hugging Face `transformers`, or say how to get it (it is the benchmarks' optional extra)."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(
            "this benchmark compares against Hugging Face transformers, which is not installed: "
            "pip install -e .[bench]"
        ) from exc
    return transformers


def hf_gpt2(shape: GPTShape, seed: int) -> nn.Module:
    """A randomly initialised Hugging Face GPT2LMHeadModel of `shape` (dropout 0, seeded)."""
    transformers = require_transformers()
    config = transformers.GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.block,
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def gpt2_lm_state(hf: Any) -> dict[str, Tensor]:
    """A Hugging Face GPT2LMHeadModel's weights as tformer LanguageModel's state dict, by interop's GPT-2
    mapping (tformer.interop.gpt2.lm_state, the one there is): every tensor used or named as ignored."""
    from tformer.interop import gpt2
    from tformer.interop.common import Tensors

    c = hf.config
    shape = LMConfig(
        vocab_size=c.vocab_size,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        max_seq_len=c.n_positions,
    )
    tensors = Tensors(hf.state_dict(), "GPT2LMHeadModel")
    state = gpt2.lm_state(tensors, shape)
    tensors.finish()
    return state


@torch.no_grad()
def gpt2_into_lm(hf: Any, lm: LanguageModel) -> None:
    """Copy a Hugging Face GPT-2's weights into tformer's LanguageModel of the same shape."""
    from tformer.interop.common import load_exact

    load_exact(lm, gpt2_lm_state(hf), "GPT2LMHeadModel")


class TorchEncoderLM(nn.Module):
    """The same GPT-2-shaped model from PyTorch's own blocks: token + learned position embeddings, an
    `nn.TransformerEncoder` of pre-norm layers run with a causal mask, final LayerNorm, tied output."""

    mask: Tensor  # (block, block) additive causal mask, a non-persistent buffer

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        c = shape.d_model
        self.wte = nn.Embedding(shape.vocab_size, c)
        self.wpe = nn.Embedding(shape.block, c)
        layer = nn.TransformerEncoderLayer(
            c,
            shape.n_heads,
            shape.d_ff,
            dropout=0.0,
            activation=lambda x: F.gelu(x, approximate="tanh"),
            batch_first=True,
            norm_first=True,
        )
        self.stack = nn.TransformerEncoder(layer, shape.n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(c)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(shape.block), persistent=False
        )

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe.weight[:t]
        x = self.stack(x, mask=self.mask[:t, :t], is_causal=True)
        return F.linear(self.ln_f(x), self.wte.weight)


# tformer LanguageModel state-dict names -> TorchEncoderLM's: the same tensors (fused q/k/v in_proj, nn.Linear
# orientation) under PyTorch's names, applied in this order
_TORCH_ENCODER_NAMES = (
    ("blocks.layers.", "stack.layers."),
    (".self_attn.in_proj.weight", ".self_attn.in_proj_weight"),
    (".self_attn.in_proj.bias", ".self_attn.in_proj_bias"),
    (".ff.linear", ".linear"),
    ("blocks.embed.", "wte."),
    ("blocks.positions.table", "wpe.weight"),
    ("blocks.norm.", "ln_f."),
)


def torch_encoder_state(lm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A GPT-2-shaped tformer LanguageModel's state dict as TorchEncoderLM's (its output is tied to wte)."""
    out = {}
    for key, value in lm_state.items():
        if key == "output.weight":  # tied to the token embedding in both models
            continue
        for ours, theirs in _TORCH_ENCODER_NAMES:
            key = key.replace(ours, theirs)
        out[key] = value
    return out


@torch.no_grad()
def gpt2_into_torch_encoder(hf: Any, model: TorchEncoderLM) -> None:
    """Copy a Hugging Face GPT-2's weights into the nn.TransformerEncoder model."""
    model.load_state_dict(torch_encoder_state(gpt2_lm_state(hf)), strict=True)


@torch.no_grad()
def lm_into_torch_encoder(lm: LanguageModel, model: TorchEncoderLM) -> None:
    """Copy tformer's LanguageModel weights into the nn.TransformerEncoder model."""
    model.load_state_dict(torch_encoder_state(lm.state_dict()), strict=True)


def markov_tokens(vocab_size: int, length: int, seed: int, branching: int = 4) -> Tensor:
    """A learnable token stream: each token is followed by one of `branching` fixed successors, chosen at
    random. A model's loss falls from ln(V) towards ln(branching), so loss curves say something."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, branching), generator=g).tolist()
    choice = torch.randint(branching, (length,), generator=g).tolist()
    out = [0] * length
    tok = 0
    for i in range(length):
        tok = successors[tok][choice[i]]
        out[i] = tok
    return torch.tensor(out, dtype=torch.long)
