"""Sampling from a ``TinyGPT`` (with or without its KV cache) and log-probs of given tokens.

Prompts come as a padded batch (``input_ids``, ``attention_mask``), padded on either side;
they are re-packed to the left so that every response starts in the same column. Each row
stops at its first stop token; later positions hold ``pad_id`` and are 0 in the response
mask. Greedy decoding (``temperature=0``) gives the same tokens with and without the
cache.

Example::

    >>> import torch
    >>> from flowgraph.rl.gpt import GPTConfig, TinyGPT
    >>> torch.manual_seed(0) and None
    >>> model = TinyGPT(GPTConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8, max_seq_len=16))
    >>> ids, mask = torch.tensor([[1, 2, 3], [0, 4, 5]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    >>> out = generate(model, ids, mask, max_new_tokens=4, temperature=0.0)
    >>> out.sequences.shape, out.response_mask.shape
    (torch.Size([2, 7]), torch.Size([2, 4]))
    >>> torch.equal(out.sequences, generate(model, ids, mask, 4, 0.0, use_cache=False).sequences)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    """Prompt and response of every row; the response starts at ``prompt_length``."""

    sequences: torch.Tensor  # [B, P + R] left-padded prompt, then the response
    attention_mask: torch.Tensor  # [B, P + R] 1 on real tokens (prompt and response)
    response_mask: torch.Tensor  # [B, R] 1 up to and including the stop token
    prompt_length: int
    logprobs: torch.Tensor | None = None  # [B, R] of the sampled tokens (0 after the stop)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    def __str__(self) -> str:
        lengths = self.response_mask.sum(1).tolist()
        return f"Generation({len(lengths)} rows, prompt {self.prompt_length}, responses {lengths})"


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, width: int = 0):
    """The same rows with their real tokens moved to the right end (left padding), as
    wide as the longest row or ``width`` if that is more."""
    lengths = attention_mask.sum(1)
    width = max(width, int(lengths.max()) if len(lengths) else 0)
    ids = torch.full((len(input_ids), width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((len(input_ids), width), dtype=attention_mask.dtype)
    for row in range(len(input_ids)):
        tokens = input_ids[row][attention_mask[row].bool()]
        if len(tokens):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
    return ids.to(input_ids.device), mask.to(input_ids.device)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from ``logits`` ``[B, V]``: greedy at temperature 0, else sampled
    from the temperature-scaled distribution cut to the ``top_k`` tokens and to the
    smallest set whose probability reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse CDF: one uniform number per row. torch.multinomial draws an exponential
    # variate per vocabulary entry, about 16x slower at batch 32 x 1024 tokens.
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand((len(cdf), 1), generator=generator, dtype=cdf.dtype, device=cdf.device)
    # right=True: the first token whose cumulative probability exceeds u, never one of
    # probability 0 (its cumulative value equals its predecessor's)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return token.squeeze(-1).clamp_max(logits.shape[-1] - 1)


# Finished rows leave the batch (and the KV cache) once they are this share of it: every
# compaction copies the cache, so a row or two finishing does not trigger one.
COMPACT_SHARE = 0.25


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    prompt_width: int = 0,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after every prompt row (see the module docstring);
    prompts are left-padded to at least ``prompt_width`` columns. ``model`` is a ``TinyGPT``
    or anything with its interface: ``model(ids, mask, cache, logits_from=k)`` gives the
    logits of positions ``k`` on and ``model.new_cache(batch, length)`` an empty cache
    (``flowgraph.rl.hf.HFCausalLM``).

    The sequences are written into buffers allocated once; only the last position's logits
    are computed; the log-probability of every sampled token under the model's raw logits
    (temperature 1, no top-k/top-p) is kept, in float32, as ``Generation.logprobs``; once a
    quarter of the rows in the batch have finished, they leave it and its KV cache (when
    the cache can ``keep`` rows, as ``TinyGPT``'s can)."""
    prompt_ids, prompt_mask = left_pad(input_ids, attention_mask, pad_id, prompt_width)
    batch, prompt_length = prompt_ids.shape
    width = prompt_length + max_new_tokens
    device = prompt_ids.device
    ids = torch.full((batch, width), pad_id, dtype=prompt_ids.dtype, device=device)
    mask = torch.zeros((batch, width), dtype=prompt_mask.dtype, device=device)
    ids[:, :prompt_length], mask[:, :prompt_length] = prompt_ids, prompt_mask
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    stops = torch.tensor(list(stop_tokens), dtype=ids.dtype, device=device)
    cache = model.new_cache(batch, width) if use_cache else None
    compacts = cache is not None and hasattr(cache, "keep")
    rows: torch.Tensor | None = None  # the rows still in the batch; None: all of them
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    step_ids, step_mask = prompt_ids, prompt_mask
    for i in range(max_new_tokens):
        column = prompt_length + i
        here = slice(None) if rows is None else rows
        if cache is None:
            step_ids, step_mask = ids[here, :column], mask[here, :column]
        logits = model(step_ids, step_mask, cache, logits_from=step_ids.shape[1] - 1)[:, -1]
        logits = logits.float()
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        ids[here, column] = token
        mask[here, column] = alive.to(mask.dtype)
        logprobs[here, i] = torch.where(alive, logprob, torch.zeros_like(logprob))
        alive = alive & ~torch.isin(token, stops)
        left = int(alive.sum())
        if left == 0:
            break
        if compacts and left <= (1 - COMPACT_SHARE) * len(alive):
            keep = alive.nonzero().squeeze(1)
            cache.keep(keep)
            rows = keep if rows is None else rows[keep]
            token, alive = token[keep], alive[keep]
        step_ids, step_mask = token[:, None], alive[:, None].to(mask.dtype)
    response_mask = mask[:, prompt_length:].float()
    return Generation(ids, mask, response_mask, prompt_length, logprobs * response_mask)


def token_logprobs(
    logits: torch.Tensor, sequences: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """Log-probabilities ``[B, R]`` (float32) of the response tokens ``sequences[:, P:]``
    under ``logits`` ``[B, P + R, V]`` of the whole sequence (position t predicts token
    t+1), or ``[B, R + 1, V]`` of positions ``P - 1`` on (``response_logits``)."""
    responses = sequences.shape[1] - prompt_length
    predicting = logits[:, -responses - 1 : -1].float()
    targets = sequences[:, prompt_length:]
    return predicting.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def response_logits(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """Logits ``[B, R + 1, V]`` of positions ``P - 1`` on: those that predict the response
    tokens, and the last one. The LM head skips the prompt's positions."""
    return model(sequences, attention_mask, logits_from=prompt_length - 1)
