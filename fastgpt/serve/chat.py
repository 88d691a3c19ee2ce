"""Chat templates: messages -> one prompt string, through a sandboxed Jinja2 environment.

A template comes from --chat-template FILE, else from the model dir (``chat_template.jinja``, or the
``chat_template`` entry of tokenizer_config.json, a string or a list of named templates of which
"default" is taken). Without one, chat completions answer 400. Templates are rendered the way the
Hugging Face ecosystem writes them: trim_blocks and lstrip_blocks on, the loop-controls extension,
``raise_exception(msg)`` and ``strftime_now(fmt)`` available, and the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. The environment is Jinja2's immutable
sandbox: a template cannot reach Python internals or change the values it is given.
"""

from __future__ import annotations

import datetime
import json
import os

from fastgpt.serve.errors import APIError


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "template"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: not a valid Jinja2 chat template (line {e.lineno}: {e.message})") from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt; a template that fails on these messages (raise_exception, a sandbox violation, an
        undefined name) is the request's fault: 400 with the template's own message."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:  # SecurityError and UndefinedError are TemplateErrors
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise APIError(400, f"the chat template could not render these messages: {type(e).__name__}: {e}",
                           param="messages") from None


def _special_token(value) -> str:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} as transformers saves AddedTokens
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def load_chat_template(model_dir: str, path: str | None = None) -> ChatTemplate | None:
    """The template the server renders chats with (see the module docstring), or None."""
    config = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path}: unreadable ({e})") from None
    tokens = dict(bos_token=_special_token(config.get("bos_token")), eos_token=_special_token(config.get("eos_token")))
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--chat-template {path}: no such file")
        with open(path, encoding="utf-8") as f:
            return ChatTemplate(f.read(), **tokens, origin=path)
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return ChatTemplate(f.read(), **tokens, origin=jinja_file)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str) and source:
        return ChatTemplate(source, **tokens, origin=f"{config_path} chat_template")
    return None
