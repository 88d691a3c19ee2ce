"""The request bodies of the OpenAI API that fastgpt serves, as pydantic models, and their limits.

Strict types: a string where a number belongs is a 400, not a number parsed out of it, and a bool is not
an int. Fields fastgpt does not implement are accepted at their neutral values (a client library may
send them) and refused otherwise, so a request never silently means something it did not ask for;
unknown fields are ignored, as vLLM does. The ranges are OpenAI's (temperature 0-2, logprobs 0-5,
top_logprobs 0-20, up to 4 stop strings); n is also capped by the engine's --max-num-seqs.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 128
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
INT64 = dict(ge=-(1 << 63), le=(1 << 63) - 1)

TokenIds = Annotated[list[int], Field(min_length=1)]
# what a field that is a union should hold, for the error message (pydantic's lists every member)
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat share."""

    model: Optional[str] = None  # a name to match (None: the served model), never a path
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, Annotated[list[str], Field(max_length=MAX_STOP)], None] = None
    seed: Optional[int] = Field(None, **INT64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted, not used
    # vLLM's extensions: -1 or 0 keep every token
    top_k: Optional[int] = Field(None, ge=-1)
    ignore_eos: bool = False
    # OpenAI fields fastgpt does not implement: only their neutral values pass
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    @model_validator(mode="after")
    def _neutral_only(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise UnsupportedField(name, f"{name} is not supported by fastgpt (only 0)")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported by fastgpt")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise UnsupportedField("stop", "stop strings must not be empty")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default; None: what the context has left
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "best_of is not supported by fastgpt (only best_of == n)")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported by fastgpt")
        if self.prompt == "" or (isinstance(self.prompt, list) and any(p == "" for p in self.prompt)):
            raise UnsupportedField("prompt", "prompt is empty")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = Field(None, ge=1)  # None: what the context has left
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name; wins when given
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extension
    tools: Optional[list] = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported by fastgpt")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class UnsupportedField(ValueError):
    """Raised inside a validator: a value pydantic accepts by type that fastgpt cannot honour; carries
    the field's name so the 400 can name it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
