"""Tokenizers of the ChatGLM family on the `sentencepiece` package: no transformers classes, no Hub code.

Each class reproduces its official tokenization_chatglm.py together with what the transformers base class
adds around it (v1 ran on transformers 4.33, v2/v3 on 4.41): special or added tokens are cut out of the
text before SentencePiece sees it, and decode joins the pieces and cleans up spaces the same way. Special
ids follow from the SentencePiece vocabulary size, so one code path serves the real models and the tiny
test fixtures.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

V1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
# The transformers special tokens of the v1 class (bos, eos, unk, pad, mask): never split, the whitespace
# around them is dropped, decode(skip_special_tokens=True) leaves them out. [gMASK] is not one of them.
V1_NO_SPLIT = ["<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"]
MAX_BLANK = 80
GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
V3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def split_added(text: str, strips: dict[str, tuple[bool, bool]]) -> list[tuple[str, bool]]:
    """Cut `text` around the tokens in `strips`, leftmost and longest first, as the transformers trie does.

    strips[token] = (lstrip, rstrip): whether the token eats the whitespace on its left / right.
    Returns (chunk, is_token) pairs without empty chunks.
    """
    if not strips:
        return [(text, False)] if text else []
    pattern = "(" + "|".join(re.escape(t) for t in sorted(strips, key=len, reverse=True)) + ")"
    parts = re.split(pattern, text)
    for i in range(1, len(parts), 2):  # odd indices hold the tokens, even ones the text between them
        lstrip, rstrip = strips[parts[i]]
        if lstrip:
            parts[i - 1] = parts[i - 1].rstrip()
        if rstrip:
            parts[i + 1] = parts[i + 1].lstrip()
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):  # longest run first: 90 spaces are <|blank_80|><|blank_10|>
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class IceTokenizer:
    """ChatGLM-6B (v1), ice_text.model. Newlines, tabs and runs of 2..80 spaces become the pieces <n>, <|tab|>
    and <|blank_N|>; every text id is shifted by num_image_tokens (0 in the released tokenizer_config.json,
    20000 by the class default). Prompt ids end with [gMASK] <sop>."""

    version = 1

    def __init__(self, model_file: str | Path, num_image_tokens: int = 20000, clean_up: bool = True):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.num_image_tokens = num_image_tokens
        self.vocab_size = num_image_tokens + self.sp.vocab_size()
        self.clean_up = clean_up
        names = V1_SPECIALS + ["<unk>", "<pad>", "</s>"]
        missing = [n for n in names if n != "<unk>" and self.sp.piece_to_id(n) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"{model_file} lacks the pieces {missing}: it is not a ChatGLM-6B ice_text.model")
        self.special_ids = {name: self.sp.piece_to_id(name) + num_image_tokens for name in names}
        self.eos_id = self.special_ids["<eop>"]
        self.stop_ids = [self.eos_id]
        self.no_split = {token: (True, True) for token in V1_NO_SPLIT}
        self.skippable = {self.special_ids[token] for token in V1_NO_SPLIT}

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for chunk, is_special in split_added(text, self.no_split):
            tokens += [chunk] if is_special else self.sp.encode_as_pieces(encode_whitespace(chunk))
        return tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.sp.piece_to_id(t) + self.num_image_tokens for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
        return [f"<image_{i}>" if i < self.num_image_tokens else self.sp.id_to_piece(i - self.num_image_tokens)
                for i in map(int, ids) if not (skip_special_tokens and i in self.skippable)]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            ids += [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        pad = self.special_ids["<pad>"]
        tokens = self.convert_ids_to_tokens([i for i in ids if i != pad], skip_special_tokens)
        text = decode_whitespace(self.sp.decode_pieces(tokens))
        return clean_up_spaces(text) if self.clean_up else text


class GLMTokenizer:
    """ChatGLM2-6B (v2) and ChatGLM3-6B (v3), tokenizer.model plus special tokens appended after its vocabulary:
    [MASK] [gMASK] [sMASK] sop eop, and for v3 <|system|> <|user|> <|assistant|> <|observation|>.

    `added` holds the transformers added tokens of tokenizer_config.json ("added_tokens_decoder"; the released
    chatglm3-6b has [gMASK] sop <|user|> <|assistant|>, chatglm2-6b none) as content -> (id, lstrip, rstrip):
    they are cut out of the text before SentencePiece and decoded on their own, joined to the rest by spaces.
    Prompt ids start with [gMASK] sop.
    """

    def __init__(self, model_file: str | Path, version: int,
                 added: dict[str, tuple[int, bool, bool]] | None = None, clean_up: bool = False):
        self.version = version
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.vocab_size()
        names = GLM_SPECIALS + (V3_ROLES if version == 3 else [])
        self.appended = {name: n + i for i, name in enumerate(names)}
        self.appended_names = {i: name for name, i in self.appended.items()}
        self.vocab_size = n + len(names)
        added = added or {}
        self.added = {content: i for content, (i, _, _) in added.items()}
        self.added_names = {i: content for content, i in self.added.items()}
        self.strips = {content: (lstrip, rstrip) for content, (_, lstrip, rstrip) in added.items()}
        self.clean_up = clean_up
        self.eos_id = self.sp.eos_id()
        self.special_ids = {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.eos_id, **self.appended}
        self.stop_ids = [self.eos_id] + ([self.appended["<|user|>"], self.appended["<|observation|>"]]
                                         if version == 3 else [])
        # bos, eos and the pad id (= unk) decode to nothing, as do ids outside the vocabulary.
        self.silent = {self.sp.bos_id(), self.eos_id, self.sp.unk_id()}

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for chunk, is_added in split_added(text, self.strips):
            tokens += [chunk] if is_added else self.sp.encode_as_pieces(chunk)
        return tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        # A piece spelled like an appended special ("sop") maps to the special id, as officially.
        return [self.added[t] if t in self.added else self.appended[t] if t in self.appended
                else self.sp.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.id_to_token(int(i)) for i in ids]

    def id_to_token(self, i: int) -> str:
        if i in self.added_names:
            return self.added_names[i]
        if i in self.appended_names:
            return self.appended_names[i] if self.version == 3 else ""
        if i in self.silent or not 0 <= i < self.sp.vocab_size():
            return ""
        return self.sp.id_to_piece(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            ids = [self.appended["[gMASK]"], self.appended["sop"]] + ids
        return ids

    def sp_encode(self, text: str) -> list[int]:
        """SentencePiece ids of `text` alone (no added-token split): what the official v3 build_chat_input uses."""
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """skip_special_tokens is accepted for a uniform interface; as in the official v2/v3 classes, which
        register no transformers special tokens, it leaves nothing out."""
        parts, run = [], []
        for token in self.convert_ids_to_tokens(ids):
            if token in self.added:
                text = self.sp.decode_pieces(run) if run else ""
                if text:
                    parts.append(text)
                parts.append(token)
                run = []
            else:
                run.append(token)
        if run:
            parts.append(self.sp.decode_pieces(run))
        text = " ".join(parts)
        return clean_up_spaces(text) if self.clean_up else text


def load_tokenizer(model_dir: str | Path, version: int) -> IceTokenizer | GLMTokenizer:
    """The tokenizer of a ChatGLM checkpoint directory, configured by its tokenizer_config.json when present."""
    if version not in (1, 2, 3):
        raise ValueError(f"ChatGLM version {version!r} is not 1, 2 or 3")
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    model_file = model_dir / ("ice_text.model" if version == 1 else "tokenizer.model")
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: a ChatGLM v{version} checkpoint keeps its tokenizer there")
    if version == 1:
        return IceTokenizer(model_file, num_image_tokens=config.get("num_image_tokens", 20000),
                            clean_up=config.get("clean_up_tokenization_spaces", True))
    added = {t["content"]: (int(i), t.get("lstrip", False), t.get("rstrip", False))
             for i, t in config.get("added_tokens_decoder", {}).items()}
    return GLMTokenizer(model_file, version, added, clean_up=config.get("clean_up_tokenization_spaces", False))
