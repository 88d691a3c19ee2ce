"""The ``fastgpt`` command line: ``generate`` (and ``train`` / ``bench``, from their own modules).

A mistake by the user (bad argument, missing model, bad data) prints one line to stderr and exits with
status 2; no traceback.

``bench`` lives in benchmarks/cli.py, beside the suites it runs: benchmarks depends on fastgpt, never the
reverse. This file names it by string only and imports it when ``fastgpt bench`` is run; nothing in
fastgpt imports benchmarks (tests/test_bench.py checks), and without the benchmarks package (it ships in
fastgpt's source tree and wheel) ``fastgpt bench`` says so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import time

# subcommand -> module exposing add_arguments(parser) and run(args) -> int (imported only when used)
SUBCOMMANDS = {
    "generate": ("fastgpt.cli", "generate text from a prompt, streaming it as it comes"),
    "bench": ("benchmarks.cli", "time the fused kernels and generation against their peers"),
    "train": ("fastgpt.train", "pretrain or fine-tune a model on text files, JSONL pairs or the stdlib corpus"),
}

USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"fastgpt: error: {message}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_device(name: str | None):
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: fastgpt runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ------------------------------------------------------------------------------------------- generate
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF GPT-2 checkpoint dir or hub name (default: the bundled model)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (same seed, same text)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size: shard the model by heads across this many processes, started "
                        "with torchrun --nproc-per-node N (rank 0 prints)")


def run(args) -> int:
    import torch

    from fastgpt import GPT, Tokenizer, default_model_dir
    from fastgpt.generate import validate_sampling
    from fastgpt.load import resolve_model_dir

    validate_sampling(args.temperature, args.top_k, args.top_p)
    from fastgpt import parallel

    world = parallel.World.from_env()
    if args.tp > 1 or world.size > 1:
        world, device = parallel.launch_tensor_parallel(args.tp, args.device)
    else:
        device = resolve_device(args.device)
    if args.model is None:
        model_dir = default_model_dir()
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"no --model given and the bundled model is missing ({model_dir})")
    else:
        model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    if args.tp > 1:
        model = parallel.load_tensor_parallel(model_dir, device=device, dtype=args.dtype)
    else:
        model = GPT.from_pretrained(model_dir, device=device, dtype=args.dtype)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    input_ids = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    max_new = min(args.max_new_tokens, model.config.n_positions - len(ids))
    if max_new < 1:
        raise ValueError(f"prompt of {len(ids)} tokens fills the context length {model.config.n_positions}")

    out = sys.stdout if world.is_main else io.StringIO()  # every rank generates the same text; rank 0 prints
    out.write(args.prompt)
    out.flush()
    new_ids: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    t_first = None
    for tokens in model.stream(input_ids, max_new, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, generator=generator):
        if t_first is None:
            t_first = time.perf_counter()
        tok = int(tokens[0])
        if tok == tokenizer.eos_token_id:
            break
        new_ids.append(tok)
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    text = tokenizer.decode(new_ids)
    out.write(text[len(printed):] + "\n")
    out.flush()
    t_end = time.perf_counter()
    n = len(new_ids)
    decode_s = t_end - (t_first or t_end)
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    tp = f" x {args.tp} ranks (tensor parallel)" if args.tp > 1 else ""
    if world.is_main:
        print(f"[{n} tokens in {t_end - t0:.2f} s; prefill {len(ids)} tokens {1e3 * ((t_first or t_end) - t0):.0f} ms; "
              f"decode {rate:.1f} tokens/s; {device}{tp}, {model.dtype}]".replace("torch.", ""), file=sys.stderr)
    parallel.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser. Only the named subcommand's module is imported, for its options: the others' imports
    and possible breakage stay out of its way (and `fastgpt --help` needs none of them)."""
    parser = _Parser(prog="fastgpt", description="GPT-2-family engine with fused Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            _subcommand(name, module).add_arguments(p)
        p.set_defaults(_module=module, _command=name)
    return parser


def _subcommand(name: str, module: str):
    """The subcommand's module; a missing package (benchmarks outside a full install) is one line."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != package or package == "fastgpt":
            raise
        raise SystemExit(_fail(f"`fastgpt {name}` needs the {package} package, which ships with fastgpt's source "
                               f"tree and wheel, and cannot be imported here ({e})")) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(_subcommand(args._command, args._module).run(args) or 0)
    except USER_ERRORS as e:
        return _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
