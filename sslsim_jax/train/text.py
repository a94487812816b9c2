"""Characters for CTC: the ``vocab.json`` of transformers' ``Wav2Vec2CTCTokenizer``, greedy
decoding and the character error rate.

The vocabulary maps ``<pad>`` (also the CTC blank) to 0, then ``<s>``, ``</s>``, ``<unk>``, the
word delimiter ``|`` and the characters, as the released English CTC checkpoints do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

BLANK = "<pad>"
SPECIAL_TOKENS = (BLANK, "<s>", "</s>", "<unk>", "|")
WORD_DELIMITER = "|"
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz'")


def build_vocab(characters: Iterable[str] = LETTERS) -> dict[str, int]:
    """``{token: id}``: the special tokens (``<pad>`` = 0), then ``characters`` in order."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for c in characters:
        if len(c) != 1 or c.isspace() or c in vocab:
            raise ValueError(f"expected distinct single non-space characters, got {c!r}")
        vocab[c] = len(vocab)
    return vocab


def normalise(text: str) -> str:
    """Lower case, single spaces: the transcript form the vocabulary spells."""
    return " ".join(text.lower().split())


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """Token ids of ``normalise(text)``; spaces become ``|``, unknown characters ``<unk>``."""
    unk = vocab["<unk>"]
    return [vocab.get(WORD_DELIMITER if c == " " else c, unk) for c in normalise(text)]


def greedy_decode(ids: Sequence[int] | np.ndarray, vocab: dict[str, int]) -> str:
    """Text of a frame-wise argmax path: repeats collapsed, blanks and special tokens dropped,
    ``|`` read as a space."""
    inverse = {i: t for t, i in vocab.items()}
    out, previous = [], None
    for i in np.asarray(ids).tolist():
        if i != previous and i != vocab[BLANK]:
            token = inverse.get(i, "")
            if token == WORD_DELIMITER:
                out.append(" ")
            elif token not in SPECIAL_TOKENS:
                out.append(token)
        previous = i
    return " ".join("".join(out).split())


def decode_logits(logits: np.ndarray, frame_lengths: np.ndarray, vocab: dict[str, int]):
    """Greedy transcripts of a batch: logits [B, T, V], frame_lengths [B] -> list of B str."""
    best = np.asarray(logits).argmax(-1)
    return [
        greedy_decode(row[:n], vocab)
        for row, n in zip(best, np.asarray(frame_lengths), strict=True)
    ]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit costs), one row of the table at a time."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Total character edit distance over total reference characters (spaces count), after
    `normalise`."""
    if len(references) != len(hypotheses):
        raise ValueError(
            f"expected as many hypotheses as references, got {len(hypotheses)} and "
            f"{len(references)}"
        )
    refs = [normalise(r) for r in references]
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("references are empty: the character error rate is undefined")
    errors = sum(edit_distance(r, normalise(h)) for r, h in zip(refs, hypotheses, strict=True))
    return errors / total


def save_vocab(vocab: dict[str, int], directory: str | os.PathLike) -> str:
    """Writes ``vocab.json`` (and the tokenizer config naming the special tokens)."""
    path = os.path.join(directory, "vocab.json")
    with open(path, "w") as f:
        json.dump(vocab, f, indent=1)
    tokenizer = {
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "pad_token": BLANK,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "word_delimiter_token": WORD_DELIMITER,
        "do_lower_case": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer, f, indent=1)
    return path


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Reads a ``vocab.json`` (a file or the directory holding it); errors name the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.json")
    try:
        with open(path) as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a CTC vocab.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or vocab.get(BLANK) != 0:
        raise ValueError(f"{path}: expected a {{token: id}} map with {BLANK!r} = 0")
    return vocab
