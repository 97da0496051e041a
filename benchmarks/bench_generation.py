"""Generation speed of the tiny GPT: tokens/s with and without the KV cache, and against
Hugging Face ``generate()``.

python benchmarks/bench_generation.py

The bench model is GPT-2-shaped (4 layers, width 256, 4 heads, vocabulary 1024), batch
32, 64 new tokens (no stop token), sampled at temperature 1.0, with 1 and 2 torch threads.
Both ways produce the same tokens (greedy), which tests/test_rl_model.py checks.

Then the rollout of the GRPO bench (128 rows, 8 prompt tokens, 32 new ones, 2 threads,
fp32) three ways, alternating, medians of 7: ``generate`` on ``TinyGPT``, ``generate`` on
a Hugging Face ``GPT2LMHeadModel`` of the same shape (``flowgraph.rl.hf.HFCausalLM``),
and that model's own ``generate()`` (sampling, ``top_k=0``, exactly 32 new tokens).
"""

from __future__ import annotations

import statistics
import time

import torch
from common import report

from flowgraph.rl.gpt import GPTConfig, TinyGPT
from flowgraph.rl.sampling import generate

BATCH, NEW_TOKENS, PROMPT = 32, 64, 8


def tokens_per_second(model: TinyGPT, use_cache: bool, repeats: int) -> float:
    ids = torch.randint(3, 13, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def once() -> float:
        start = time.perf_counter()
        generate(model, ids, mask, NEW_TOKENS, temperature=1.0, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(1))  # fmt: skip
        return BATCH * NEW_TOKENS / (time.perf_counter() - start)

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def main() -> list[dict]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=256, max_seq_len=128)
    model = TinyGPT(config).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"tiny GPT {params:.1f}M parameters, batch {BATCH}, {NEW_TOKENS} new tokens")
    results = []
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        cached = tokens_per_second(model, True, repeats=5)
        full = tokens_per_second(model, False, repeats=3)
        results.append(report(f"generate with KV cache, {n} thread(s)", cached, "tok/s"))
        results.append(report(f"generate without cache, {n} thread(s)", full, "tok/s"))
        results.append(report(f"KV cache speed-up, {n} thread(s)", cached / full, "x"))
    torch.set_num_threads(threads)
    return results + against_hugging_face()


def against_hugging_face(rows: int = 128, new: int = 32, repeats: int = 7) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from flowgraph.rl.hf import HFCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024,
                                      n_positions=64, bos_token_id=1, eos_token_id=2))  # fmt: skip
    gpt2.eval()
    tiny = TinyGPT(GPTConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=256, max_seq_len=64))
    ids = torch.randint(3, 13, (rows, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ways = {
        "generate, TinyGPT": lambda: generate(tiny.eval(), ids, mask, new, 1.0),
        "generate, HF GPT-2": lambda: generate(HFCausalLM(gpt2), ids, mask, new, 1.0),
        "HF generate(), HF GPT-2": lambda: gpt2.generate(
            ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=new,
            min_new_tokens=new, pad_token_id=0,
        ),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    speed = {name: rows * new / statistics.median(t) for name, t in times.items()}
    results = [report(f"rollout {rows} x {new} tokens: {name}", value, "tok/s")
               for name, value in speed.items()]  # fmt: skip
    hf = speed["HF generate(), HF GPT-2"]
    results.append(report("generate (TinyGPT) / HF generate()",
                          speed["generate, TinyGPT"] / hf, "x"))  # fmt: skip
    results.append(report("generate (same HF GPT-2) / HF generate()",
                          speed["generate, HF GPT-2"] / hf, "x"))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
