"""Ready PPO/GRPO/RLOO/REINFORCE++/DAPO modules over ``TinyGPT``: use them as they are,
or read them as examples of ``TorchModule``s (each is a ``setup()`` and one step method).

Every setting comes from the model's own ``args`` (``models.<name>.args`` in the config);
models that must agree (policy, reference and policy trainer; value and value trainer)
share them through a YAML anchor, as ``examples/ppo.yaml`` does:

==================  ==========================================================  =========
arg                 meaning                                                     default
==================  ==========================================================  =========
``prompt_key``      the batch key holding the prompt text (policy and reward)   prompt
``chat_template``   wrap each prompt in the HF tokenizer's chat template        false
``alphabet``        characters of the ``CharTokenizer``                         digits
``n_layer`` ...     ``GPTConfig`` fields (vocab_size, n_layer, n_head, n_embd,   GPTConfig
                    max_seq_len); vocab_size is at least the tokenizer's
``init_seed``       seed of the initial weights (equal seeds: equal weights)    0
``hf_model``        a local Hugging Face model directory instead of TinyGPT     none
``hf_config``       an inline Hugging Face config (``model_type: gpt2``, ...)   none
``hf_tokenizer``    a saved HF tokenizer (``true``: the hf_model's) for prompts  none
``temperature``     sampling temperature (``top_k``, ``top_p`` too)             1.0
``task``            rule reward of ``RewardInference`` (``flowgraph.rl.tasks``)  count_up
``reward``          instead: a row function of ``flowgraph.rl.rewards`` (math,  none
                    format, code) or ``module:function`` (``reward_options``:
                    its keyword arguments; ``reward_workers``: processes)
``advantage``       the reward's estimator: ``gae``, ``grpo``, ``rloo``,        see below
                    ``reinforce_pp``, ``reinforce_pp_baseline``
``kl_coef``         KL penalty per token in the PPO/REINFORCE++ reward (summed  0.05
                    per row in RLOO's)
``gamma``/``lam``   GAE discount and lambda (gamma: REINFORCE++'s too)          1.0/0.95
``overlong_buffer`` DAPO's overlong penalty: 0 up to response_length minus      0 (off)
                    this many tokens, then linear down to ``-overlong_factor``
``overlong_factor`` the penalty at ``runtime.response_length`` tokens           1.0
``filter_groups``   DAPO's dynamic sampling: drop groups whose task scores tie  false
``lr``              AdamW learning rate of a trainer                            1e-3
``clip``            PPO/GRPO ratio clip (value clip for the value trainer)      0.2
``clip_high``       GRPO/DAPO upper ratio clip (DAPO's clip-higher)             clip/0.28
``loss_agg``        GRPO/DAPO loss: mean over each row's tokens, then rows      sequence/
                    (``sequence``), or over all tokens of the step (``token``)  token
``entropy_coef``    entropy bonus of the PPO policy trainer                     0.0
``beta``            GRPO's KL coefficient (DAPO: 0)                             0.04
``tis_cap``         cap of the importance weight of stale rows (``max_staleness``) 2.0
``max_grad_norm``   gradient clipping of a trainer                              1.0
==================  ==========================================================  =========

Prompts are left-padded to ``runtime.prompt_length`` tokens and responses sampled up to
``runtime.response_length``, so every micro-batch has the same shape. The policy answers
each prompt ``runtime.num_inference_per_prompt`` times (GRPO's groups).

Algorithms (``flowgraph.rl.advantages``, ``flowgraph.rl.dapo``): the reward's ``advantage``
picks the estimator; by default ``gae`` when a value model added ``old_values``, else
``grpo``. Per-token advantages (``gae``, ``reinforce_pp``, ``reinforce_pp_baseline``) are
trained by ``PolicyTrainer``, which whitens them over the global step (REINFORCE++'s
global normalisation); one advantage per row (``grpo``, ``rloo``) by ``GRPOTrainer``.
DAPO is ``DAPOTrainer`` (beta 0, ``clip_high`` 0.28, token-level loss) with a reward
whose ``overlong_buffer`` adds the soft overlong penalty and whose ``filter_groups``
returns only the groups whose task scores differ, so the env must over-sample
(``sample_per_episode`` above what the optimizer steps need). RLOO is ``advantage:
rloo`` with ``GRPOTrainer`` at beta 0 (``examples/rloo.py``); REINFORCE++ is ``advantage:
reinforce_pp`` with ``PolicyTrainer`` and no value model (``examples/reinforce_pp.py``).

Batch keys: ``prompt`` (text; ``args.prompt_key``) in; the policy adds ``sequences``,
``attention_mask``, ``response_mask``, ``old_logprobs``, ``answer`` (text); the reference
``ref_logprobs``; the value model ``old_values``; the reward ``score``, ``kl``,
``advantages`` (and ``returns`` for PPO; ``overlong_penalty`` and ``sampled_per_kept``
with DAPO's options). The runtime adds ``weight_version`` and ``staleness`` to the rows
trainers receive; the trainers weight stale rows (``off_policy_correction``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from flowgraph.devices import cuda_wanted
from flowgraph.errors import ConfigError, DataError, did_you_mean
from flowgraph.module import TorchModule
from flowgraph.rl import hf, rewards
from flowgraph.rl.advantages import ESTIMATORS, estimate
from flowgraph.rl.dapo import overlong_penalty, token_weights, varied_groups
from flowgraph.rl.gpt import GPTConfig, TinyGPT, ValueGPT
from flowgraph.rl.grpo import grpo_loss
from flowgraph.rl.ppo import (
    TIS_CAP,
    entropy,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from flowgraph.rl.sampling import generate, response_logits, token_logprobs
from flowgraph.rl.tasks import REWARDS, reward_function
from flowgraph.rl.tokenizer import DIGITS, CharTokenizer

KNOWN_ARGS = frozenset(
    {
        "prompt_key",
        "chat_template",
        "alphabet",
        "vocab_size",
        "n_layer",
        "n_head",
        "n_embd",
        "max_seq_len",
        "init_seed",
        "hf_model",
        "hf_config",
        "hf_tokenizer",
        "disable_dropout",
        "temperature",
        "top_k",
        "top_p",
        "eval_temperature",
        "task",
        "score_length",
        "scale",
        "advantage",
        "overlong_buffer",
        "overlong_factor",
        "filter_groups",
        "kl_coef",
        "gamma",
        "lam",
        "lr",
        "clip",
        "clip_high",
        "loss_agg",
        "entropy_coef",
        "beta",
        "max_grad_norm",
        "tis_cap",
    }
)  # fmt: skip  (every key the ready modules read; models that must agree share one set)


def typed_arg(key: str, value: Any, default: Any) -> Any:
    """``value`` of ``models.<name>.args.<name>`` (``key``) as the type of its ``default``:
    numbers from numbers or numeric strings (YAML reads ``1e-3`` as a string), booleans
    only from booleans; anything else is a ``ConfigError`` naming the key."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif isinstance(default, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and isinstance(default, float):
            return number
        if number is not None and number.is_integer():
            return int(number)
        expected = "a number" if isinstance(default, float) else "a whole number"
    else:
        return value
    raise ConfigError(f"{key}: expected {expected} (like the default {default!r}), got {value!r}")


class GPTModule(TorchModule):
    """Common ground of the ready modules: settings, tokenizer and network from ``args``."""

    network = TinyGPT
    extra_args: frozenset[str] = frozenset()  # a subclass's own args beyond KNOWN_ARGS

    def arg(self, key: str, default: Any) -> Any:
        """``models.<name>.args.<key>``, or ``default``; of the default's type."""
        value = self.model_config.args.get(key, default)
        return typed_arg(f"models.{self.name}.args.{key}", value, default)

    def check_args(self) -> None:
        """Every key of ``args`` is one the ready modules read (a typo is an error, not a
        silently ignored setting)."""
        known = KNOWN_ARGS | self.extra_args
        for key in self.model_config.args:
            if key not in known:
                raise ConfigError(
                    f"models.{self.name}.args.{key}: unknown argument of {type(self).__name__}; "
                    f"{did_you_mean(key, known)}known: {', '.join(sorted(known))} (a subclass "
                    "reading its own args lists them in extra_args)"
                )

    @property
    def tokenizer(self) -> CharTokenizer | hf.HFTokenizer:
        """The ``CharTokenizer`` of ``args.alphabet``, or the Hugging Face tokenizer that
        ``args.hf_tokenizer`` names."""
        if not hasattr(self, "_tokenizer"):
            path = hf.tokenizer_path(self.model_config.args)
            alphabet = self.arg("alphabet", DIGITS)
            self._tokenizer = hf.HFTokenizer(path) if path else CharTokenizer(alphabet)
        return self._tokenizer

    def prompts(self, data: dict) -> list[str]:
        """The prompt texts of ``data``: its ``args.prompt_key`` column (``"prompt"``)."""
        key = self.arg("prompt_key", "prompt")
        if key not in data:
            raise DataError(
                f"{self.name}: the batch has no prompt key {key!r} (models.{self.name}.args."
                f"prompt_key); its keys: {', '.join(map(repr, sorted(data)))}. Set prompt_key "
                "to the dataset's prompt column, e.g. prompt_key: question"
            )
        return list(data[key])

    def check_chat_template(self) -> None:
        """With ``args.chat_template: true``, the tokenizer must be a Hugging Face one that
        has a chat template."""
        if not self.arg("chat_template", False):
            return
        where = f"models.{self.name}.args.chat_template"
        tokenizer = self.tokenizer
        if not isinstance(tokenizer, hf.HFTokenizer):
            raise ConfigError(
                f"{where}: true needs a Hugging Face tokenizer, but {self.name} uses the "
                f"{tokenizer}; set args.hf_tokenizer to a saved tokenizer that has a chat "
                "template, or leave chat_template out"
            )
        if not tokenizer.has_chat_template:
            raise ConfigError(
                f"{where}: the tokenizer in {tokenizer.path!r} has no chat template; save "
                "one with it (tokenizer.chat_template = '...' before save_pretrained()) or "
                "set chat_template: false to tokenize the prompts as they are"
            )

    def encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(ids, mask)`` of prompt texts, each in the chat template first
        when ``args.chat_template`` is true."""
        if self.arg("chat_template", False):
            self.check_chat_template()
            chats = self.tokenizer.chat_prompts(texts)
            return self.tokenizer.batch(chats, side="left", add_special_tokens=False)
        return self.tokenizer.batch(texts, side="left")

    def gpt_config(self) -> GPTConfig:
        runtime = self.runtime_config
        args = self.model_config.args
        fields = {k: typed_arg(f"models.{self.name}.args.{k}", args[k], 1)
                  for k in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len")
                  if k in args}  # fmt: skip
        config = GPTConfig.from_args(
            fields,
            vocab_size=self.tokenizer.vocab_size,
            max_seq_len=runtime.prompt_length + runtime.response_length,
        )
        where = f"models.{self.name}.args"
        for key, value in vars(config).items():
            if value < 1:
                raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
        if config.n_embd % config.n_head:
            raise ConfigError(
                f"{where}.n_embd ({config.n_embd}) is not a multiple of n_head "
                f"({config.n_head}): each head gets n_embd / n_head dimensions; e.g. "
                f"n_embd: {config.n_head * max(1, round(config.n_embd / config.n_head))}"
            )
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"{where}.vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens: token ids would fall outside the "
                f"embedding; use vocab_size >= {self.tokenizer.vocab_size} (or leave it out)"
            )
        return config

    def build_network(self) -> torch.nn.Module:
        """``self.network`` (``TinyGPT`` or ``ValueGPT``) from ``args``, or the Hugging Face
        model that ``args.hf_model`` / ``args.hf_config`` name (``flowgraph.rl.hf``)."""
        config = self.gpt_config()
        if not hf.wanted(self.model_config.args):
            return self.network(config)
        tokenizer = self.tokenizer
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id}  # fmt: skip
        try:
            return hf.build(
                self.model_config.args, self.network is ValueGPT, config.vocab_size, special
            )
        except (ConfigError, ValueError, FileNotFoundError) as err:
            if not str(err).startswith("args."):
                raise
            raise ConfigError(f"models.{self.name}.{err}") from None

    @property
    def device(self) -> torch.device:
        """Where the network and its batches live: this rank's CUDA device when there is
        one (``FLOWGRAPH_DEVICE=cpu`` keeps a GPU machine on the CPU), else the CPU."""
        if cuda_wanted():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def setup(self) -> None:
        self.check_args()
        with torch.random.fork_rng():
            torch.manual_seed(self.arg("init_seed", 0))
            self.model = self.build_network()  # initialised on the CPU: the same everywhere
        if not any(p.is_meta for p in self.model.parameters()):  # meta: sized by the compiler
            self.model.to(self.device)
        if self.trainable:
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=float(self.arg("lr", 1e-3)), weight_decay=0.0
            )

    def step_optimizer(self) -> float:
        """Clip gradients, step, clear them; returns the gradient norm. A NaN or infinite
        norm skips the step under ``runtime.on_nonfinite: skip`` (under ``error`` the run
        stops on the returned metric)."""
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), float(self.arg("max_grad_norm", 1.0))
        )
        if torch.isfinite(norm) or self.runtime_config.on_nonfinite != "skip":
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def data_parallel_group(self) -> object | None:
        """The process group of this trainer's data-parallel ranks, which share every
        global step: DDP's ``process_group`` (the runtime wraps ``self.model`` in DDP on
        a mesh of several ranks), a DeepSpeed engine's ``data_parallel_group``; None in
        one process or on a 1-rank mesh, where there is nothing to reduce."""
        for attribute in ("process_group", "data_parallel_group"):
            group = getattr(self.model, attribute, None)
            if group is not None:
                return group
        return None

    def accumulate(self, micro_batches: list[dict]):
        """``(micro_batch, weight, no_sync)`` for gradient accumulation: each micro-batch's
        loss is weighted by its share of the rows; DDP all-reduces only on the last."""
        total = sum(len(mb["sequences"]) for mb in micro_batches)
        no_sync = getattr(self.model, "no_sync", contextlib.nullcontext)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            yield mb, len(mb["sequences"]) / total, contextlib.nullcontext() if last else no_sync()


def prompt_length(batch: dict) -> int:
    return batch["sequences"].shape[1] - batch["response_mask"].shape[1]


def _repeat(data: dict, times: int) -> dict:
    """Every row of ``data`` ``times`` times in a row (a prompt's GRPO group)."""
    if times == 1:
        return dict(data)
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.repeat_interleave(times, dim=0)
        else:
            out[key] = [row for row in value for _ in range(times)]
    return out


class PolicyInference(GPTModule):
    """Samples answers to ``prompt`` (``args.prompt_key``; in the tokenizer's chat template
    with ``args.chat_template``): ``forward_step`` at the configured temperature
    (``runtime.num_inference_per_prompt`` per prompt), ``eval_step`` greedily."""

    def setup(self) -> None:
        super().setup()
        self.check_chat_template()

    @torch.no_grad()
    def forward_step(self, data: dict) -> dict:
        data = _repeat(data, self.runtime_config.num_inference_per_prompt)
        return self._answer(data, float(self.arg("temperature", 1.0)))

    @torch.no_grad()
    def eval_step(self, data: dict) -> dict:
        return self._answer(dict(data), float(self.arg("eval_temperature", 0.0)))

    def _answer(self, data: dict, temperature: float) -> dict:
        runtime = self.runtime_config
        ids, mask = self.encode_prompts(self.prompts(data))
        ids, mask = ids.to(self.device), mask.to(self.device)
        if ids.shape[1] > runtime.prompt_length:
            raise ValueError(
                f"a prompt of {ids.shape[1]} tokens is longer than runtime.prompt_length="
                f"{runtime.prompt_length}; raise runtime.prompt_length"
            )
        out = generate(
            self.model,
            ids,
            mask,
            max_new_tokens=runtime.response_length,
            temperature=temperature,
            top_k=int(self.arg("top_k", 0)),
            top_p=float(self.arg("top_p", 1.0)),
            stop_tokens=[self.tokenizer.eos_id],
            pad_id=self.tokenizer.pad_id,
            prompt_width=runtime.prompt_length,
        )
        return {
            **data,
            "sequences": out.sequences,
            "attention_mask": out.attention_mask,
            "response_mask": out.response_mask,
            "old_logprobs": out.logprobs,  # from the sampling itself: no second forward
            "answer": [self.tokenizer.decode(row) for row in out.responses],
        }


class PolicyReference(GPTModule):
    """The frozen initial policy: log-probs of the sampled answers (``ref_logprobs``)."""

    @torch.no_grad()
    def forward_step(self, data: dict) -> dict:
        p = prompt_length(data)
        logits = response_logits(self.model, data["sequences"], data["attention_mask"], p)
        return {**data, "ref_logprobs": token_logprobs(logits, data["sequences"], p)}


class ValueInference(GPTModule):
    """The critic: the value of the state before every answer token (``old_values``)."""

    network = ValueGPT

    @torch.no_grad()
    def forward_step(self, data: dict) -> dict:
        values = self.model(data["sequences"], data["attention_mask"])
        p = prompt_length(data)
        return {**data, "old_values": values[:, p - 1 : -1]}


class RewardInference(GPTModule):
    """Scores answers with a rule (``args.task``) and turns the scores into advantages
    (``args.advantage``, ``flowgraph.rl.advantages``): by default, with a value model's
    ``old_values`` in the batch, PPO's KL-shaped token rewards and GAE; without, GRPO's
    group-relative advantages over ``num_inference_per_prompt`` rows. ``kl`` is 0 when no
    reference model added ``ref_logprobs`` (GRPO with beta 0).

    DAPO's options act in ``forward_step`` only (``eval_step`` gives the plain score):
    ``filter_groups`` returns only the groups whose task scores (before any penalty: DAPO
    filters on accuracy) are not all equal, and ``overlong_buffer`` adds the overlong
    penalty to the score of the rows kept; each kept row carries
    ``sampled_per_kept`` (rows generated per row kept in its generation call), from which
    ``GRPOTrainer`` reports ``kept_fraction``."""

    extra_args = frozenset({"reward", "reward_options", "reward_workers"})

    def setup(self) -> None:
        self.check_args()
        self.row_reward = self.verifiable_reward()
        task = self.arg("task", "count_up")
        if task not in REWARDS:
            raise ConfigError(
                f"models.{self.name}.args.task: unknown rule reward {task!r}; "
                f"{did_you_mean(str(task), REWARDS)}rule rewards: {', '.join(sorted(REWARDS))}"
            )
        self.rule = reward_function(task)
        self.check_algorithm_args()

    def check_algorithm_args(self) -> None:
        """``advantage`` names an estimator; ``overlong_buffer`` fits in the response."""
        where = f"models.{self.name}.args"
        advantage = self.model_config.args.get("advantage")
        if advantage is not None and advantage not in ESTIMATORS:
            raise ConfigError(
                f"{where}.advantage: unknown estimator {advantage!r}; "
                f"{did_you_mean(str(advantage), ESTIMATORS)}estimators: {', '.join(ESTIMATORS)} "
                "(or leave it out: gae with a value model, else grpo)"
            )
        buffer, longest = self.arg("overlong_buffer", 0), self.runtime_config.response_length
        if not 0 <= buffer <= longest:
            raise ConfigError(
                f"{where}.overlong_buffer: {buffer} is not between 0 (no penalty) and "
                f"runtime.response_length={longest}: the penalty starts that many tokens "
                f"before the longest response; e.g. overlong_buffer: {max(1, longest // 4)}"
            )
        self.arg("overlong_factor", 1.0)  # a type error now rather than at the first episode
        groups = self.runtime_config.num_inference_per_prompt
        grouped = advantage in ("grpo", "rloo", "reinforce_pp_baseline")
        if groups < 2 and (grouped or self.arg("filter_groups", False)):
            what = f"advantage: {advantage}" if grouped else "filter_groups: true"
            raise ConfigError(
                f"{where}.{what} compares the answers to one prompt, but "
                f"runtime.num_inference_per_prompt is {groups}; set it to 2 or more (e.g. 8)"
            )
        runtime = self.runtime_config
        if (
            self.arg("filter_groups", False)
            and runtime.global_batch_size >= runtime.rows_per_episode
        ):
            raise ConfigError(
                f"{where}.filter_groups: true drops groups, but one optimizer step takes "
                f"train_global_batch_size={runtime.global_batch_size} of the episode's "
                f"{runtime.rows_per_episode} rows, so an episode that drops one group trains "
                "nothing: over-sample (raise runtime.sample_per_episode) or set "
                f"runtime.train_global_batch_size below {runtime.rows_per_episode}"
            )

    def verifiable_reward(self) -> rewards.Reward | None:
        """The row function ``args.reward`` names (``math``, ``format``, ``code`` or
        ``module:function``, ``flowgraph.rl.rewards``) with ``args.reward_options``
        bound, or None: the rule ``args.task`` scores."""
        spec = self.model_config.args.get("reward")
        self.workers = self.arg("reward_workers", 0)
        if spec is None:
            return None
        options = self.model_config.args.get("reward_options") or {}
        where = f"models.{self.name}.args"
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.reward_options: a mapping of keyword arguments, got "
                              f"{options!r}; e.g. reward_options: {{timeout: 2.0}}")  # fmt: skip
        if self.workers < 0:
            raise ConfigError(f"{where}.reward_workers: must be 0 or more, got {self.workers}")
        try:
            return rewards.reward_function(spec, **options)
        except ConfigError as err:
            raise ConfigError(f"{where}.reward: {err}") from None

    def score(self, data: dict) -> torch.Tensor:
        length = self.runtime_config.response_length
        length = int(self.arg("score_length", length))
        if self.row_reward is not None:  # a function of each row (answer, dataset columns)
            rows = rewards.batch_rows(data, self.prompts(data))
            scores = rewards.score_rows(self.row_reward, rows, self.workers)
        else:
            pairs = zip(self.prompts(data), data["answer"], strict=True)
            scores = [self.rule(prompt, answer, length) for prompt, answer in pairs]
        devices = [v.device for v in data.values() if isinstance(v, torch.Tensor)]
        return torch.tensor(scores, device=devices[0] if devices else None)

    @torch.no_grad()
    def forward_step(self, *inputs: dict) -> dict:
        data = {k: v for batch in inputs for k, v in batch.items()}
        score = self.score(data)
        groups = self.runtime_config.num_inference_per_prompt
        if self.arg("filter_groups", False):  # on the task's score, as DAPO's accuracy filter
            keep = varied_groups(score, groups)
            data, score = _rows(data, keep), score[keep]
            kept = int(keep.sum())
            data["sampled_per_kept"] = torch.full((kept,), len(keep) / max(kept, 1),
                                                  device=score.device)  # fmt: skip
        buffer = self.arg("overlong_buffer", 0)
        if buffer:
            penalty = overlong_penalty(
                data["response_mask"].sum(1), self.runtime_config.response_length, buffer,
                float(self.arg("overlong_factor", 1.0)),
            ).to(score.device)  # fmt: skip
            data["overlong_penalty"] = penalty
            score = score + penalty
        mask = data["response_mask"]
        if "ref_logprobs" in data:
            kl = kl_penalty(data["old_logprobs"], data["ref_logprobs"]) * mask
        else:  # GRPO without a reference model (beta 0)
            kl = torch.zeros_like(mask)
        out = {**data, "score": score, "kl": kl.sum(1)}
        estimator = self.model_config.args.get("advantage")
        if estimator is None:
            estimator = "gae" if "old_values" in data else "grpo"
        elif estimator == "gae" and "old_values" not in data:
            raise ConfigError(
                f"models.{self.name}.args.advantage: gae needs a critic's old_values: call "
                "value.forward_step in the env flow and pass its output to the reward, or "
                "pick a critic-free estimator (grpo, rloo, reinforce_pp)"
            )
        out.update(estimate(
            estimator, score, kl, mask, groups, data.get("old_values"),
            kl_coef=float(self.arg("kl_coef", 0.05)), gamma=float(self.arg("gamma", 1.0)),
            lam=float(self.arg("lam", 0.95)), scale=bool(self.arg("scale", True)),
        ))  # fmt: skip
        return out

    @torch.no_grad()
    def eval_step(self, data: dict) -> dict:
        return {**data, "score": self.score(data)}


def _rows(data: dict, keep: torch.Tensor) -> dict:
    """The rows of ``data`` where the bool ``keep`` ``[B]`` is true."""
    rows = keep.tolist()
    return {key: value[keep.to(value.device)] if isinstance(value, torch.Tensor)
            else [v for v, k in zip(value, rows, strict=True) if k]
            for key, value in data.items()}  # fmt: skip


class RewardModel(RewardInference):
    """A learned reward model: a ``ValueGPT`` whose value at an answer's last token is its
    score (trained elsewhere; load its weights in a subclass's ``setup``)."""

    network = ValueGPT

    def setup(self) -> None:
        GPTModule.setup(self)
        self.check_algorithm_args()

    def score(self, data: dict) -> torch.Tensor:
        values = self.model(data["sequences"], data["attention_mask"])
        last = data["attention_mask"].cumsum(1).argmax(1)  # the last real token of each row
        return values.gather(1, last[:, None]).squeeze(1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class PolicyTrainer(GPTModule):
    """PPO policy update: clipped surrogate on whitened advantages, entropy bonus.

    Advantages are whitened over the whole global step: on several data-parallel ranks,
    each with its share of the step's micro-batches, with the moments of all of them
    (``masked_whiten(..., group=...)``), so 1 and N ranks train alike. This is also
    REINFORCE++'s normalisation: with the reward's ``advantage: reinforce_pp`` and no
    value model, this trainer is REINFORCE++ (``examples/reinforce_pp.py``)."""

    def train_step(self, micro_batches: list[dict]) -> dict:
        _check_advantages(self, micro_batches[0], per_token=True)
        mask_all = torch.cat([mb["response_mask"] for mb in micro_batches])
        adv_all = masked_whiten(
            torch.cat([mb["advantages"] for mb in micro_batches]), mask_all,
            group=self.data_parallel_group(),
        )  # fmt: skip
        stats, start = [], 0
        for mb, weight, sync in self.accumulate(micro_batches):
            rows = len(mb["sequences"])
            advantages, start = adv_all[start : start + rows], start + rows
            with sync:
                p = prompt_length(mb)
                logits = response_logits(self.model, mb["sequences"], mb["attention_mask"], p)
                logprobs = token_logprobs(logits, mb["sequences"], p)
                loss, info = policy_loss(
                    logprobs, mb["old_logprobs"], advantages, mb["response_mask"],
                    float(self.arg("clip", 0.2)), mb.get("staleness"),
                    float(self.arg("tis_cap", TIS_CAP)),
                )  # fmt: skip
                coef = float(self.arg("entropy_coef", 0.0))
                with torch.set_grad_enabled(coef > 0):  # no backward through it when unused
                    ent = entropy(logits[:, :-1], mb["response_mask"])
                ((loss - coef * ent) * weight).backward()
            stats.append({**info, "loss": loss.item(), "entropy": ent.item()})
        grad_norm = self.step_optimizer()
        return {
            **{k: _mean([s[k] for s in stats]) for k in stats[0]},
            "grad_norm": grad_norm,
            "reward": torch.cat([mb["score"] for mb in micro_batches]).mean().item(),
            "kl": torch.cat([mb["kl"] for mb in micro_batches]).mean().item(),
        }


class ValueTrainer(GPTModule):
    """PPO value update: clipped regression of the values onto the GAE returns."""

    network = ValueGPT

    def train_step(self, micro_batches: list[dict]) -> dict:
        losses = []
        for mb, weight, sync in self.accumulate(micro_batches):
            with sync:
                values = self.model(mb["sequences"], mb["attention_mask"])
                p = prompt_length(mb)
                loss = value_loss(
                    values[:, p - 1 : -1], mb["old_values"], mb["returns"], mb["response_mask"],
                    float(self.arg("clip", 0.2)),
                )  # fmt: skip
                (loss * weight).backward()
            losses.append(loss.item())
        self.step_optimizer()
        return {"loss": _mean(losses)}


class SFTTrainer(GPTModule):
    """Supervised fine-tuning: cross-entropy on the response tokens of ``sequences``
    (a warm-up before RL, or distillation from a teacher's answers)."""

    def train_step(self, micro_batches: list[dict]) -> dict:
        losses = []
        for mb, weight, sync in self.accumulate(micro_batches):
            with sync:
                p = prompt_length(mb)
                logits = response_logits(self.model, mb["sequences"], mb["attention_mask"], p)
                logprobs = token_logprobs(logits, mb["sequences"], p)
                loss = -masked_mean(logprobs, mb["response_mask"])
                (loss * weight).backward()
            losses.append(loss.item())
        self.step_optimizer()
        return {"loss": _mean(losses)}


class GRPOTrainer(GPTModule):
    """GRPO policy update: clipped surrogate with one advantage per row (``grpo`` or
    ``rloo``), KL to the reference (``args.beta``; with beta 0 the env flow needs no
    reference model at all). ``clip_high`` decouples the upper clip; ``loss_agg: token``
    averages the loss over every token of the global step, across micro-batches and
    data-parallel ranks (``flowgraph.rl.dapo.token_weights``) instead of per row.

    Metrics: the loss statistics, ``grad_norm``, ``reward`` (the mean score),
    ``response_length``; with DAPO's reward options ``overlong_penalty`` (mean) and
    ``kept_fraction``: the fraction of generated rows that dynamic sampling kept, over
    the generation calls this step's rows come from (a call that kept no group has no
    row here to tell of it)."""

    default_beta = 0.04
    default_clip_high: float | None = None  # None: args.clip, a symmetric clip
    default_loss_agg = "sequence"

    def setup(self) -> None:
        super().setup()
        loss_agg = self.arg("loss_agg", self.default_loss_agg)
        if loss_agg not in ("sequence", "token"):
            raise ConfigError(
                f"models.{self.name}.args.loss_agg: {loss_agg!r} is neither 'sequence' (the "
                "mean over each row's tokens, then over rows: GRPO) nor 'token' (the mean over "
                "all tokens of the step: DAPO)"
            )

    def accumulation(self, micro_batches: list[dict]):
        """``accumulate``'s row weights, or token weights under ``loss_agg: token``."""
        steps = self.accumulate(micro_batches)
        if self.arg("loss_agg", self.default_loss_agg) == "sequence":
            return steps
        masks = [mb["response_mask"] for mb in micro_batches]
        weights = token_weights(masks, self.data_parallel_group())
        return ((mb, w, sync) for (mb, _, sync), w in zip(steps, weights, strict=True))

    def train_step(self, micro_batches: list[dict]) -> dict:
        _check_advantages(self, micro_batches[0], per_token=False)
        clip = float(self.arg("clip", 0.2))
        clip_high = self.default_clip_high if self.default_clip_high is not None else clip
        clip_high = float(self.arg("clip_high", clip_high))
        loss_agg = self.arg("loss_agg", self.default_loss_agg)
        stats = []
        for mb, weight, sync in self.accumulation(micro_batches):
            with sync:
                p = prompt_length(mb)
                logits = response_logits(self.model, mb["sequences"], mb["attention_mask"], p)
                logprobs = token_logprobs(logits, mb["sequences"], p)
                loss, info = grpo_loss(
                    logprobs, mb["old_logprobs"], mb.get("ref_logprobs"), mb["advantages"],
                    mb["response_mask"], clip, float(self.arg("beta", self.default_beta)),
                    mb.get("staleness"), float(self.arg("tis_cap", TIS_CAP)), clip_high,
                    loss_agg,
                )  # fmt: skip
                (loss * weight).backward()
            stats.append({**info, "loss": loss.item()})
        grad_norm = self.step_optimizer()
        metrics = {
            **{k: _mean([s[k] for s in stats]) for k in stats[0]},
            "grad_norm": grad_norm,
            "reward": torch.cat([mb["score"] for mb in micro_batches]).mean().item(),
            "response_length": torch.cat([mb["response_mask"] for mb in micro_batches])
            .sum(1)
            .mean()
            .item(),
        }
        for key in ("overlong_penalty", "sampled_per_kept"):
            if key in micro_batches[0]:
                metrics[key] = torch.cat([mb[key] for mb in micro_batches]).mean().item()
        if "sampled_per_kept" in metrics:
            metrics["kept_fraction"] = 1 / metrics.pop("sampled_per_kept")
        return metrics


class DAPOTrainer(GRPOTrainer):
    """DAPO policy update: ``GRPOTrainer`` with DAPO's defaults: no KL term (beta 0, so no
    reference model), the decoupled clip ``[1 - clip, 1 + clip_high]`` = [0.8, 1.28] and
    the token-level loss. Its reward model adds the overlong penalty and drops the groups
    of equal scores (``overlong_buffer``, ``filter_groups``; see ``examples/dapo.yaml``).

    Example (``flowc compile examples/dapo.py`` prints the plan)::

        >>> DAPOTrainer("dapo_policy").default_clip_high
        0.28
    """

    default_beta = 0.0
    default_clip_high = 0.28
    default_loss_agg = "token"


def _check_advantages(trainer: GPTModule, batch: dict, per_token: bool) -> None:
    """A trainer of per-token advantages ``[B, T]`` (PPO, REINFORCE++) was not handed one
    advantage per row ``[B]`` (GRPO, RLOO), nor the reverse."""
    dims = batch["advantages"].dim()
    if dims == (2 if per_token else 1):
        return
    kind = type(trainer).__name__
    if per_token:
        raise ConfigError(
            f"{trainer.name} ({kind}) trains per-token advantages [rows, tokens], but the "
            "batch holds one advantage per row (the reward's advantage: grpo or rloo); train "
            "those with GRPOTrainer, or set the reward's args.advantage to reinforce_pp (or "
            "gae with a value model)"
        )
    raise ConfigError(
        f"{trainer.name} ({kind}) trains one advantage per row, but the batch holds "
        "per-token advantages [rows, tokens] (the reward's advantage: gae or reinforce_pp); "
        "train those with PolicyTrainer, or set the reward's args.advantage to grpo or rloo"
    )


__all__ = [
    "GPTModule",
    "PolicyInference",
    "PolicyReference",
    "ValueInference",
    "RewardInference",
    "RewardModel",
    "PolicyTrainer",
    "ValueTrainer",
    "SFTTrainer",
    "GRPOTrainer",
    "DAPOTrainer",
]
