"""`tformer serve` under load on loopback: requests/s and p50 / p99 latency with dynamic batching against
`--max-batch 1`, for translation (greedy and beam 4) and a language model, at 32 and 64 concurrent
clients, and the time to the first streamed token.

The server runs as `tformer serve CHECKPOINT --host 127.0.0.1` in a subprocess (one per --max-batch
setting; ready when GET /health says so); the clients are asyncio tasks sharing an httpx.AsyncClient in
this process, each sending its next request as soon as its last one is answered. Every run is bounded by
--requests and --seconds. Every response is checked against the offline predictor on the same
checkpoint, each input alone (`Translator.translate([text])`, `TextGenerator.generate(prompt)`): a
response that differs is "wrong", one that equals another input's answer "swapped", a failed request
"lost"; the table says how many of each (all should be 0).

Translation: the demo's checkpoint (`tformer demo --out runs/demo`, made here if missing; `--quick`: the
quick demo's) on its held-out numbers. LM: `--lm-checkpoint`, or a small character model trained here on
the demo's English number words (600 steps: about 6 minutes on 2 cores). Greedy decoding throughout, so
the answers are exact.

    .venv/bin/python benchmarks/serve_load.py [--checkpoint runs/demo/checkpoint] [--quick]
        [--clients 32,64] [--requests 512] [--seconds 60] [--json results/serve_load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from tformer.data.synthetic import number_translation
from tformer.demo import demo_size

TFORMER = [sys.executable, "-m", "tformer"]


def cpu_model() -> str:
    """lscpu's model name, family and model (what BENCHMARKS.md names machines by)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda key: fields.get(key, "?").strip()  # noqa: E731
    return f"{get('Model name')} (family {get('CPU family')} model {get('Model')})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`tformer serve` in a subprocess, ready once /health answers 200; SIGTERM on exit."""

    def __init__(self, checkpoint: Path, *, max_batch: int, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [*TFORMER, "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--max-batch", str(max_batch), *(extra or [])]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__, after the process)
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tformer serve exited ({self.process.returncode}):\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tformer serve not ready after 600 s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()  # SIGTERM: drains, then exits
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@dataclass
class Row:
    task: str
    decoding: str
    clients: int
    max_batch: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    wrong: int
    swapped: int
    lost: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def load(
    url: str, path: str, bodies: list[dict[str, Any]], answers: list[str], read: str, *, clients: int,
    requests: int, seconds: float,
) -> tuple[list[float], float, int, int, int]:  # fmt: skip
    """`clients` tasks sending bodies[i % n] until `requests` are answered or `seconds` pass ->
    (latencies, elapsed, wrong, swapped, lost)."""
    latencies: list[float] = []
    counts = {"wrong": 0, "swapped": 0, "lost": 0}
    known = set(answers)
    issued = 0
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one_client() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() - start < seconds:
                i = issued % len(bodies)
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=bodies[i])
                    r.raise_for_status()
                    got = r.json()
                    for key in read.split("."):
                        got = got[int(key)] if key.isdigit() else got[key]
                except (httpx.HTTPError, KeyError, ValueError):
                    counts["lost"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if got != answers[i]:
                    counts["swapped" if got in known else "wrong"] += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, time.perf_counter() - start, counts["wrong"], counts["swapped"], counts["lost"]


async def first_token_ms(
    url: str, path: str, body: dict[str, Any], *, clients: int, rounds: int
) -> list[float]:
    """Milliseconds from sending a streamed request to its first text event, `clients` at a time."""
    out: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one() -> None:
            for _ in range(rounds):
                t0 = time.perf_counter()
                async with client.stream("POST", path, json={**body, "stream": True}) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: ") and line != "data: [DONE]":
                            out.append(1000 * (time.perf_counter() - t0))
                            break
                    async for _ in lines:  # the rest of the stream
                        pass

        await asyncio.gather(*(one() for _ in range(clients)))
    return out


def run_rows(
    task: str, checkpoint: Path, settings: list[tuple[str, str, list[dict[str, Any]], list[str], str]],
    args: argparse.Namespace, ttft: tuple[str, dict[str, Any]] | None,
) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    rows, streamed = [], {}
    for max_batch in (args.max_batch, 1):
        with Server(checkpoint, max_batch=max_batch) as server:
            for decoding, path, bodies, answers, read in settings:
                asyncio.run(load(server.url, path, bodies, answers, read, clients=8, requests=16, seconds=30))
                for clients in args.clients:
                    lat, elapsed, wrong, swapped, lost = asyncio.run(
                        load(server.url, path, bodies, answers, read, clients=clients, requests=args.requests,
                             seconds=args.seconds)
                    )  # fmt: skip
                    row = Row(task, decoding, clients, max_batch, len(lat), round(elapsed, 2),
                              round(len(lat) / elapsed, 2), round(1000 * percentile(lat, 0.5), 1),
                              round(1000 * percentile(lat, 0.99), 1), wrong, swapped, lost)  # fmt: skip
                    print(json.dumps(asdict(row)), flush=True)
                    rows.append(row)
            if ttft is not None:
                path, body = ttft
                for clients in (1, *args.clients):
                    ms = asyncio.run(
                        first_token_ms(server.url, path, body, clients=clients, rounds=max(1, 32 // clients))
                    )
                    name = f"{task} max_batch={max_batch} clients={clients}"
                    streamed[name] = {
                        "p50_ms": round(percentile(ms, 0.5), 1), "p99_ms": round(percentile(ms, 0.99), 1), "n": len(ms),
                    }  # fmt: skip
                    print(json.dumps({"first_token": {name: streamed[name]}}), flush=True)
    return rows, streamed


def translation_settings(
    checkpoint: Path, quick: bool, n: int
) -> list[tuple[str, str, list[dict[str, Any]], list[str], str]]:
    from tformer.tasks import Translator

    size = demo_size(quick)
    sources = [p.src for p in number_translation(size.n_train, size.n_valid, size.n_test, seed=0)["test"]][:n]
    translator = Translator.load(checkpoint, accel=True)
    out = []
    for beam in (1, 4):
        answers = [translator.translate([s], beam_size=beam)[0] for s in sources]  # each alone
        bodies = [{"text": s, "beam_size": beam} for s in sources]
        out.append(
            ("greedy" if beam == 1 else f"beam {beam}", "/v1/translate", bodies, answers, "translation")
        )
    return out


def lm_checkpoint(out: Path) -> Path:
    """A small character LM on the demo's English number words, trained here (600 steps: about 6 minutes on 2 cores)."""
    text = "\n".join(p.tgt for p in number_translation(20000, 10, 10, seed=3)["train"])
    (out / "numbers.txt").write_text(text)
    subprocess.run(
        [*TFORMER, "train", "lm", "--train", str(out / "numbers.txt"), "--out", str(out / "lm"), "--no-progress",
         "data.tokenizer=char", "data.valid_fraction=0.05", "model.d_model=128", "model.n_heads=4", "model.d_ff=512",
         "model.n_layers=3", "model.max_seq_len=128", "model.dropout=0.0", "train.max_steps=600", "train.batch_size=32",
         "train.lr=0.002", "train.warmup_steps=50"],
        check=True,
    )  # fmt: skip
    return out / "lm" / "checkpoint"


def lm_settings(
    checkpoint: Path, n: int, tokens: int
) -> list[tuple[str, str, list[dict[str, Any]], list[str], str]]:
    from tformer.tasks import TextGenerator

    generator = TextGenerator.load(checkpoint, accel=True)
    prompts = [p.tgt.split(" ")[0] + " " for p in number_translation(10, 10, n, seed=4)["test"]]
    answers = [generator.generate(p, max_new_tokens=tokens, greedy=True) for p in prompts]
    bodies = [{"prompt": p, "max_tokens": tokens, "temperature": 0} for p in prompts]
    return [(f"greedy, {tokens} tokens", "/v1/completions", bodies, answers, "choices.0.text")]


def markdown(rows: list[Row]) -> str:
    lines = ["| task | decoding | clients | --max-batch | requests | req/s | p50 ms | p99 ms | wrong / swapped / lost |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.task} | {r.decoding} | {r.clients} | {r.max_batch} | {r.requests} | {r.requests_per_s} | "
                     f"{r.p50_ms} | {r.p99_ms} | {r.wrong} / {r.swapped} / {r.lost} |")  # fmt: skip
    speedups = []
    for r in rows:
        if r.max_batch != 1:
            base = next(
                (
                    b
                    for b in rows
                    if b.max_batch == 1 and (b.task, b.decoding, b.clients) == (r.task, r.decoding, r.clients)
                ),
                None,
            )
            if base is not None and base.requests_per_s > 0:
                speedups.append(
                    f"{r.task} {r.decoding} at {r.clients} clients: {r.requests_per_s / base.requests_per_s:.2f}x"
                )
    return "\n".join(lines) + (
        "\n\nbatching / --max-batch 1 (requests/s): " + "; ".join(speedups) if speedups else ""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="translation checkpoint (default: the demo's)"
    )
    parser.add_argument("--quick", action="store_true", help="the quick demo's checkpoint (runs/demo-quick)")
    parser.add_argument(
        "--lm-checkpoint", type=Path, default=None, help="LM checkpoint (default: trained here)"
    )
    parser.add_argument("--clients", default="32,64", help="concurrent clients per run (comma-separated)")
    parser.add_argument("--requests", type=int, default=512, help="requests per run at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per run at most")
    parser.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    parser.add_argument(
        "--inputs", type=int, default=256, help="distinct held-out inputs the clients cycle through"
    )
    parser.add_argument("--lm-tokens", type=int, default=32, help="tokens per LM completion")
    parser.add_argument("--skip", choices=["lm", "translation"], action="append", default=[])
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()
    rows, first = [], {}
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if "translation" not in args.skip:
        checkpoint = args.checkpoint
        if checkpoint is None:
            demo = Path("runs/demo-quick" if args.quick else "runs/demo")
            if not (demo / "checkpoint").exists():
                subprocess.run(
                    [
                        *TFORMER,
                        "demo",
                        "--out",
                        str(demo),
                        "--no-progress",
                        *(["--quick"] if args.quick else []),
                    ],
                    check=True,
                )
            checkpoint = demo / "checkpoint"
        settings = translation_settings(checkpoint, args.quick, args.inputs)
        got, ttft = run_rows(
            "translation",
            checkpoint,
            settings,
            args,
            ("/v1/translate", {"text": settings[0][2][0]["text"], "beam_size": 1}),
        )
        rows += got
        first.update(ttft)
    if "lm" not in args.skip:
        checkpoint = args.lm_checkpoint or lm_checkpoint(work)
        settings = lm_settings(checkpoint, args.inputs, args.lm_tokens)
        body = {k: v for k, v in settings[0][2][0].items()}
        got, ttft = run_rows("lm", checkpoint, settings, args, ("/v1/completions", body))
        rows += got
        first.update(ttft)
    report = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "argv": sys.argv, "rows": [asdict(r) for r in rows], "first_token": first,
    }  # fmt: skip
    print()
    print(
        f"CPU: {report['cpu']} ({report['cores']} cores); load average before {load_before}, after {report['load_after']}"
    )
    print(markdown(rows))
    print("\ntime to the first streamed token (ms):")
    for name, value in first.items():
        print(f"  {name}: p50 {value['p50_ms']}, p99 {value['p99_ms']} (n = {value['n']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    bad = sum(r.wrong + r.swapped + r.lost for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
