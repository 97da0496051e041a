"""The PPO demo as a plain PyTorch script: the same models, math and batch sizes as
examples/ppo.py with examples/ppo.yaml, in one loop and no framework. The baseline of
benchmarks/bench_rl.py.

python benchmarks/plain_ppo.py [EPISODES]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import yaml

from flowgraph.rl.gpt import GPTConfig, TinyGPT, ValueGPT
from flowgraph.rl.ppo import (
    entropy,
    gae,
    kl_penalty,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from flowgraph.rl.sampling import generate, response_logits, token_logprobs
from flowgraph.rl.tasks import count_up, digit_prompts
from flowgraph.rl.tokenizer import CharTokenizer

CONFIG = yaml.safe_load((Path(__file__).parent.parent / "examples" / "ppo.yaml").read_text())


def build(network, args, seed, vocab, length):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        shape = {k: args[k] for k in ("n_layer", "n_head", "n_embd")}
        return network(GPTConfig(vocab_size=vocab, max_seq_len=length, **shape))


def run(episodes: int) -> list[float]:
    """Seconds of each episode."""
    rt, models = CONFIG["runtime"], CONFIG["models"]
    tok = CharTokenizer(models["policy"]["args"]["alphabet"])
    length = rt["prompt_length"] + rt["response_length"]
    policy = build(TinyGPT, models["policy"]["args"], 0, tok.vocab_size, length)
    reference = build(TinyGPT, models["policy"]["args"], 0, tok.vocab_size, length)
    actor = build(TinyGPT, models["policy"]["args"], 0, tok.vocab_size, length)
    critic = build(ValueGPT, models["value"]["args"], 1, tok.vocab_size, length)
    value = build(ValueGPT, models["value"]["args"], 1, tok.vocab_size, length)
    lr = float(models["ppo_policy"]["args"]["lr"])
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.0)
    prompts = digit_prompts(4096, seed=0)
    rng = random.Random(0)
    kl_coef = models["reward"]["args"]["kl_coef"]
    times = []
    for _ in range(episodes):
        start = time.perf_counter()
        batch = rng.sample(prompts, rt["sample_per_episode"])
        rows = []
        with torch.no_grad():
            for i in range(0, len(batch), rt["generation_batch_size"]):
                texts = batch[i : i + rt["generation_batch_size"]]
                ids, mask = tok.batch(texts)
                width, stop = rt["prompt_length"], [tok.eos_id]
                out = generate(policy, ids, mask, rt["response_length"], 1.0,
                               stop_tokens=stop, prompt_width=width)  # fmt: skip
                p, seq, att, rmask = (
                    out.prompt_length,
                    out.sequences,
                    out.attention_mask,
                    out.response_mask,
                )
                old = out.logprobs  # kept by the sampler, as flowgraph's policy does
                ref = token_logprobs(response_logits(reference, seq, att, p), seq, p)
                values = value(seq, att)[:, p - 1 : -1]
                answers = [tok.decode(r) for r in out.responses]
                score = torch.tensor(
                    [
                        count_up(t, a, rt["response_length"])
                        for t, a in zip(texts, answers, strict=True)
                    ]
                )
                kl = kl_penalty(old, ref) * rmask
                adv, ret = gae(token_rewards(score, kl, rmask, kl_coef), values, rmask, 1.0, 0.95)
                rows.append((seq, att, rmask, old, values, adv, ret))
        data = [torch.cat(parts) for parts in zip(*rows, strict=True)]
        n, global_bs, micro = (
            len(data[0]),
            rt["train_global_batch_size"],
            rt["train_micro_batch_size"],
        )
        for _ in range(rt["num_training_epoch"]):
            order = torch.randperm(n)
            for g in range(0, n, global_bs):
                step = [d[order[g : g + global_bs]] for d in data]
                seq, att, rmask, old, values, adv, ret = step
                adv = masked_whiten(adv, rmask)
                for m in range(0, global_bs, micro):
                    s = slice(m, m + micro)
                    logits = response_logits(actor, seq[s], att[s], p)
                    logp = token_logprobs(logits, seq[s], p)
                    loss, _ = policy_loss(logp, old[s], adv[s], rmask[s], 0.2)
                    ent = entropy(logits[:, :-1], rmask[s])
                    (loss * micro / global_bs).backward()
                    v = critic(seq[s], att[s])[:, p - 1 : -1]
                    (value_loss(v, values[s], ret[s], rmask[s], 0.2) * micro / global_bs).backward()
                    del ent
                for net, opt in ((actor, actor_opt), (critic, critic_opt)):
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for src, dst in ((actor, policy), (critic, value)):
                for a, b in zip(src.parameters(), dst.parameters(), strict=True):
                    b.copy_(a)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    seconds = run(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    print(f"median episode {sorted(seconds)[len(seconds) // 2]:.3f} s")
