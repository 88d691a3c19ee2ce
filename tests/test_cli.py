"""The command line: ``fastgpt generate`` on a tiny checkpoint, and one-line errors for user mistakes.

Most cases call ``fastgpt.cli.main([...])`` in-process (fast); two run ``python -m fastgpt`` for real.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt import GPT, Tokenizer
from fastgpt.cli import main
from helpers import make_hf_checkpoint, train_tiny_tokenizer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture)

PROMPT = "The quick fox"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-2 with a trained tokenizer, all in one HF-style dir."""
    path, _ = make_hf_checkpoint(tmp_path_factory.mktemp("cli_model"), seed=8, tokenizer=train_tiny_tokenizer())
    return path


def run_main(capsys, argv):
    """(exit code, stdout, stderr) of main(argv); argparse's errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(capsys, *args):
    return run_main(capsys, ["generate", *args])


def _gen_args(model_dir, *extra):
    return ("--model", str(model_dir), "--prompt", PROMPT, "--device", "cpu", "--max-new-tokens", "20", *extra)


# ------------------------------------------------------------------------------------------ generation
def test_generate_prints_text_and_a_speed_line(reference_path, capsys, model_dir):
    code, out, err = run_cli(capsys, *_gen_args(model_dir, "--seed", "1"))
    assert code == 0, err
    assert out.startswith(PROMPT) and out.endswith("\n") and len(out) > len(PROMPT) + 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "tokens/s" in lines[0] and "cpu" in lines[0]


def test_greedy_output_is_the_models_greedy_continuation(reference_path, capsys, model_dir):
    code, out, err = run_cli(capsys, *_gen_args(model_dir, "--temperature", "0"))
    assert code == 0, err
    tok, model = Tokenizer.from_pretrained(model_dir), GPT.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode(PROMPT)])
    new = model.generate(ids, 20, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:  # the CLI stops printing at EOS
        new = new[:new.index(tok.eos_token_id)]
    assert out == PROMPT + tok.decode(new) + "\n"


def test_seed_makes_sampling_reproducible(reference_path, capsys, model_dir):
    first = run_cli(capsys, *_gen_args(model_dir, "--seed", "3", "--temperature", "1.0"))
    again = run_cli(capsys, *_gen_args(model_dir, "--seed", "3", "--temperature", "1.0"))
    other = run_cli(capsys, *_gen_args(model_dir, "--seed", "4", "--temperature", "1.0"))
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1]
    assert first[1] != other[1]  # 20 draws at temperature 1 from a random model: a tie is (almost) impossible


# --------------------------------------------------------------------------------------------- errors
def _assert_one_line_error(code, out, err, *fragments):
    assert code not in (0, None), f"exit code {code}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("fastgpt: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("extra, fragments", [
    (("--max-new-tokens", "-3"), ("--max-new-tokens", "must be >= 1, got -3")),
    (("--max-new-tokens", "many"), ("--max-new-tokens",)),
    (("--top-p", "2"), ("top_p must be in (0, 1], got 2.0",)),
    (("--top-k", "0"), ("--top-k",)),
    (("--temperature", "-1"), ("temperature must be >= 0",)),
    (("--dtype", "float8"), ("--dtype", "float8")),
    (("--no-such-flag",), ("--no-such-flag",)),
])
def test_bad_arguments(reference_path, capsys, model_dir, extra, fragments):
    _assert_one_line_error(*run_cli(capsys, *_gen_args(model_dir, *extra)), *fragments)


def test_missing_model_dir(reference_path, capsys, tmp_path):
    missing = tmp_path / "no_model_here"
    code, out, err = run_cli(capsys, "--model", str(missing), "--prompt", "hi", "--device", "cpu")
    _assert_one_line_error(code, out, err, str(missing), "not found")


def test_corrupt_checkpoint_names_the_file(reference_path, capsys, model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(os.urandom(100))
    code, out, err = run_cli(capsys, "--model", str(broken), "--prompt", "hi", "--device", "cpu")
    _assert_one_line_error(code, out, err, str(broken / "model.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(reference_path, capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--prompt", "hi", "--device", "cuda")
    _assert_one_line_error(code, out, err, "CUDA is not available")


@pytest.mark.parametrize("device, message", [("foo", "not a device"), ("mps", "runs on cpu or cuda")])
def test_bad_device(reference_path, capsys, model_dir, device, message):
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--prompt", "hi", "--device", device)
    _assert_one_line_error(code, out, err, message)


def test_missing_prompt_and_missing_subcommand(reference_path, capsys, model_dir):
    _assert_one_line_error(*run_cli(capsys, "--model", str(model_dir)), "--prompt")
    _assert_one_line_error(*run_main(capsys, []))


def test_empty_prompt_starts_from_endoftext(reference_path, capsys, model_dir):
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--prompt", "", "--device", "cpu",
                             "--temperature", "0", "--max-new-tokens", "12")
    assert code == 0, err
    tok, model = Tokenizer.from_pretrained(model_dir), GPT.from_pretrained(model_dir)
    new = model.generate(torch.tensor([[tok.eos_token_id]]), 12, eos_token_id=tok.eos_token_id)[0, 1:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    assert out == tok.decode(new) + "\n"


def _greedy_text(model_dir, prompt, n=20):
    tok, model = Tokenizer.from_pretrained(model_dir), GPT.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode(prompt)])
    new = model.generate(ids, n, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return prompt + tok.decode(new)


def test_several_prompts_run_together_and_print_in_order(reference_path, capsys, model_dir, tmp_path):
    prompts = ["The quick fox", "Once upon", "def forward(self"]
    file = tmp_path / "prompts.txt"
    file.write_text(prompts[1] + "\n\n" + prompts[2] + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "20",
                             "--temperature", "0", "--prompt", prompts[0], "--prompts-file", str(file))
    assert code == 0, err
    assert out == "\n".join(_greedy_text(model_dir, p) + "\n" for p in prompts)  # plain when piped
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "3 prompts" in lines[0] and "tokens/s" in lines[0]


def test_compile_gives_the_same_text(reference_path, capsys, model_dir):
    """--compile runs the engine's step through torch.compile: the same greedy text for several prompts
    (a prefill step and decode steps, each graph compiled once)."""
    torch._dynamo.reset()
    prompts = ["The quick fox", "def forward(self"]
    args = ["--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "12", "--temperature", "0"]
    for p in prompts:
        args += ["--prompt", p]
    code, eager, err = run_cli(capsys, *args)
    assert code == 0, err
    code, compiled, err = run_cli(capsys, *args, "--compile")
    torch._dynamo.reset()
    assert code == 0, err
    assert compiled == eager
    code, _, err = run_cli(capsys, *args, "--compile", "--tp", "2")
    assert code == 2 and "--compile" in err


def test_prompt_is_shown_distinctly_on_a_terminal(reference_path, capsys, model_dir, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = run_cli(capsys, *_gen_args(model_dir, "--temperature", "0", "--prompt", "Once upon"))
    assert code == 0, err
    first, second = _greedy_text(model_dir, PROMPT), _greedy_text(model_dir, "Once upon")
    cyan, reset = "\033[36m", "\033[0m"
    assert out.startswith(cyan + PROMPT + reset + first[len(PROMPT):] + "\n")
    assert out.endswith(cyan + "Once upon" + reset + second[len("Once upon"):] + "\n")
    assert "2/2" in out  # a rule between the two results


def test_missing_prompts_file(reference_path, capsys, model_dir, tmp_path):
    missing = tmp_path / "nope.txt"
    code, out, err = run_cli(capsys, "--model", str(model_dir), "--prompts-file", str(missing))
    _assert_one_line_error(code, out, err, "--prompts-file", "not found")


# ------------------------------------------------------------------------------------ real subprocesses
def _python_m_fastgpt(*args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the plain PyTorch path: fast on CPU
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_python_m_fastgpt_generates(model_dir):
    proc = _python_m_fastgpt("generate", *_gen_args(model_dir, "--seed", "5"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT) and len(proc.stdout) > len(PROMPT) + 1
    assert "tokens/s" in proc.stderr and "Traceback" not in proc.stderr


def test_python_m_fastgpt_user_error_is_one_line(model_dir):
    proc = _python_m_fastgpt("generate", *_gen_args(model_dir, "--top-p", "2"))
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "top_p")
