"""fastgpt: GPT-2-family inference and training whose hot paths are fused Triton kernels."""

from fastgpt.config import GPTConfig
from fastgpt.engine import CompletionOutput, Engine, RequestOutput, SamplingParams
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "Tokenizer", "Engine", "SamplingParams", "RequestOutput", "CompletionOutput",
           "default_model_dir", "patch_transformers", "unpatch_transformers"]
__version__ = "0.1.0"

# The drop-in for transformers' GPT-2 (fastgpt.integrations.transformers), loaded on first use so that
# importing fastgpt never imports transformers.
_LAZY = {"patch_transformers", "unpatch_transformers"}


def __getattr__(name: str):
    if name in _LAZY:
        from fastgpt.integrations import transformers as integration

        return getattr(integration, name)
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")


def default_model_dir() -> str:
    """The bundled model trained by fastgpt itself (package data; see README)."""
    import os

    return os.path.join(os.path.dirname(__file__), "default_model")
