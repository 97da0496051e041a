"""Generation speed of the tiny GPT: tokens/s with and without the KV cache.

python benchmarks/bench_generation.py

The bench model is GPT-2-shaped (4 layers, width 256, 4 heads, vocabulary 1024), batch
32, 64 new tokens (no stop token), sampled at temperature 1.0, with 1 and 2 torch threads.
Both ways produce the same tokens (greedy), which tests/test_rl_model.py checks.
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
    return results


if __name__ == "__main__":
    main()
