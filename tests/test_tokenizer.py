"""fastgpt.Tokenizer: lossless round trips, and the same ids as transformers' GPT-2 tokenizers.

transformers 5 has no pure-Python GPT-2 BPE any more: GPT2Tokenizer and GPT2TokenizerFast are one class
on the tokenizers backend. The two comparisons below still differ in what they read: one builds GPT-2's
pipeline from our vocab.json + merges.txt, the other loads our tokenizer.json, so both exports are checked.
"""

import json
import os
import shutil

import pytest
import torch

from fastgpt import Tokenizer
from fastgpt.tokenizer import EOS_TOKEN
from helpers import SAMPLE_STRINGS, train_tiny_tokenizer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save(path)
    return path


def test_training_learned_merges(tokenizer):
    # 256 byte symbols + <|endoftext|> + merges: a vocabulary without merges would make every test weak
    assert tokenizer.vocab_size > 300
    assert len(tokenizer.encode("The quick brown fox")) < len("The quick brown fox".encode())


@pytest.mark.parametrize("text", SAMPLE_STRINGS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_decode_accepts_a_tensor(tokenizer):
    ids = tokenizer.encode("the lazy dog \U0001F600")
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids) == "the lazy dog \U0001F600"


def test_eos_token(tokenizer):
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int) and 0 <= eos < tokenizer.vocab_size
    assert tokenizer.encode(EOS_TOKEN) == [eos]
    ids = tokenizer.encode("end." + EOS_TOKEN + "Next")
    assert ids.count(eos) == 1
    assert tokenizer.decode(ids) == "end." + EOS_TOKEN + "Next"


def test_same_ids_as_transformers_from_vocab_and_merges(tokenizer, saved_dir):
    from transformers import GPT2Tokenizer

    theirs = GPT2Tokenizer(vocab=str(saved_dir / "vocab.json"), merges=str(saved_dir / "merges.txt"))
    assert len(theirs) == tokenizer.vocab_size
    for text in SAMPLE_STRINGS + ["a" + EOS_TOKEN + "b"]:
        assert tokenizer.encode(text) == theirs.encode(text), text
    assert theirs.eos_token_id == tokenizer.eos_token_id


def test_same_ids_as_transformers_fast_from_tokenizer_json(tokenizer, saved_dir):
    from transformers import GPT2TokenizerFast

    theirs = GPT2TokenizerFast(tokenizer_file=str(saved_dir / "tokenizer.json"))
    for text in SAMPLE_STRINGS + ["a" + EOS_TOKEN + "b"]:
        assert tokenizer.encode(text) == theirs.encode(text), text
        assert theirs.decode(tokenizer.encode(text)) == text


def test_transformers_auto_loads_the_saved_dir(tokenizer, saved_dir):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(saved_dir)
    for text in SAMPLE_STRINGS:
        assert tokenizer.encode(text) == theirs.encode(text), text


@pytest.mark.parametrize("keep", ["tokenizer.json only", "vocab + merges only"])
def test_load_from_either_format(tokenizer, saved_dir, tmp_path, keep):
    files = ["tokenizer.json"] if keep == "tokenizer.json only" else ["vocab.json", "merges.txt"]
    for name in files:
        shutil.copy(saved_dir / name, tmp_path / name)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in SAMPLE_STRINGS:
        assert loaded.encode(text) == tokenizer.encode(text), text
        assert loaded.decode(loaded.encode(text)) == text


def test_saved_files_are_gpt2_format(saved_dir, tokenizer):
    vocab = json.loads((saved_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[EOS_TOKEN] == tokenizer.eos_token_id and len(vocab) == tokenizer.vocab_size
    merges = (saved_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert all(len(m.split(" ")) == 2 for m in merges[1:])
    assert not [f for f in os.listdir(saved_dir) if f.endswith(".tmp")]


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: tokenizer directory not found"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # vocab without merges is not enough
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer.json, nor vocab.json \\+ merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"')
    with pytest.raises(ValueError, match=f"{tmp_path}: unreadable tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenizer.encode(b"bytes")
