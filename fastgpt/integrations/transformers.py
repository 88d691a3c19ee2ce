"""fastgpt's kernels inside a ``transformers`` GPT-2: ``patch_transformers(model)`` and its undo.

The patch rebinds, in place, the hot paths of a GPT2LMHeadModel or GPT2Model to the public ops of
``kernels`` (which pick Triton or PyTorch by device, as everywhere in fastgpt); weights, parameter names,
the cache objects, ``generate``, PEFT adapters and gradient checkpointing stay transformers' own.

One block after the patch (HF's own code kept where nothing is gained by replacing it):
    h    = layer_norm(x)                                   ln_1
    a    = c_proj(attention(c_attn(h)))                    GPT2Attention.forward, HF's; the core below
    y, x = layer_norm(a, residual=x)                       ln_2 with the residual add fused, x <- x + a
    x    = gelu_mlp(y, W_fc^T, b_fc, W_proj^T, b_proj, residual=x)     x <- x + mlp(y)
and ln_f through layer_norm. HF's Conv1D stores weights (in, out); gelu_mlp takes nn.Linear's (out, in),
so it gets the transposed views, never copies.

How each piece is plugged in, and why that way (the facts are transformers 5.24's):
* Blocks, MLPs and LayerNorms have their ``__class__`` swapped for a subclass defined here that only
  overrides ``forward``. The parameters are untouched, so ``unpatch_transformers`` (swapping back) gives
  back the exact original outputs. GPT2Block derives from GradientCheckpointingLayer, whose
  ``__init_subclass__`` wraps the subclass's ``forward`` in the checkpointing logic too, so
  ``gradient_checkpointing_enable()`` still works (rebinding ``forward`` on the instance would bypass
  it). The subclasses keep HF's class names, which accelerate's no-split lists are written in.
* The attention core is registered as the attention implementation "fastgpt" (AttentionInterface) and
  the model's config is switched to it: HF's GPT2Attention.forward still runs c_attn as a module (a
  LoRA-wrapped c_attn keeps its adapter) and updates HF's own cache object, then calls the core with
  q/k/v (B, H, T, D) and the mask. The name is registered with the sdpa mask builder
  (AttentionMaskInterface) too: without that, transformers builds no mask for an unknown name and left
  padding would be silently ignored. That builder returns None exactly when the mask is plain causal
  (no padding: a prefill from position 0, or a one-token step), else a boolean (B, 1, Tq, Tk) mask.
  (transformers shares one config object between the models built from it: those switch attention
  core together; the core is right under an unpatched block too.)
* The core: no mask and Tq > 1 -> flash_attention (causal); no mask and Tq == 1 -> decode_attention
  over the cache's keys, every row full length; a mask (padding, packed sequences, a chunk after a
  cached prefix, a caller's 4-D mask) -> transformers' own SDPA attention with that mask, since
  flash_attention takes no mask: right, at HF's speed.
* Things the kernels cannot honour fall back to transformers' code with one warning (FallbackWarning):
  attention dropout while training (HF's SDPA with dropout), output_attentions=True (HF's eager
  attention, which returns the weights), adapters on c_fc / c_proj (HF's MLP forward, so they apply).
  MLP dropout while training is honoured (dropout on the MLP output, then the add). Refused with an
  error: cross-attention, head masks, reorder_and_upcast_attn, a non-tanh GELU.

torch.compile. A patched model compiles whole (``fullgraph=True``; transformers 5.24): the forward, a
prefill with HF's cache and a decode step over it have no graph break, the fastgpt ops being single
operators of the graph (kernels/library.py), and a training step compiles whole up to the loss: HF's
``labels=`` loss (``loss_function``) breaks the graph once in transformers' own code, so compute the
loss from the logits in the compiled function, or compile without fullgraph. Fallback warnings are not
raised under torch.compile (they would break the graph); the eager calls raise them.

``patch_transformers()`` with no model patches every GPT-2 built afterwards (from_pretrained included),
by hooking GPT2PreTrainedModel.post_init; ``unpatch_transformers()`` with no model removes the hook.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - the test extra installs it
    raise ImportError("fastgpt.patch_transformers needs transformers >= 5.24: pip install 'transformers>=5.24'") from e

from packaging.version import Version

MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(f"fastgpt.patch_transformers needs transformers >= {MIN_TRANSFORMERS} (the GPT-2 code it "
                      f"plugs into); found {transformers.__version__}")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface, PreTrainedModel  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2 as hf_gpt2  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils.output_capturing import _active_collector  # noqa: E402

import kernels  # noqa: E402

__all__ = ["patch_transformers", "unpatch_transformers", "is_patched", "FallbackWarning", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "fastgpt"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))


class FallbackWarning(UserWarning):
    """A patched model ran transformers' own code for something the kernels do not cover."""


_warned: set[str] = set()


def _warn_once(reason: str, message: str) -> None:
    # Under torch.compile a warning (and the set it updates) would break the graph: the fallback runs
    # all the same, silently; an eager call of the same model shows it.
    if torch.compiler.is_compiling():
        return
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastgpt.patch_transformers: {message}", FallbackWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ attention core
def _attentions_requested() -> bool:
    """output_attentions=True reaches no module as an argument in transformers 5: GPT2Model pops it and
    its output recorder collects the weights each attention returns. The recorder's context says so."""
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling):
    """HF's eager attention (it returns the weights), given the additive mask it expects. The sdpa mask
    builder's masks are boolean, and None for plain causal, which eager would read as "no mask"."""
    Tq, Tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        if Tq > 1 and Tk > Tq:  # None with more keys: a static cache's prefill; keys past Tq are empty
            key, value, Tk = key[:, :, :Tq], value[:, :, :Tq], Tq
        i = torch.arange(Tq, device=query.device)[:, None]
        j = torch.arange(Tk, device=query.device)[None, :]
        attention_mask = (j <= i + (Tk - Tq))[None, None]
    if attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return hf_gpt2.eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout)


def fastgpt_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention core under the implementation name "fastgpt" (AttentionInterface's signature).

    query: (B, H, Tq, D); key, value: (B, H, Tk, D), the cache already updated (HF's DynamicCache or any
    other); attention_mask: None (plain causal) or the sdpa mask builder's boolean (B, 1, Tq, Tk) (True
    = attend), or a caller's own 4-D mask. scaling: HF's, with scale_attn_weights and
    scale_attn_by_inverse_layer_idx folded in. Returns ((B, Tq, H, D), attention weights or None).
    """
    if kwargs.get("head_mask") is not None:
        raise ValueError("head_mask is not supported by a model patched with fastgpt.patch_transformers "
                         "(transformers 5's GPT-2 has no head masks either); call unpatch_transformers(model)")
    if kwargs.get("output_attentions") or _attentions_requested():
        _warn_once("output_attentions", "output_attentions=True runs transformers' eager attention (the "
                   "kernels never form the attention weights)")
        return _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling)
    if dropout > 0.0:
        _warn_once("attn_dropout", f"attention dropout (attn_pdrop={dropout}) while training runs transformers' "
                   "SDPA attention; set attn_pdrop=0 to train through the kernels")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:  # padding or a custom pattern: flash_attention takes no mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      **kwargs)
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    if Tq == 1:  # one new token per row, every cached position valid (no padding, or there'd be a mask)
        lengths = torch.full((B,), Tk, dtype=torch.int32, device=query.device)
        o = kernels.decode_attention(query, key, value, lengths, softmax_scale=scaling)
    else:
        if Tk > Tq:  # no mask and more keys than queries: a static cache's prefill from position 0, the
            key, value = key[:, :, :Tq], value[:, :, :Tq]  # keys past Tq not written yet (HF's SDPA slices too)
        o = kernels.flash_attention(query, key, value, causal=True, softmax_scale=scaling)  # (B, H, Tq, D)
    return o.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, fastgpt_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ---------------------------------------------------------------------------------- patched modules
def _layer_norm(ln: nn.LayerNorm, x, residual=None):
    return kernels.layer_norm(x, ln.weight, ln.bias, eps=ln.eps, residual=residual)


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward is kernels.layer_norm (the same parameters)."""

    def forward(self, x):
        return _layer_norm(self, x)


class FastGPT2MLP(hf_gpt2.GPT2MLP):
    """GPT2MLP through kernels.gelu_mlp, optionally with the residual add fused into its second GEMM."""

    def forward(self, hidden_states, residual=None):
        fc, proj = self.c_fc, self.c_proj
        if type(fc) is not Conv1D or type(proj) is not Conv1D:
            # wrapped (a PEFT adapter, a quantised layer): call them as modules, through HF's forward
            _warn_once("mlp_modules", f"mlp.c_fc / mlp.c_proj are {type(fc).__name__} / {type(proj).__name__}, "
                       "not Conv1D: the MLP runs transformers' own forward so that they apply")
            out = super().forward(hidden_states)
            return out if residual is None else residual + out
        # Conv1D weights are (in, out): .t() is the nn.Linear (out, in) view gelu_mlp takes, no copy
        if self.training and self.dropout.p > 0:  # the dropout sits between the MLP and the residual add
            out = self.dropout(kernels.gelu_mlp(hidden_states, fc.weight.t(), fc.bias, proj.weight.t(), proj.bias))
            return out if residual is None else residual + out
        return kernels.gelu_mlp(hidden_states, fc.weight.t(), fc.bias, proj.weight.t(), proj.bias, residual=residual)


class FastGPT2Block(hf_gpt2.GPT2Block):
    """GPT2Block with ln_1 / ln_2 / MLP through the kernels and both residual adds fused.

    The signature is GPT2Block.forward's: GPT2Model passes (hidden_states, cache, mask,
    encoder_hidden_states) positionally, as gradient checkpointing needs."""

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=False, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("cross-attention (encoder_hidden_states) is not supported by a model patched with "
                             "fastgpt.patch_transformers")
        a, _ = self.attn(self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, use_cache=use_cache,
                         **kwargs)
        y, hidden_states = _layer_norm(self.ln_2, a, residual=hidden_states)  # hidden_states <- hidden_states + a
        return self.mlp(y, residual=hidden_states)  # hidden_states + mlp(ln_2(hidden_states))


# HF's class names: accelerate's no-split lists (GPT2PreTrainedModel._no_split_modules) and HF's own
# reprs match modules by class name. is_patched() tells a patched model apart.
FastGPT2Block.__name__ = hf_gpt2.GPT2Block.__name__
FastGPT2MLP.__name__ = hf_gpt2.GPT2MLP.__name__
FastLayerNorm.__name__ = nn.LayerNorm.__name__
_FAST = {hf_gpt2.GPT2Block: FastGPT2Block, hf_gpt2.GPT2MLP: FastGPT2MLP, nn.LayerNorm: FastLayerNorm}
_HF = {fast: hf for hf, fast in _FAST.items()}


# ------------------------------------------------------------------------------------- patch / unpatch
def _gpt2_of(model) -> "hf_gpt2.GPT2Model":
    """The GPT2Model inside model (a GPT2LMHeadModel, a GPT2Model, or a PEFT model wrapping one)."""
    base = model
    if not isinstance(base, PreTrainedModel) and hasattr(base, "get_base_model"):  # peft.PeftModel
        base = base.get_base_model()
    if isinstance(base, hf_gpt2.GPT2LMHeadModel):
        return base.transformer
    if isinstance(base, hf_gpt2.GPT2Model):
        return base
    raise TypeError(f"fastgpt.patch_transformers takes a transformers GPT2LMHeadModel or GPT2Model (or a PEFT "
                    f"model wrapping one), got {type(model).__name__}")


def _check_supported(gpt2) -> None:
    """Refuse what the patched forward would not compute exactly as transformers does."""
    config = gpt2.config
    act = config.activation_function
    if act not in TANH_GELUS:
        raise ValueError(f"activation_function={act!r} is not supported: fastgpt's MLP kernel is GPT-2's tanh GELU "
                         f"({' / '.join(TANH_GELUS)})")
    if config.add_cross_attention:
        raise ValueError("add_cross_attention=True is not supported: fastgpt patches GPT-2's self-attention only")
    if config.reorder_and_upcast_attn:
        raise ValueError("reorder_and_upcast_attn=True is not supported: the kernels keep their own fp32 "
                         "accumulation, not transformers' upcast-and-reorder scheme")
    modules = [("ln_f", gpt2.ln_f, nn.LayerNorm)]
    for i, block in enumerate(gpt2.h):
        modules += [(f"h.{i}", block, hf_gpt2.GPT2Block), (f"h.{i}.ln_1", block.ln_1, nn.LayerNorm),
                    (f"h.{i}.ln_2", block.ln_2, nn.LayerNorm), (f"h.{i}.mlp", block.mlp, hf_gpt2.GPT2MLP)]
    for name, module, expected in modules:
        if type(module) is not expected:  # a subclass or a stand-in would lose its own forward
            raise TypeError(f"{name} is a {type(module).__name__}, not {expected.__name__}: it cannot be patched")
        if expected is nn.LayerNorm and (module.weight is None or module.bias is None):
            raise TypeError(f"{name} has no weight or no bias (an affine LayerNorm with a bias is required)")


def _modules_to_swap(gpt2):
    for block in gpt2.h:
        yield from (block, block.ln_1, block.mlp)
    yield gpt2.ln_f


def is_patched(model) -> bool:
    """True while model (a GPT2LMHeadModel, GPT2Model or PEFT model) is patched."""
    return hasattr(_gpt2_of(model), "_fastgpt_unpatched_attn")


def patch_transformers(model=None):
    """Run a transformers GPT-2 through fastgpt's kernels, in place; returns model.

    model: a GPT2LMHeadModel or GPT2Model (or a PEFT model wrapping one), on any device and dtype the
    kernels take; patching twice is a no-op. With no model: every GPT2LMHeadModel / GPT2Model built
    from now on (``from_pretrained`` included) is patched as it is built, until
    ``unpatch_transformers()``. See the module docstring for what is rebound and what falls back.
    """
    if model is None:
        _patch_classes()
        return None
    gpt2 = _gpt2_of(model)
    if is_patched(gpt2):
        return model
    _check_supported(gpt2)
    for module in _modules_to_swap(gpt2):
        module.__class__ = _FAST[type(module)]
    gpt2._fastgpt_unpatched_attn = gpt2.config._attn_implementation  # what unpatch puts back
    gpt2.config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def unpatch_transformers(model=None):
    """Undo ``patch_transformers``: the model's own classes and attention implementation come back, and
    with them its exact original outputs. With no model: stop patching the GPT-2s built from now on."""
    if model is None:
        _unpatch_classes()
        return None
    gpt2 = _gpt2_of(model)
    if not is_patched(gpt2):
        return model
    for module in _modules_to_swap(gpt2):
        module.__class__ = _HF.get(type(module), type(module))
    gpt2.config._attn_implementation = gpt2._fastgpt_unpatched_attn
    del gpt2._fastgpt_unpatched_attn
    return model


# ----------------------------------------------------------------------------------- class-level form
_hf_post_init = hf_gpt2.GPT2PreTrainedModel.post_init


def _post_init_and_patch(self):
    _hf_post_init(self)
    if isinstance(self, (hf_gpt2.GPT2LMHeadModel, hf_gpt2.GPT2Model)):
        try:
            patch_transformers(self)
        except (TypeError, ValueError) as e:  # a GPT-2 the kernels cannot run is still built, as HF's
            _warn_once(f"class:{e}", f"left {type(self).__name__} unpatched: {e}")


def _patch_classes() -> None:
    hf_gpt2.GPT2PreTrainedModel.post_init = _post_init_and_patch


def _unpatch_classes() -> None:
    if hf_gpt2.GPT2PreTrainedModel.__dict__.get("post_init") is _post_init_and_patch:
        del hf_gpt2.GPT2PreTrainedModel.post_init
