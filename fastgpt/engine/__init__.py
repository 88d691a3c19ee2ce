"""Continuous batching over a paged KV cache: the high-throughput way to run many requests.

    from fastgpt import Engine, SamplingParams
    engine = Engine.from_pretrained()                       # the bundled model; or a path / hub name
    for out in engine.generate(["Hello", "The os module"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)

engine.py (the API), scheduler.py (who runs each step), block_manager.py (the paged cache's blocks and
prefix hashes), sequence.py (a request's samples and their text), runner.py (the model step),
sampling.py (per-request sampling), cuda_graphs.py (captured decode steps), params.py (public dataclasses).
"""

from fastgpt.engine.engine import Engine
from fastgpt.engine.params import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "CompletionOutput"]
