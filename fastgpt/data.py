"""Training data: documents in, one memory-mapped token file out, random contiguous windows back.

    documents (text files, a folder, JSONL prompt/completion pairs, or the stdlib corpus)
      -> token ids, each document followed by <|endoftext|>
      -> <out>/data/{train,val}.bin (uint16 when the vocab fits, else uint32), written once, memory-mapped
      -> random windows x = tokens[s : s+T], y = tokens[s+1 : s+T+1]

JSONL pairs also write {train,val}.mask.bin (uint8, one byte per token): 1 where the token is a target the
loss should count (the completion and its <|endoftext|>), 0 under the prompt. Text documents are all 1s.

The stdlib corpus is gathered at run time from the running interpreter (``pydoc_data``'s help topics and
the docstrings of the standard library's source files): nothing is downloaded and nothing is copied into
the repository.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # target value F.cross_entropy skips


@dataclass
class Document:
    # where it came from, relative to what the user named (file, file:line, stdlib module): the train/val
    # split hashes it, so the split does not change when the data moves to another directory
    name: str
    text: str = ""
    prompt: str | None = None  # set for a JSONL pair: text is then the completion


# -------------------------------------------------------------------------------------------- reading
def _read_utf8(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "training data must be UTF-8") from None


def read_jsonl(path: str, name: str | None = None) -> list[Document]:
    """Prompt/completion pairs, one JSON object per line: {"prompt": "...", "completion": "..."}."""
    name = name or os.path.basename(path)
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record or "completion" not in record:
            raise ValueError(f'{where}: expected an object with "prompt" and "completion"')
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f'{where}: "prompt" and "completion" must be strings')
        if not completion:
            raise ValueError(f'{where}: empty "completion" (there would be nothing to learn)')
        docs.append(Document(f"{name}:{lineno}", text=completion, prompt=prompt))
    if not docs:
        raise ValueError(f"{path}: empty file (no prompt/completion pairs)")
    return docs


def _read_one(path: str, name: str, in_folder: bool) -> list[Document]:
    if path.endswith(".jsonl"):
        return read_jsonl(path, name)
    text = _read_utf8(path)
    if not text.strip():
        if in_folder:  # an empty file among others (an __init__.py, a placeholder) is no error
            return []
        raise ValueError(f"{path}: empty file (no text to train on)")
    return [Document(name, text)]


def read_documents(paths) -> list[Document]:
    """Every file given, and every file under every folder given (recursively, hidden ones skipped).

    A ``.jsonl`` file holds prompt/completion pairs; anything else is UTF-8 text, one document per file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[Document] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
            folder_docs = [d for f in found for d in _read_one(f, os.path.relpath(f, path), in_folder=True)]
            if not folder_docs:
                raise ValueError(f"{path}: folder holds no text to train on")
            docs += folder_docs
        elif os.path.isfile(path):
            docs += _read_one(path, os.path.basename(path), in_folder=False)
        elif os.path.exists(path):
            raise ValueError(f"{path}: not a regular file or folder")
        else:
            raise FileNotFoundError(f"{path}: training data not found")
    if not docs:
        raise ValueError("no training data given")
    return docs


def stdlib_documents(keep=None) -> list[Document]:
    """The text every Python install carries: pydoc's help topics and the stdlib's docstrings.

    One document per help topic and one per stdlib source file (its module docstring followed by the
    docstrings of its classes and functions). Sources are parsed, not imported: importing every module
    would run code (``antigravity`` opens a browser). Test suites and site-packages are left out.
    ``keep(name) -> bool``, when given, selects documents by name before any file is parsed.
    """
    keep = keep or (lambda name: True)
    import pydoc_data.topics

    docs = [Document(f"pydoc_data:{name}", text) for name, text in sorted(pydoc_data.topics.topics.items())
            if keep(f"pydoc_data:{name}")]
    root = sysconfig.get_paths()["stdlib"]
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            module = "stdlib:" + os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            if not name.endswith(".py") or not keep(module):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue  # a few files are deliberately broken or in another encoding (lib2to3 fixtures)
            nodes = (n for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            texts = [d for d in (ast.get_docstring(n) for n in nodes) if d]
            if texts:
                docs.append(Document(module, "\n\n".join(texts)))
    return docs


def is_validation_name(name: str, val_fraction: float) -> bool:
    """Whether a document of this name is held out (a hash, so the choice is the same in every run)."""
    return zlib.crc32(name.encode("utf-8")) % 10_000 < val_fraction * 10_000


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents for validation, chosen by a hash of their name (stable across runs).

    Returns (train, val). With fewer than 20 documents there is nothing sensible to hold out by document:
    val is then empty and the caller takes the tail of the token stream instead.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(docs) < 20:
        return docs, []
    is_val = [is_validation_name(d.name, val_fraction) for d in docs]
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    if not train or not val:
        return docs, []
    return train, val


# ----------------------------------------------------------------------------------------- tokenising
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def encode_documents(tokenizer, docs: list[Document]) -> tuple[np.ndarray, np.ndarray | None]:
    """All documents as one token stream (each ends with <|endoftext|>), and the loss mask if any doc is a pair.

    A pair's prompt and completion are encoded separately, so the boundary falls where it will at
    inference (where the prompt is encoded alone), and the mask is exact.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, masks = [], []
    has_pairs = any(d.prompt is not None for d in docs)
    for d in docs:
        completion = tokenizer.encode(d.text) + [eos]
        prompt = tokenizer.encode(d.prompt) if d.prompt is not None else []
        pieces.append(np.asarray(prompt + completion, dtype=dtype))
        if has_pairs:
            masks.append(np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(completion), np.uint8)]))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return tokens, (np.concatenate(masks) if has_pairs else None)


def write_array(path: str, array: np.ndarray) -> None:
    from fastgpt.load import atomic_write

    atomic_write(path, lambda tmp: array.tofile(tmp))


def open_tokens(path: str, vocab_size: int) -> np.memmap:
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def open_mask(path: str) -> np.memmap | None:
    return np.memmap(path, dtype=np.uint8, mode="r") if os.path.exists(path) else None


# ------------------------------------------------------------------------------------------- batches
def check_enough_tokens(n_tokens: int, block_size: int, split: str) -> None:
    if n_tokens < block_size + 1:
        raise ValueError(f"the {split} split has {n_tokens} tokens, fewer than --block-size {block_size} + 1; "
                         "give more text or a smaller --block-size")


def sample_batch(tokens, mask, batch_size: int, block_size: int, generator: torch.Generator):
    """Random contiguous windows: x (B, T) int64 and targets y (B, T), IGNORE_INDEX where the mask is 0."""
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + block_size] for s in starts]).astype(np.int64))
    if mask is not None:
        counts = torch.from_numpy(np.stack([mask[s + 1:s + 1 + block_size] for s in starts]).astype(bool))
        y = y.masked_fill(~counts, IGNORE_INDEX)
    return x, y
