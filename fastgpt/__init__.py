"""fastgpt: GPT-2-family inference and training whose hot paths are fused Triton kernels."""

from fastgpt.config import GPTConfig
from fastgpt.engine import CompletionOutput, Engine, RequestOutput, SamplingParams
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "Tokenizer", "Engine", "SamplingParams", "RequestOutput", "CompletionOutput",
           "default_model_dir"]
__version__ = "0.1.0"


def default_model_dir() -> str:
    """The bundled model trained by fastgpt itself (package data; see README)."""
    import os

    return os.path.join(os.path.dirname(__file__), "default_model")
