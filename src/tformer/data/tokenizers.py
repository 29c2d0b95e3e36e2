"""One Tokenizer interface over Hugging Face `tokenizers`, saved next to the model as tokenizer.json.

Special tokens are declared once (SPECIALS) and get the same ids in every vocabulary: <pad>=0, <bos>=1,
<eos>=2, <unk>=3. Kinds: "word" (whole words, with punctuation split off as its own tokens), "bpe"
(byte-pair merges learned on the training split; Sennrich et al., 2016) and "char" (one token per
character, newlines included). char and bpe round-trip text exactly (bpe through a Metaspace
pre-tokenizer and decoder, char by fusing the characters back); word maps every run of whitespace to one
space first.

A tokenizer.json made elsewhere (a Hugging Face model's) keeps its own ids: its special tokens are named
explicitly by role (`specials={"pad": 0, "bos": 101, "eos": 102, "unk": 100}`, several roles may share
one id) and that map is saved beside it as NAME.specials.json, which `load` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
ROLES = ("pad", "bos", "eos", "unk")
KINDS = ("word", "bpe", "char")


def specials_path(path: str | Path) -> Path:
    """Where the role -> id map of an imported tokenizer lives: tokenizer.json -> tokenizer.specials.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.specials.json")


class Tokenizer:
    """Text <-> ids. `encode` adds no BOS/EOS; the task decides where those go.

    `specials=None`: tformer's own vocabulary, <pad> <bos> <eos> <unk> at ids 0..3. Otherwise a map from
    each role in ROLES to an id of this vocabulary (an imported tokenizer keeps its own numbering)."""

    def __init__(self, hf: HFTokenizer, specials: dict[str, int] | None = None) -> None:
        if specials is None:
            for i, tok in enumerate(SPECIALS):
                if hf.token_to_id(tok) != i:
                    raise ValueError(f"tokenizer must map {tok!r} to id {i}, got {hf.token_to_id(tok)}")
            ids = dict(zip(ROLES, range(4), strict=True))
        else:
            if sorted(specials) != sorted(ROLES):
                raise ValueError(
                    f"special tokens must name exactly the roles {', '.join(ROLES)}; got {', '.join(specials)}"
                )
            size = hf.get_vocab_size()
            for role, i in specials.items():
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
                    raise ValueError(
                        f"special token {role!r} = {i!r} is not an id of the vocabulary [0, {size})"
                    )
            ids = dict(specials)
        self.hf, self.specials = hf, None if specials is None else dict(specials)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (ids[r] for r in ROLES)
        self.special_ids = frozenset(ids.values())

    @classmethod
    def train(cls, texts: Iterable[str], *, kind: str = "word", vocab_size: int = 8000) -> Tokenizer:
        trainer: trainers.Trainer
        if kind == "char":
            hf = HFTokenizer(models.WordLevel(unk_token=UNK))
            hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            hf.decoder = decoders.Fuse()
            hf.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS)))
            return cls(hf)
        if kind == "word":
            hf = HFTokenizer(models.WordLevel(unk_token=UNK))
            trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), vocab_size=vocab_size)
        elif kind == "bpe":
            hf = HFTokenizer(models.BPE(unk_token=UNK))
            trainer = trainers.BpeTrainer(special_tokens=list(SPECIALS), vocab_size=vocab_size)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "word":
            # Any run of whitespace (newlines, tabs) is one space, so a word after a newline is the same
            # token as after a space. BPE keeps the text exact: its merges can hold newlines.
            hf.normalizer = normalizers.Sequence(
                [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
            )
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex(r"[-,.;:!?]"), behavior="isolated")]
        )
        hf.decoder = decoders.Metaspace()
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([i for i in ids if i not in self.special_ids])

    def tokens(self, text: str) -> list[str]:
        return self.hf.encode(text, add_special_tokens=False).tokens

    def id_to_token(self, i: int) -> str:
        token = self.hf.id_to_token(i)
        if token is None:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def to_str(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")
        if self.specials is not None:
            specials_path(path).write_text(json.dumps(self.specials, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        specials = None
        side = specials_path(path)
        if side.exists():
            try:
                specials = json.loads(side.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{side}: not valid JSON ({exc})") from None
            if not isinstance(specials, dict):
                raise ValueError(f"{side}: expected an object mapping {', '.join(ROLES)} to token ids")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found") from None
        except (Exception, json.JSONDecodeError) as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer file ({exc})") from None
        try:
            return cls(hf, specials)
        except ValueError as exc:
            raise ValueError(f"{side if specials is not None else path}: {exc}") from None
