"""GPT-2 model configuration: presets and conversion from/to a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # tokens in the embedding table (= lm_head rows; the head is tied)
    n_positions: int = 1024  # context length: rows of the learned position table
    n_embd: int = 768  # model width C
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head dim D = n_embd // n_head
    layer_norm_epsilon: float = 1e-5  # eps of every LayerNorm
    bos_token_id: int = 50256  # GPT-2 uses <|endoftext|> for both
    eos_token_id: int = 50256
    # training dropout (GPT-2's names; off by default, and always off in eval mode)
    resid_pdrop: float = 0.0  # on the attention and MLP branches, before their residual adds
    embd_pdrop: float = 0.0  # on token + position embeddings
    attn_pdrop: float = 0.0  # kept from a checkpoint's config.json, but NOT applied: no attention dropout

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, config) -> "GPTConfig":
        """From a transformers GPT-2 config: a dict, a path to config.json, or an object with to_dict()."""
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: config.json not found") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        elif hasattr(config, "to_dict"):
            config = config.to_dict()
        model_type = config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"model_type {model_type!r} is not a GPT-2 model")
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not supported (GPT-2 uses tanh GELU 'gelu_new')")
        n_inner = config.get("n_inner")
        if n_inner is not None and int(n_inner) != 4 * int(config.get("n_embd", 0)):
            raise ValueError(f"n_inner={n_inner} is not supported: fastgpt's MLP is 4 x n_embd wide")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if config.get(flag):
                raise ValueError(f"config.json sets {flag}=true, which fastgpt does not support")
        if config.get("tie_word_embeddings") is False:
            raise ValueError("config.json sets tie_word_embeddings=false; fastgpt's GPT-2 ties lm_head to wte")
        if config.get("scale_attn_weights") is False:
            raise ValueError("config.json sets scale_attn_weights=false, which fastgpt does not support")
        try:
            return cls(
                vocab_size=int(config["vocab_size"]),
                n_positions=int(config.get("n_positions", config.get("n_ctx", 1024))),
                n_embd=int(config["n_embd"]),
                n_layer=int(config["n_layer"]),
                n_head=int(config["n_head"]),
                layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
                bos_token_id=int(config.get("bos_token_id") if config.get("bos_token_id") is not None else 50256),
                eos_token_id=int(config.get("eos_token_id") if config.get("eos_token_id") is not None else 50256),
                # transformers' GPT2Config defaults, where a config.json leaves them out
                resid_pdrop=float(config.get("resid_pdrop", 0.1)),
                embd_pdrop=float(config.get("embd_pdrop", 0.1)),
                attn_pdrop=float(config.get("attn_pdrop", 0.1)),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """A config.json that transformers' GPT2LMHeadModel loads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
        }

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


# Published GPT-2 family shapes (Radford et al. 2019; distilgpt2 from Sanh et al. 2019).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
}
