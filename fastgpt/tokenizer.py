"""GPT-2's byte-level BPE through the ``tokenizers`` library (never a hand-written BPE)."""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.token_to_id(EOS_TOKEN)

    # --------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """From a dir holding tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: tokenizer directory not found")
        tj = os.path.join(path, "tokenizer.json")
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        try:
            if os.path.isfile(tj):
                return cls(_HFTokenizer.from_file(tj))
            if os.path.isfile(vocab) and os.path.isfile(merges):
                return cls(_gpt2_pipeline(models.BPE.from_file(vocab, merges)))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
            raise ValueError(f"{path}: unreadable tokenizer files ({e})") from None
        raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> "Tokenizer":
        """Train a GPT-2-style byte-level BPE on an iterator of texts; <|endoftext|> is the one special token."""
        tok = _gpt2_pipeline(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[EOS_TOKEN],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, path) -> None:
        """Write tokenizer.json and GPT-2's vocab.json + merges.txt (what transformers' GPT2Tokenizer reads)."""
        from fastgpt.load import atomic_write

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        atomic_write(os.path.join(path, "tokenizer.json"), lambda tmp: self._tok.save(tmp))
        spec = json.loads(self._tok.to_str())["model"]
        vocab, merges = spec["vocab"], spec["merges"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        from fastgpt.load import atomic_write_text

        atomic_write_text(os.path.join(path, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(os.path.join(path, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        atomic_write_text(os.path.join(path, "special_tokens_map.json"), json.dumps(special))
        atomic_write_text(os.path.join(path, "tokenizer_config.json"),
                          json.dumps({**special, "model_max_length": 1024, "add_prefix_space": False,
                                      "tokenizer_class": "GPT2Tokenizer"}))

    # ------------------------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch) -> list[str]:
        """decode of each list of ids, in one call (the engine detokenises every sequence of a step)."""
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)


def _gpt2_pipeline(model) -> _HFTokenizer:
    """GPT-2's byte-level pipeline: its split regex, no prefix space, byte-level decoding."""
    tok = _HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
