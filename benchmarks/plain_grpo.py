"""The GRPO example as a plain PyTorch script: the same models, math and batch sizes as
examples/grpo.py with examples/grpo.yaml, in one loop and no framework. A baseline of
benchmarks/bench_rl.py.

python benchmarks/plain_grpo.py [EPISODES]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import yaml

from flowgraph.rl.gpt import GPTConfig, TinyGPT
from flowgraph.rl.grpo import group_advantages, grpo_loss
from flowgraph.rl.sampling import generate, response_logits, token_logprobs
from flowgraph.rl.tasks import count_up, digit_prompts
from flowgraph.rl.tokenizer import CharTokenizer

CONFIG = yaml.safe_load((Path(__file__).parent.parent / "examples" / "grpo.yaml").read_text())


def build(args, vocab, length):
    with torch.random.fork_rng():
        torch.manual_seed(args["init_seed"])
        shape = {k: args[k] for k in ("n_layer", "n_head", "n_embd")}
        return TinyGPT(GPTConfig(vocab_size=vocab, max_seq_len=length, **shape))


def run(episodes: int) -> list[float]:
    """Seconds of each episode."""
    rt, models = CONFIG["runtime"], CONFIG["models"]
    args, train_args = models["policy"]["args"], models["grpo_policy"]["args"]
    tok = CharTokenizer(args["alphabet"])
    length, group = rt["prompt_length"] + rt["response_length"], rt["num_inference_per_prompt"]
    policy, reference, actor = (build(args, tok.vocab_size, length) for _ in range(3))
    optimizer = torch.optim.AdamW(actor.parameters(), lr=train_args["lr"], weight_decay=0.0)
    prompts = digit_prompts(8192, seed=0)
    rng = random.Random(0)
    times = []
    for _ in range(episodes):
        start = time.perf_counter()
        batch = rng.sample(prompts, rt["sample_per_episode"])
        rows = []
        with torch.no_grad():
            for i in range(0, len(batch), rt["generation_batch_size"]):
                prompts_now = batch[i : i + rt["generation_batch_size"]]
                texts = [t for t in prompts_now for _ in range(group)]
                ids, mask = tok.batch(texts, side="left")
                out = generate(
                    policy, ids, mask, rt["response_length"], 1.0,
                    stop_tokens=[tok.eos_id], prompt_width=rt["prompt_length"],
                )  # fmt: skip
                p, seq, att = out.prompt_length, out.sequences, out.attention_mask
                old = out.logprobs  # kept by the sampler, as flowgraph's policy does
                ref = token_logprobs(response_logits(reference, seq, att, p), seq, p)
                answers = [tok.decode(r) for r in out.responses]
                pairs = zip(texts, answers, strict=True)
                score = torch.tensor([count_up(t, a, rt["response_length"]) for t, a in pairs])
                rows.append((seq, att, out.response_mask, old, ref, group_advantages(score, group)))
        data = [torch.cat(parts) for parts in zip(*rows, strict=True)]
        n = len(data[0])
        global_bs, micro = rt["train_global_batch_size"], rt["train_micro_batch_size"]
        order = torch.randperm(n)
        for g in range(0, n, global_bs):
            seq, att, rmask, old, ref, adv = (d[order[g : g + global_bs]] for d in data)
            for m in range(0, global_bs, micro):
                s = slice(m, m + micro)
                logits = response_logits(actor, seq[s], att[s], p)
                logp = token_logprobs(logits, seq[s], p)
                loss, _ = grpo_loss(logp, old[s], ref[s], adv[s], rmask[s],
                                    train_args["clip"], train_args["beta"])  # fmt: skip
                (loss * micro / global_bs).backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for a, b in zip(actor.parameters(), policy.parameters(), strict=True):
                b.copy_(a)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    seconds = run(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    print(f"median episode {sorted(seconds)[len(seconds) // 2]:.3f} s")
