"""The GPT-2 module: learned positions, pre-LN blocks, tanh GELU, tied embeddings.

Every fused computation goes through the public ops of ``kernels`` (which pick Triton or PyTorch by
device); the model itself never names a backend. Parameter names follow Hugging Face's GPT-2 so that
checkpoints map one to one (``fastgpt.load`` transposes HF's Conv1D weights into nn.Linear layout).

One block, with the residual adds fused into the ops that follow them:
    h    = layer_norm(x)                                  ln_1
    a    = dropout(c_proj(attention(c_attn(h))))
    y, x = layer_norm(a, residual=x)                      ln_2, x <- x + a
    x    = gelu_mlp(y, ..., residual=x, dropout_p)        x <- x + dropout(mlp(y))

Dropout is GPT-2's resid_pdrop on both residual branches (before their add, so the adds stay fused) and
embd_pdrop on the embeddings; it acts in training mode only (``model.eval()`` turns it off) and is 0 by
default. Attention dropout (attn_pdrop) is not supported: a checkpoint's value is kept in the config and
a warning says so when such a model is put in training mode.

Training: ``model(input_ids, targets=targets)`` returns the next-token loss through
``kernels.linear_cross_entropy`` (the (B, T, V) logits are never materialised on the fused path).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from fastgpt.cache import KVCache, PagedBatch
from fastgpt.config import GPTConfig


# weights that decode on CPU streams faster from (in, out) storage: see GPT.use_cpu_decode_layout
CPU_INPUT_MAJOR = ("transformer.wte.weight", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm's parameters, with the forward (and the optional fused residual add) from kernels."""

    def forward(self, x, residual=None):
        return kernels.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)


class Linear(nn.Linear):
    """nn.Linear's parameters, with the forward from kernels (on CPU, a decode step's product is split
    across the threads)."""

    def forward(self, x):
        return kernels.linear(x, self.weight, self.bias)


class TiedEmbedding(nn.Embedding):
    """The token embedding, whose table is also the output layer (GPT-2 ties them)."""

    def logits(self, x):
        return kernels.linear(x, self.weight)  # (..., V)

    def loss(self, x, targets, reduction: str = "mean"):
        """Cross-entropy of logits(x) against targets (-100: no loss there), without the logits: the fused
        linear cross-entropy. A head that makes its logits its own way (a subclass overriding logits, such
        as the vocab-parallel one) gets its loss from them instead."""
        if type(self).logits is not TiedEmbedding.logits:
            logits = self.logits(x)
            return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction=reduction)
        return kernels.linear_cross_entropy(x, self.weight, targets, reduction=reduction)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.kv_cache: KVCache | None = None
        self.kv_pages: tuple[torch.Tensor, torch.Tensor] | None = None  # the engine's paged cache (k, v)

    def forward(self, x, input_pos=None, cache_seqlens=None, paged: PagedBatch | None = None):
        if paged is not None:
            return self._forward_paged(x, paged)
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        # strided views, no copy: the kernels take any strides
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, T, hs) each
        if input_pos is None:  # whole sequence, no cache (training, scoring)
            o = kernels.flash_attention(q, k, v, causal=True)
        elif T > 1 or cache_seqlens is None:  # prefill from position 0: the new tokens are all there is
            self.kv_cache.update(input_pos, k, v)
            o = kernels.flash_attention(q, k, v, causal=True)
        else:  # decode: one query per row against the cache
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            o = kernels.decode_attention(q, k_all, v_all, cache_seqlens)
        # nh * hs, not C: under tensor parallelism a rank holds only its own heads (fastgpt.parallel)
        return self.resid_dropout(self.c_proj(o.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))

    def _forward_paged(self, x, paged: PagedBatch):
        """x (N, C): the packed tokens of the engine's batch (see GPT.forward_packed)."""
        N = x.shape[0]
        q, k, v = self.c_attn(x).view(N, 3, self.n_head, self.head_dim).unbind(1)  # (N, nh, hs) each
        k_pages, v_pages = self.kv_pages
        kernels.paged_kv_write(k, v, k_pages, v_pages, paged.slot_mapping)
        nd = paged.num_decodes  # decode rows first: one query each, through the split-KV decode kernel
        parts = []
        if nd:
            o = kernels.paged_decode_attention(q[:nd, :, None], k_pages, v_pages, paged.block_table[:nd],
                                               paged.cache_seqlens[:nd])  # (nd, nh, 1, hs)
            parts.append(o[:, :, 0])
        if nd < N:  # prompt chunks: varlen causal attention over each row's cache
            parts.append(kernels.paged_prefill_attention(q[nd:], k_pages, v_pages, paged.block_table[nd:],
                                                         paged.cu_seqlens_q, paged.cache_seqlens[nd:]))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.c_proj(o.reshape(N, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x, residual=None):
        # the dropout sits inside the op, on the branch before the fused residual add
        return kernels.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                                residual=residual, dropout_p=self.resid_pdrop if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None, cache_seqlens=None, paged=None):
        a = self.attn(self.ln_1(x), input_pos, cache_seqlens, paged)
        y, x = self.ln_2(a, residual=x)
        return self.mlp(y, residual=x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=TiedEmbedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
            # variance does not grow with depth
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def set_dropout(self, resid_pdrop: float, embd_pdrop: float) -> "GPT":
        """Set the training dropout in place (config and modules, so a saved checkpoint records it). The
        config's attn_pdrop is cleared: the model trains without attention dropout, and says so."""
        self.config = self.config.replace(resid_pdrop=float(resid_pdrop), embd_pdrop=float(embd_pdrop),
                                          attn_pdrop=0.0)
        self.transformer.drop.p = self.config.embd_pdrop
        for block in self.transformer.h:
            block.attn.resid_dropout.p = self.config.resid_pdrop
            block.mlp.resid_pdrop = self.config.resid_pdrop
        return self

    def train(self, mode: bool = True) -> "GPT":
        if mode and self.config.attn_pdrop > 0 and not getattr(self, "_warned_attn_pdrop", False):
            warnings.warn(f"attn_pdrop={self.config.attn_pdrop} is not applied: fastgpt has no attention "
                          "dropout (resid_pdrop and embd_pdrop are)", stacklevel=2)
            self._warned_attn_pdrop = True
        return super().train(mode)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # wte counted once: the head is tied

    # ------------------------------------------------------------------------------------------ cache
    def setup_caches(self, max_batch: int, max_len: int) -> None:
        """Allocate the static KV caches (reused while they are large enough and of the right dtype)."""
        if max_len > self.config.n_positions:
            raise ValueError(f"max_len={max_len} exceeds the context length {self.config.n_positions}")
        cache = self.transformer.h[0].attn.kv_cache
        if (cache is not None and cache.max_batch >= max_batch and cache.max_len >= max_len
                and cache.k_cache.dtype == self.dtype and cache.k_cache.device == self.device):
            return
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch, block.attn.n_head, max_len, self.config.head_dim,
                                          dtype=self.dtype, device=self.device)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def use_cpu_decode_layout(self) -> "GPT":
        """Store the weights that decode streams on CPU in (in, out) order, as transposed views.

        MKL's one-row product reads these faster that way than in nn.Linear's (out, in) order (torch
        2.13, 1 thread: the tied head 12.9 -> 22.5 GB/s, a gpt2 decode step 43 -> 33 ms); mlp.c_proj
        (768 x 3072) reads faster as it is, on one thread and in batches. On more threads each weight is
        read in contiguous blocks, one per thread, which either order allows (kernels.reference.linear:
        split over the input features of an (in, out) weight, over the output rows of an (out, in) one).
        Values and shapes are unchanged. The Triton launchers want (out, in) rows, so this is for CPU
        models only (``from_pretrained`` on CPU).
        """
        for name, p in self.named_parameters():
            if name.endswith(CPU_INPUT_MAJOR) and p.is_contiguous():
                p.data = p.data.t().contiguous().t()
        return self

    def prepack_cpu_weights(self) -> int:
        """Give each projection weight (attention in and out, the MLP's two, the tied head) a oneDNN-packed
        copy for the products of two rows and more on a CPU, decode batches and prefill (see
        kernels.prepack_linear_weight; gpt2 at 32 rows: its projections 1.4-2.0x, the head 2.0x). One row keeps
        the split products of use_cpu_decode_layout. It costs one more copy of those weights (0.5 GB for
        gpt2 in fp32), kept as long as the model; a copy stops being used once its weight changes
        (training). Does nothing on CUDA or in other dtypes. Returns how many weights were packed."""
        projections = CPU_INPUT_MAJOR + ("mlp.c_proj.weight",)  # every weight a linear product reads
        return sum(kernels.prepack_linear_weight(p) for name, p in self.named_parameters()
                   if name.endswith(projections))

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache_seqlens: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T); (B, 1, V) with last_only.

        Without input_pos the whole sequence is processed from position 0 with no cache. With input_pos
        (T,) the tokens sit at those positions and their keys/values go into the caches set up by
        ``setup_caches``: without cache_seqlens it is the prefill of the prompts, input_pos = arange(T)
        (checked eagerly; the prefill attends within its own tokens, so no step depends on a value read
        back from the device and the call traces whole under torch.compile); a single-token decode step
        (T == 1) after it gives cache_seqlens, int32 (B,). Prompts that continue a cache take the engine.

        With targets (B, T), int64 (-100 = no loss there), the cross-entropy of the tied head's logits
        against them instead, without materialising the logits: a 0-dim fp32 loss, the mean over the
        counted targets (reduction="mean") or their sum ("sum").
        """
        if targets is not None and (input_pos is not None or last_only):
            raise ValueError("targets score the whole sequence: drop input_pos / last_only")
        B, T = input_ids.shape
        if input_pos is None:
            if T > self.config.n_positions:
                raise ValueError(f"sequence length {T} exceeds the context length {self.config.n_positions}")
            pos = torch.arange(T, device=input_ids.device)
        else:
            if self.transformer.h[0].attn.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches(max_batch, max_len) first")
            # a prefill must start at position 0 (see above); the check reads the device, which a traced
            # call cannot do, so torch.compile leaves it to the eager calls
            if cache_seqlens is None and not torch.compiler.is_compiling() and int(input_pos[0]) != 0:
                raise ValueError(f"a prefill (input_pos without cache_seqlens) starts at position 0, got "
                                 f"{int(input_pos[0])}; continue a cached prompt one token at a time or "
                                 f"through the engine")
            pos = input_pos
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, input_pos, cache_seqlens)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is not None:  # tied head + loss, chunked over the tokens
            return self.transformer.wte.loss(x, targets, reduction=reduction)
        return self.transformer.wte.logits(x)  # tied head, (B, T, V)

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, paged: PagedBatch,
                       logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's forward: one packed ragged batch, no padding. input_ids, positions (N,); keys and
        values go into each layer's kv_pages as ``paged`` says. Returns logits (R, V) of the tokens
        logits_rows (R,), or of every token when None."""
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (N, C)
        for block in self.transformer.h:
            x = block(x, paged=paged)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.transformer.wte.logits(self.transformer.ln_f(x))  # (R, V)

    # ------------------------------------------------------------------------------------- generation
    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See ``fastgpt.generate.generate``."""
        from fastgpt.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens: int, **kwargs):
        """See ``fastgpt.generate.stream``."""
        from fastgpt.generate import stream

        return stream(self, input_ids, max_new_tokens, **kwargs)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, cpu_decode_layout: bool = True) -> "GPT":
        """Load a Hugging Face GPT-2 checkpoint (local dir or hub name); see ``fastgpt.load``.

        On CPU the weights take ``use_cpu_decode_layout`` unless cpu_decode_layout=False (training
        wants the layout a fresh model has, so a resumed run computes exactly as an uninterrupted one)."""
        from fastgpt.load import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, cpu_decode_layout=cpu_decode_layout)

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write an HF GPT-2 dir (config.json + model.safetensors [+ tokenizer]) atomically."""
        from fastgpt.load import save_pretrained

        save_pretrained(self, path, tokenizer=tokenizer)
