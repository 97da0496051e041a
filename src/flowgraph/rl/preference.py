"""Ready DPO modules: offline preference training on rows with ``prompt``, ``chosen`` and
``rejected`` text (a preference file), as in ``examples/dpo.py``::

    def env_flow(batch):                    # no generation: the pairs are the data
        return reference.forward_step(batch)

    def trainer_flow(batch):
        dpo_policy.train_step(batch)

``DPOReference`` (the frozen initial policy) tokenises every pair and adds its sequence
log-probs; ``DPOTrainer`` computes the policy's and steps on ``flowgraph.rl.dpo.dpo_loss``.
Both read the args of ``flowgraph.rl.modules`` (the two must agree on the network, as a
reference and its trainer do); the trainer also reads ``beta`` (default 0.1),
``label_smoothing`` (0.0) and ``loss_type`` (``sigmoid`` or ``ipo``).

A pair batch has the layout of the policy's sampled batches with a pair axis after the
rows (index 0: chosen, 1: rejected): ``sequences`` and ``attention_mask`` ``[B, 2, P + R]``
(the prompt left-padded to ``runtime.prompt_length``, the response right-padded to
``runtime.response_length``) and ``response_mask`` ``[B, 2, R]``. A response ends with the
tokenizer's end-of-sequence token when it is shorter than ``runtime.response_length``, as
a sampled answer that stops does. The reference adds ``ref_chosen_logps`` and
``ref_rejected_logps`` ``[B]``; any other columns pass through.

Online DPO is a flow too (``runtime.num_inference_per_prompt: 2``): the policy answers
every prompt twice, the reward scores the answers, and ``reference.pair_step`` makes the
better one chosen (``pair_answers``) before adding its log-probs; the policy is the
trainer's synced inference copy::

    def env_flow(batch):
        answers = policy.forward_step(batch)
        scored = reward.forward_step(answers)
        return reference.pair_step(scored)
"""

from __future__ import annotations

import torch

from flowgraph.errors import ConfigError, DataError, did_you_mean
from flowgraph.rl.dpo import LOSS_TYPES, check_settings, dpo_loss, sequence_logprobs
from flowgraph.rl.hf import HFTokenizer
from flowgraph.rl.modules import GPTModule
from flowgraph.rl.sampling import left_pad, response_logits, token_logprobs

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
REFERENCE_KEYS = ("sequences", "ref_chosen_logps", "ref_rejected_logps")  # DPOReference's


def _texts(data: dict, key: str, where: str) -> list[str]:
    if key not in data:
        raise DataError(
            f"{where}: the batch has no {key!r} column (it has {', '.join(data) or 'none'}); "
            f"a preference sample is a dict with {', '.join(map(repr, PAIR_COLUMNS))} texts: "
            f"give every row of the dataset (every line of the preference file) a {key!r}"
        )
    values = list(data[key])
    for value in values:
        if not isinstance(value, str):
            raise DataError(
                f"{where}: column {key!r} holds a {type(value).__name__} ({value!r}); "
                f"preference columns hold text"
            )
    return values


def _encode_responses(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of responses, which continue their prompt: without the special
    tokens (a BOS) that a Hugging Face tokenizer puts in front of a whole text."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.batch(texts, side="right", add_special_tokens=False)
    return tokenizer.batch(texts, side="right")


def encode_pairs(
    tokenizer,
    data: dict,
    prompt_length: int,
    response_length: int,
    where: str = "preference batch",
    encode_prompts=None,
) -> dict[str, torch.Tensor]:
    """``sequences``, ``attention_mask`` and ``response_mask`` of the pairs in ``data`` (the
    layout in the module docstring); a ``DataError`` naming the setting when a prompt or a
    response does not fit ``runtime.prompt_length`` / ``runtime.response_length``.
    ``encode_prompts`` (texts -> left-padded ids and mask) encodes the prompts as the
    policy does (``GPTModule.encode_prompts``: the chat template when configured).

    >>> from flowgraph.rl.tokenizer import CharTokenizer
    >>> rows = {"prompt": ["12"], "chosen": ["34"], "rejected": ["5"]}
    >>> pairs = encode_pairs(CharTokenizer(), rows, prompt_length=3, response_length=3)
    >>> pairs["sequences"].tolist()  # pad 0, eos 2, digit d is d + 3
    [[[0, 4, 5, 6, 7, 2], [0, 4, 5, 8, 2, 0]]]
    >>> pairs["response_mask"].tolist()
    [[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]]
    """
    prompts, chosen, rejected = (_texts(data, key, where) for key in PAIR_COLUMNS)
    if encode_prompts is None:
        ids, mask = tokenizer.batch(prompts, side="left")
    else:
        ids, mask = encode_prompts(prompts)
    if ids.shape[1] > prompt_length:
        row = int(mask.sum(1).argmax())
        raise DataError(
            f"{where}: the prompt {prompts[row]!r} is {ids.shape[1]} tokens, longer than "
            f"runtime.prompt_length={prompt_length}; raise runtime.prompt_length"
        )
    ids, mask = left_pad(ids, mask, tokenizer.pad_id, prompt_length)
    texts = chosen + rejected  # one batch: rows [0, B) chosen, [B, 2B) rejected
    encoded, encoded_mask = _encode_responses(tokenizer, texts)
    lengths = encoded_mask.sum(1)
    if len(texts) and int(lengths.max()) > response_length:
        row = int(lengths.argmax())
        column = "chosen" if row < len(chosen) else "rejected"
        raise DataError(
            f"{where}: the {column} response {texts[row]!r} is {int(lengths[row])} tokens, "
            f"longer than runtime.response_length={response_length}; raise "
            "runtime.response_length (or shorten the responses in the dataset)"
        )
    responses = torch.full((len(texts), response_length), tokenizer.pad_id, dtype=ids.dtype)
    response_mask = torch.zeros((len(texts), response_length), dtype=mask.dtype)
    width = encoded.shape[1]
    responses[:, :width], response_mask[:, :width] = encoded, encoded_mask
    stops = (lengths < response_length).nonzero().squeeze(1)
    responses[stops, lengths[stops]] = tokenizer.eos_id
    response_mask[stops, lengths[stops]] = 1

    def paired(prompt_part: torch.Tensor, response_part: torch.Tensor) -> torch.Tensor:
        whole = torch.cat([prompt_part.repeat(2, 1), response_part], 1)
        return whole.view(2, len(prompts), -1).transpose(0, 1).contiguous()

    return {
        "sequences": paired(ids, responses),
        "attention_mask": paired(mask, response_mask),
        "response_mask": paired(mask[:, :0], response_mask).float(),
    }


def pair_logprobs(model: torch.nn.Module, pairs: dict, average: bool = False) -> torch.Tensor:
    """Sequence log-probs ``[B, 2]`` of the chosen and rejected responses of ``pairs`` under
    ``model``, in one forward pass over the ``2B`` sequences (``average``: per token)."""
    sequences, mask = pairs["sequences"], pairs["response_mask"]
    rows, _, width = sequences.shape
    if rows == 0:  # every pair of an online batch was a tie
        return torch.zeros((0, 2), device=sequences.device)
    flat = sequences.reshape(2 * rows, width)
    p = width - mask.shape[-1]
    logits = response_logits(model, flat, pairs["attention_mask"].reshape(2 * rows, width), p)
    logprobs = token_logprobs(logits, flat, p).view(rows, 2, -1)
    return sequence_logprobs(logprobs, mask, average)


ANSWER_KEYS = ("sequences", "attention_mask", "response_mask", "answer", "score")


def pair_answers(data: dict, where: str = "scored answers") -> dict:
    """Online DPO's pairs from sampled answers: of the two consecutive rows of each prompt
    (``runtime.num_inference_per_prompt: 2``) the one of higher ``score`` is chosen; a
    tie says nothing about preference and is dropped. Returns the pair layout, the answer
    texts as ``chosen``/``rejected`` and their ``chosen_score``/``rejected_score``; every
    other column is the chosen answer's (the prompt's columns are equal in both).

    >>> seq = torch.tensor([[1, 5], [1, 6], [2, 7], [2, 8]])
    >>> rows = {"prompt": ["a", "a", "b", "b"], "answer": ["x", "y", "z", "w"],
    ...         "sequences": seq, "attention_mask": torch.ones_like(seq),
    ...         "response_mask": torch.ones(4, 1), "score": torch.tensor([0.0, 1.0, 0.5, 0.5])}
    >>> pairs = pair_answers(rows)  # the tie of prompt "b" is dropped
    >>> pairs["prompt"], pairs["chosen"], pairs["rejected"], pairs["sequences"].tolist()
    (['a'], ['y'], ['x'], [[[1, 6], [1, 5]]])
    """
    missing = [key for key in ANSWER_KEYS if key not in data]
    if missing:
        raise DataError(
            f"{where}: the batch has no {', '.join(missing)}; pairs are made of the policy's "
            "answers scored by the reward: policy.forward_step(batch), then "
            "reward.forward_step(answers), then this call"
        )
    rows = len(data["score"])
    if rows % 2:
        raise DataError(
            f"{where}: {rows} answers do not pair up; each prompt needs two consecutive "
            "answers (runtime.num_inference_per_prompt=2, and an even generation_batch_size "
            "of this model)"
        )
    score = data["score"].view(-1, 2)
    keep = (score[:, 0] != score[:, 1]).nonzero().squeeze(1)
    second_wins = (score[keep, 1] > score[keep, 0]).long()
    chosen, rejected = (2 * keep + second_wins).tolist(), (2 * keep + 1 - second_wins).tolist()
    out = {key: value[chosen] if isinstance(value, torch.Tensor) else [value[i] for i in chosen]
           for key, value in data.items() if key not in ANSWER_KEYS}  # fmt: skip
    for key in ("sequences", "attention_mask", "response_mask"):
        out[key] = torch.stack([data[key][chosen], data[key][rejected]], 1)
    out["chosen"] = [data["answer"][i] for i in chosen]
    out["rejected"] = [data["answer"][i] for i in rejected]
    out["chosen_score"], out["rejected_score"] = data["score"][chosen], data["score"][rejected]
    return out


class DPOReference(GPTModule):
    """The frozen initial policy of DPO: tokenises the pairs of a preference batch and adds
    their log-probs under it (``ref_chosen_logps``, ``ref_rejected_logps``).

    ``pair_step`` makes the pairs from sampled answers instead (online DPO, see
    ``pair_answers``).

    Example (the env flows of offline and of online DPO)::

        reference = DPOReference("reference")

        def env_flow(batch):
            return reference.forward_step(batch)

        def online_env_flow(batch):  # runtime.num_inference_per_prompt: 2
            answers = policy.forward_step(batch)
            scored = reward.forward_step(answers)
            return reference.pair_step(scored)
    """

    @torch.no_grad()
    def forward_step(self, data: dict) -> dict:
        runtime = self.runtime_config
        where = f"{self.name}.forward_step"
        pairs = encode_pairs(
            self.tokenizer, data, runtime.prompt_length, runtime.response_length, where,
            self.encode_prompts,
        )  # fmt: skip
        pairs = {key: value.to(self.device) for key, value in pairs.items()}
        return self._with_logprobs({**data, **pairs})

    @torch.no_grad()
    def pair_step(self, data: dict) -> dict:
        groups = self.runtime_config.num_inference_per_prompt
        if groups != 2:
            raise ConfigError(
                f"{self.name}.pair_step pairs the two answers of each prompt, but "
                f"runtime.num_inference_per_prompt is {groups}; set it to 2"
            )
        runtime = self.runtime_config
        if runtime.global_batch_size > runtime.sample_per_episode:
            raise ConfigError(
                f"{self.name}.pair_step makes at most one pair of each of the episode's "
                f"{runtime.sample_per_episode} prompts (ties are dropped), fewer than one "
                f"optimizer step's train_global_batch_size={runtime.global_batch_size}: no "
                "step would run; set runtime.train_global_batch_size to a fraction of "
                "sample_per_episode (e.g. a quarter)"
            )
        return self._with_logprobs(pair_answers(data, f"{self.name}.pair_step"))

    def _with_logprobs(self, pairs: dict) -> dict:
        logps = pair_logprobs(self.model, pairs)
        return {**pairs, "ref_chosen_logps": logps[:, 0], "ref_rejected_logps": logps[:, 1]}


class DPOTrainer(GPTModule):
    """The DPO policy update on pair batches from a ``DPOReference`` (``args.beta``,
    ``args.label_smoothing``, ``args.loss_type``; see ``flowgraph.rl.dpo``). Metrics: the
    loss, the implicit rewards (``reward_chosen``, ``reward_rejected``, ``margin``,
    ``accuracy``) and the policy's mean sequence log-probs (``logp_chosen``,
    ``logp_rejected``), weighted by rows over the global step.

    Example (the trainer flow)::

        dpo_policy = DPOTrainer("dpo_policy")

        def trainer_flow(batch):
            dpo_policy.train_step(batch)
    """

    extra_args = frozenset({"label_smoothing", "loss_type"})

    def setup(self) -> None:
        super().setup()
        self.beta = float(self.arg("beta", 0.1))
        self.label_smoothing = float(self.arg("label_smoothing", 0.0))
        self.loss_type = str(self.arg("loss_type", "sigmoid"))
        problem = check_settings(self.beta, self.label_smoothing, self.loss_type)
        if problem:
            key, why = problem
            hint = did_you_mean(self.loss_type, LOSS_TYPES) if key == "loss_type" else ""
            raise ConfigError(f"models.{self.name}.args.{key}: {hint}{why}")

    def _reference(self, mb: dict, average: bool) -> torch.Tensor:
        """The reference's sequence log-probs ``[B, 2]`` of the pairs of ``mb``."""
        missing = [k for k in REFERENCE_KEYS if k not in mb]
        if missing:
            raise DataError(
                f"{self.name}.train_step: the batch has no {', '.join(missing)}; call "
                "reference.forward_step(batch) (a DPOReference) in the env flow, which "
                "tokenises the pairs and adds the reference's log-probs"
            )
        ref = torch.stack([mb["ref_chosen_logps"], mb["ref_rejected_logps"]], 1)
        return ref / mb["response_mask"].sum(-1).clamp_min(1) if average else ref

    def train_step(self, micro_batches: list[dict]) -> dict:
        average = self.loss_type == "ipo"
        totals: dict[str, float] = {}
        for mb, weight, sync in self.accumulate(micro_batches):
            ref = self._reference(mb, average)
            with sync:
                logps = pair_logprobs(self.model, mb, average)
                loss, info = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
                                      self.beta, self.label_smoothing, self.loss_type)  # fmt: skip
                (loss * weight).backward()
            info = {**info, "loss": loss.item(), "logp_chosen": logps[:, 0].mean().item(),
                    "logp_rejected": logps[:, 1].mean().item()}  # fmt: skip
            for key, value in info.items():
                totals[key] = totals.get(key, 0.0) + weight * value
        return {**totals, "grad_norm": self.step_optimizer()}


__all__ = ["DPOReference", "DPOTrainer", "encode_pairs", "pair_answers", "pair_logprobs"]
