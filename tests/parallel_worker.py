"""One rank of a multi-process test in tests/test_parallel.py (started by it with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Not a test module itself.

    python tests/parallel_worker.py tp OUT BUNDLED GPT2_SHAPED TINY_BIN THREE_HEADS
        tensor-parallel logits / generations of each checkpoint, saved to OUT/rank<r>.pt for the test to
        compare with one process; TINY_BIN runs through the Triton kernels (interpreter) on the shards
    python tests/parallel_worker.py engine OUT BUNDLED GPT2_SHAPED TINY_BIN
        the engine on tensor-parallel models: greedy outputs under plain, chunked-prefill and preempting
        schedules, seeded and unseeded samples, its settings and KV pages, saved to OUT/rank<r>.pt
    python tests/parallel_worker.py train OUT CONFIG_JSON [resume]
        fastgpt.train.train(TrainConfig(**json)) on every rank; OUT/rank<r>.json gets the losses and evals

Launched with TRITON_INTERPRET=1 so that the kernels can run interpreted; the ops read the variable at
call time, so each check picks its path by setting it.
"""

import json
import os
import sys

import torch

from fastgpt import GPT, parallel
from helpers import random_ids


def _reference_path(on: bool) -> None:
    os.environ["TRITON_INTERPRET"] = "0" if on else "1"


def tensor_parallel_checks(out, bundled, gpt2_shaped, tiny_bin, three_heads) -> None:
    world = parallel.World.from_env()
    parallel.init_process_group(world, torch.device("cpu"))
    results = {}
    with torch.inference_mode():
        _reference_path(True)
        model = parallel.load_tensor_parallel(bundled)
        ids = random_ids(2, 23, model.config.vocab_size, seed=1)
        results["bundled_logits"] = model(ids)
        results["bundled_generate"] = model.generate(ids[:, :7], 12)
        results["bundled_heads_per_rank"] = model.transformer.h[0].attn.n_head
        results["bundled_kv_heads"] = model.transformer.h[0].attn.kv_cache.k_cache.shape[1]
        # the fused qkv split as a plain column block instead of by heads: rank 0 would hold all of q and half
        # of k. Same shapes, so it runs, and the test shows how wrong it is
        full = GPT.from_pretrained(bundled)
        for block, full_block in zip(model.transformer.h, full.transformer.h):
            block.attn.c_attn.weight.copy_(full_block.attn.c_attn.weight.chunk(world.size)[world.rank])
            block.attn.c_attn.bias.copy_(full_block.attn.c_attn.bias.chunk(world.size)[world.rank])
        results["bundled_naive_qkv_logits"] = model(ids)
        del model, full

        model = parallel.load_tensor_parallel(gpt2_shaped)
        results["gpt2_shaped_logits"] = model(random_ids(1, 9, model.config.vocab_size, seed=2))
        results["gpt2_shaped_wte_rows"] = model.transformer.wte.weight.shape[0]
        results["gpt2_shaped_params"] = model.num_params()
        results["gpt2_shaped_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        results["gpt2_shaped_storage_bytes"] = sum(p.untyped_storage().nbytes() for p in model.parameters())
        del model

        # pytorch_model.bin (memory-mapped), an odd vocabulary (one padding row), and the Triton kernels
        # (flash attention, decode attention, layer_norm, gelu_mlp) interpreted on each rank's shard
        _reference_path(False)
        model = parallel.load_tensor_parallel(tiny_bin, cpu_decode_layout=False)
        ids = random_ids(2, 5, model.config.vocab_size, seed=3)
        results["tiny_logits"] = model(ids)
        results["tiny_generate"] = model.generate(ids, 3)
        _reference_path(True)
        # a whole model in memory, sharded in place
        results["tiny_sharded_in_memory_logits"] = parallel.tensor_parallel(GPT.from_pretrained(tiny_bin))(ids)
        try:
            parallel.load_tensor_parallel(three_heads)
            results["three_heads_error"] = None
        except ValueError as e:
            results["three_heads_error"] = str(e)
    results.update(ddp_sync_check(world))
    torch.save(results, os.path.join(out, f"rank{world.rank}.pt"))
    parallel.destroy_process_group()


# the engine's regimes: (name, Engine options); prompts and max_tokens are ENGINE_LENGTHS / ENGINE_MAX_TOKENS
ENGINE_LENGTHS = [1, 2, 16, 17, 63, 150]  # ragged, block boundaries on both sides
ENGINE_MAX_TOKENS = [9, 20, 5, 16, 12, 10]
ENGINE_REGIMES = [
    ("plain", dict(num_blocks=64)),
    ("chunked", dict(num_blocks=128, block_size=5, max_num_batched_tokens=7)),  # odd, prime sizes
    # 10 blocks of 16 hold the longest sequence (150 + 9 tokens) alone, and the others' decodes outgrow
    # what its 64-token chunks leave them
    ("preempting", dict(num_blocks=10, max_num_batched_tokens=64)),
]


def engine_prompts(vocab_size: int) -> list[list[int]]:
    return [random_ids(1, n, vocab_size, seed=200 + n)[0].tolist() for n in ENGINE_LENGTHS]


def gpt2_shaped_prompts(vocab_size: int) -> list[list[int]]:
    return [random_ids(1, n, vocab_size, seed=300 + n)[0].tolist() for n in (16, 40)]


def tiny_prompts(vocab_size: int) -> list[list[int]]:
    return [random_ids(1, n, vocab_size, seed=400 + n)[0].tolist() for n in (3, 9)]


def engine_greedy(engine, prompts, max_tokens) -> list[list[int]]:
    from fastgpt import SamplingParams

    outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens])
    return [o.outputs[0].token_ids for o in outs]


def engine_checks(out, bundled, gpt2_shaped, tiny_bin) -> None:
    from fastgpt import Engine, SamplingParams
    from fastgpt.engine.runner import bytes_per_block

    world = parallel.World.from_env()
    parallel.init_process_group(world, torch.device("cpu"))
    results = {}
    _reference_path(True)
    # float64, so that the sums of TP's all-reduces, in another order than one process's, cannot flip a
    # near-tie of the argmax
    model = parallel.load_tensor_parallel(bundled, dtype=torch.float64)
    prompts = engine_prompts(model.config.vocab_size)
    for name, options in ENGINE_REGIMES:
        engine = Engine(model, **options)
        results[f"bundled_{name}"] = engine_greedy(engine, prompts, ENGINE_MAX_TOKENS)
        results[f"bundled_{name}_stats"] = engine.stats()
    results["bundled_kv_pages_shape"] = tuple(engine.runner.k_pages.shape)
    results["bundled_kv_bytes"] = engine.runner.k_pages.nbytes + engine.runner.v_pages.nbytes
    results["bundled_kv_bytes_expected"] = engine.num_blocks * bytes_per_block(model, engine.block_size)
    engine = Engine(model, num_blocks=64)
    seeded = engine.generate(prompts[3:5], SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=7))
    results["bundled_seeded"] = [[c.token_ids for c in o.outputs] for o in seeded]
    unseeded = engine.generate(prompts[3:5], SamplingParams(n=2, temperature=1.0, max_tokens=8))
    results["bundled_unseeded"] = [[c.token_ids for c in o.outputs] for o in unseeded]
    try:  # settings that differ across the ranks: the same error on each, before any step
        Engine(model, num_blocks=10 + world.rank)
        results["mismatch_error"] = None
    except ValueError as e:
        results["mismatch_error"] = str(e)
    del model, engine

    model = parallel.load_tensor_parallel(gpt2_shaped, dtype=torch.float64)
    engine = Engine(model, num_blocks=16, max_num_batched_tokens=16)  # 40 prompt tokens in three chunks
    results["gpt2_shaped"] = engine_greedy(engine, gpt2_shaped_prompts(model.config.vocab_size), [6, 6])
    results["gpt2_shaped_stats"] = engine.stats()
    del model, engine

    # the paged kernels (paged_kv_write, paged decode and prefill attention) interpreted on each shard
    _reference_path(False)
    model = parallel.load_tensor_parallel(tiny_bin, cpu_decode_layout=False)
    engine = Engine(model, num_blocks=8, block_size=4, max_num_batched_tokens=6)
    results["tiny_triton"] = engine_greedy(engine, tiny_prompts(model.config.vocab_size), [4, 4])
    torch.save(results, os.path.join(out, f"rank{world.rank}.pt"))
    parallel.destroy_process_group()


def ddp_sync_check(world) -> dict:
    """Two micro-steps through parallel.gradient_sync: the first leaves each rank its local gradient, the
    last one all-reduces the accumulated sums into their mean."""
    from fastgpt.config import GPTConfig
    from fastgpt.train import loss_sum_and_count

    _reference_path(True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_embd=16, n_head=2, n_layer=1, n_positions=16))
    ddp = parallel.wrap_for_training(model, world, torch.device("cpu"))
    batches = [random_ids(2, 8, 64, seed=10 + 2 * world.rank + m) for m in range(2)]
    weight = model.transformer.h[0].mlp.c_fc.weight
    seen = {}
    for m, ids in enumerate(batches):
        with parallel.gradient_sync(ddp, enabled=m == 1):
            loss, n = loss_sum_and_count(ddp, ids[:, :-1], ids[:, 1:])
            (loss / n).backward()
        key = "ddp_grad_after_sync" if m == 1 else "ddp_grad_after_no_sync"
        seen[key] = parallel.gather_objects(world, weight.grad.clone())
    # what this rank's two micro-steps alone would accumulate, without DDP
    model.zero_grad()
    for ids in batches:
        loss, n = loss_sum_and_count(model, ids[:, :-1], ids[:, 1:])
        (loss / n).backward()
    seen["ddp_local_sums"] = parallel.gather_objects(world, weight.grad.clone())
    return seen


def train_run(out, config_json, resume=False) -> None:
    from fastgpt.train import TrainConfig, train

    _reference_path(True)
    world = parallel.World.from_env()
    result = train(TrainConfig(**json.loads(config_json)), resume=resume, stream=sys.stderr)
    with open(os.path.join(out, f"rank{world.rank}.json"), "w") as f:
        json.dump({"losses": result.losses, "evals": result.evals, "step": result.step}, f)


if __name__ == "__main__":
    task, *args = sys.argv[1:]
    if task == "tp":
        tensor_parallel_checks(*args)
    elif task == "engine":
        engine_checks(*args)
    elif task == "train":
        train_run(args[0], args[1], resume=len(args) > 2 and args[2] == "resume")
    else:
        raise SystemExit(f"unknown task {task!r}")
