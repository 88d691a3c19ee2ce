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
    "generate": ("fastgpt.cli", "generate text from one or more prompts, streaming it as it comes"),
    "serve": ("fastgpt.serve.cli", "serve the OpenAI API (completions, chat) over HTTP on the engine"),
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
    p.add_argument("--prompt", action="append", default=None,
                   help='text to continue; repeat it for several prompts, run together ("" starts from '
                        "<|endoftext|>)")
    p.add_argument("--prompts-file", metavar="FILE", default=None,
                   help="a UTF-8 file of prompts, one per line (blank lines are skipped)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (same seed, same text)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's step (the packed forward of every batch: one graph, the "
                        "fused ops as single operators in it); the first steps pay the compilation")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size: shard the model by heads across this many processes, started "
                        "with torchrun --nproc-per-node N (rank 0 prints)")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line for line in f.read().splitlines() if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: not found") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: not UTF-8 text ({e.reason})") from None
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


class _Printer:
    """Writes the results in input order, streaming the earliest unfinished one as it grows. On a terminal
    the prompt is shown in colour (and several results are separated by a rule); piped, plain text."""

    PROMPT, DIM, RESET = "\033[36m", "\033[2m", "\033[0m"

    def __init__(self, out, prompts: list[str]):
        self.out, self.prompts = out, prompts
        self.styled = out.isatty() and not os.environ.get("NO_COLOR")
        self.texts: dict[int, str] = {}
        self.done: set[int] = set()
        self.cursor, self.printed = 0, None  # the result being written, and how much of its text is out

    def update(self, index: int, text: str, finished: bool) -> None:
        self.texts[index] = text
        if finished:
            self.done.add(index)
        while self.cursor < len(self.prompts):
            i = self.cursor
            if self.printed is None:  # start result i
                if i > 0:
                    rule = f"{self.DIM}── {i + 1}/{len(self.prompts)} ──{self.RESET}\n" if self.styled else ""
                    self.out.write("\n" + rule)
                prompt = self.prompts[i]
                self.out.write(f"{self.PROMPT}{prompt}{self.RESET}" if self.styled and prompt else prompt)
                self.printed = ""
            text = self.texts.get(i, "")
            self.out.write(text[len(self.printed):])
            self.printed = text
            if i not in self.done:
                break
            self.out.write("\n")
            self.cursor, self.printed = i + 1, None
        self.out.flush()


def _model_dir(args) -> str:
    from fastgpt import default_model_dir
    from fastgpt.load import resolve_model_dir

    if args.model is None:
        model_dir = default_model_dir()
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"no --model given and the bundled model is missing ({model_dir})")
        return model_dir
    return resolve_model_dir(args.model)


def _prompt_ids(tokenizer, config, prompt: str, max_new_tokens: int, which: str) -> tuple[list[int], int]:
    """(token ids, new tokens that fit): an empty prompt starts from <|endoftext|>, as transformers does."""
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.bos_token_id
    ids = tokenizer.encode(prompt) or [start]
    max_new = min(max_new_tokens, config.n_positions - len(ids))
    if max_new < 1:
        raise ValueError(f"{which} of {len(ids)} tokens fills the context length {config.n_positions}")
    return ids, max_new


def run(args) -> int:
    from fastgpt import GPT, Engine, SamplingParams, Tokenizer, parallel
    from fastgpt.engine.engine import default_num_blocks
    from fastgpt.generate import validate_sampling

    prompts = read_prompts(args)
    validate_sampling(args.temperature, args.top_k, args.top_p)
    world = parallel.World.from_env()
    model_dir = _model_dir(args)
    tensor_parallel = args.tp > 1 or world.size > 1
    if tensor_parallel and args.compile:
        raise ValueError("--compile compiles the engine's step, which runs on one device: drop it with --tp")
    if tensor_parallel:  # one shard per process; every rank runs what follows alike, rank 0 prints
        world, device = parallel.launch_tensor_parallel(args.tp, args.device)
    else:
        device = resolve_device(args.device)
    try:
        tokenizer = Tokenizer.from_pretrained(model_dir)
        if tensor_parallel:
            model = parallel.load_tensor_parallel(model_dir, device=device, dtype=args.dtype)
        else:
            model = GPT.from_pretrained(model_dir, device=device, dtype=args.dtype)
        requests = []
        for i, prompt in enumerate(prompts):
            ids, max_new = _prompt_ids(tokenizer, model.config, prompt, args.max_new_tokens,
                                       "prompt" if len(prompts) == 1 else f"prompt {i + 1}")
            params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p or 1.0,
                                    max_tokens=max_new, seed=args.seed)
            requests.append((ids, params))
        block_size = 16
        needed = sum(-(-(len(ids) + p.max_tokens) // block_size) for ids, p in requests)
        max_seqs = min(len(requests), 256)
        engine = Engine(model, tokenizer, block_size=block_size, max_num_seqs=max_seqs,
                        num_blocks=min(needed, default_num_blocks(model, block_size, max_seqs)), compile=args.compile)
        for i, (ids, params) in enumerate(requests):
            engine.add_request(str(i), ids, params)

        printer = _Printer(sys.stdout if world.is_main else io.StringIO(), prompts)
        t0 = time.perf_counter()
        t_first = None
        n_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if t_first is None:
                    t_first = time.perf_counter()
                completion = out.outputs[0]
                printer.update(int(out.request_id), completion.text, out.finished)
                if out.finished:
                    n_tokens += sum(1 for t in completion.token_ids if t != tokenizer.eos_token_id)
        t_end = time.perf_counter()
    finally:
        if tensor_parallel:
            parallel.destroy_process_group()
    where = f"{device}{f' x {world.size} ranks (tensor parallel)' if tensor_parallel else ''}, {model.dtype}"
    where = where.replace("torch.", "")
    if not world.is_main:
        return 0
    if len(prompts) == 1:
        decode_s = t_end - (t_first or t_end)
        rate = (n_tokens - 1) / decode_s if n_tokens > 1 and decode_s > 0 else float("nan")
        print(f"[{n_tokens} tokens in {t_end - t0:.2f} s; prefill {len(requests[0][0])} tokens "
              f"{1e3 * ((t_first or t_end) - t0):.0f} ms; decode {rate:.1f} tokens/s; {where}]", file=sys.stderr)
    else:
        rate = n_tokens / (t_end - t0) if t_end > t0 else float("nan")
        print(f"[{len(prompts)} prompts, {n_tokens} tokens in {t_end - t0:.2f} s; {rate:.1f} output tokens/s; "
              f"{where}]", file=sys.stderr)
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
