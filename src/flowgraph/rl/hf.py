"""Hugging Face causal LMs behind the ``TinyGPT`` interface (optional: ``pip install
flowgraph[hf]``, which installs ``transformers``).

The ready modules of ``flowgraph.rl.modules`` build one of these instead of a ``TinyGPT``
when their ``args`` name a Hugging Face model, and nothing is ever downloaded:

- ``hf_model: DIR``: a local directory. With weights in it (``save_pretrained`` output) the
  model is loaded from them; with only a ``config.json`` it is built from that config and
  initialised from ``init_seed``.
- ``hf_config: {model_type: gpt2, n_layer: 4, ...}``: a config written inline (any
  ``transformers`` model type), randomly initialised from ``init_seed``. ``vocab_size``
  defaults to the tokenizer's and the special token ids to the tokenizer's.

Dropout is turned off (``disable_dropout: false`` keeps the config's). Token ids come
from the module's ``CharTokenizer`` (or the ``HFTokenizer`` of ``hf_tokenizer``, whose
chat template ``chat_template: true`` applies to every prompt), so the model's
vocabulary must be at least as large as the tokenizer's. Positions follow the attention
mask, so left-padded prompts are handled as ``TinyGPT`` handles them.

Example::

    >>> import torch
    >>> model = build({"hf_config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2,
    ...                "n_embd": 16}}, value=False, vocab_size=12, special_ids={})
    >>> model(torch.tensor([[0, 3, 4]]), torch.tensor([[0, 1, 1]])).shape
    torch.Size([1, 3, 12])
"""

from __future__ import annotations

import os

import torch
from torch import nn

from flowgraph.rl.gpt import mask_positions
from flowgraph.rl.tokenizer import pad_batch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def wanted(args: dict) -> bool:
    """Whether a model's ``args`` ask for a Hugging Face model."""
    return "hf_model" in args or "hf_config" in args


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "args.hf_model / args.hf_config need the transformers package: "
            "pip install 'flowgraph[hf]' (or pip install transformers)"
        ) from error
    return transformers


def _config(args: dict, vocab_size: int, special_ids: dict):
    transformers = _transformers()
    if "hf_config" in args:
        fields = dict(args["hf_config"])
        if "model_type" not in fields:
            raise ValueError(
                "args.hf_config needs a model_type (for example model_type: gpt2), "
                f"got the keys {sorted(fields)}"
            )
        fields.setdefault("vocab_size", vocab_size)
        for key, value in special_ids.items():
            fields.setdefault(key, value)
        model_type = fields.pop("model_type")
        known = list(transformers.CONFIG_MAPPING.keys())
        if model_type not in known:
            from flowgraph.errors import ConfigError, did_you_mean

            raise ConfigError(
                f"args.hf_config.model_type: transformers has no model type {model_type!r}; "
                f"{did_you_mean(str(model_type), known)}e.g. gpt2, llama, qwen2 "
                "(transformers.CONFIG_MAPPING lists all)"
            )
        return transformers.AutoConfig.for_model(model_type, **fields)
    path = str(args["hf_model"])
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"args.hf_model={path!r} has no config.json; point it at a directory written by "
            "save_pretrained() or holding a model's config.json (nothing is downloaded)"
        )
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def build(args: dict, value: bool, vocab_size: int, special_ids: dict) -> nn.Module:
    """The ``HFCausalLM`` (or ``HFValueModel`` when ``value``) that ``args`` describe."""
    transformers = _transformers()
    config = _config(args, vocab_size, special_ids)
    if config.vocab_size < vocab_size:
        raise ValueError(
            f"the Hugging Face model has a vocabulary of {config.vocab_size} tokens, fewer "
            f"than the tokenizer's {vocab_size}; raise vocab_size in its config"
        )
    if args.get("disable_dropout", True):
        _disable_dropout(config)
    path = args.get("hf_model")
    pretrained = path is not None and any(
        os.path.exists(os.path.join(str(path), name)) for name in WEIGHT_FILES
    )
    auto = transformers.AutoModel if value else transformers.AutoModelForCausalLM
    sizing = torch.empty(0).is_meta  # the compiler counts parameters under torch.device("meta")
    if pretrained and not sizing:
        network = auto.from_pretrained(str(path), config=config, local_files_only=True)
    else:
        network = auto.from_config(config)
    return HFValueModel(network) if value else HFCausalLM(network)


def _disable_dropout(config) -> None:
    """Dropout probabilities of ``config`` set to 0: with dropout on, the sampled answers'
    log-probs and the trainer's would differ by noise (TRL and OpenRLHF turn it off too)."""
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


class HFTokenizer:
    """A ``transformers`` tokenizer from a local directory with ``CharTokenizer``'s
    interface (``batch``, ``decode``, ``pad_id``/``bos_id``/``eos_id``, ``vocab_size``).
    Without a pad token it pads with the end-of-sequence token."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        try:
            self.tok = _transformers().AutoTokenizer.from_pretrained(
                self.path, local_files_only=True
            )
        except (OSError, ValueError) as error:  # missing files, or files of no tokenizer
            raise FileNotFoundError(
                f"args.hf_tokenizer: no tokenizer in {self.path!r} "
                f"({str(error).strip().splitlines()[0]}); save one there "
                "with tokenizer.save_pretrained() or leave hf_tokenizer out to use the "
                "CharTokenizer"
            ) from None
        if self.tok.eos_token_id is None:
            raise ValueError(
                f"the tokenizer in {self.path!r} has no end-of-sequence token, so answers "
                "could not stop; set tokenizer.eos_token before saving it"
            )
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def batch(self, texts, side: str = "left", add_special_tokens: bool = True):
        encoded = [self.tok.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        return pad_batch(encoded, self.pad_id, side)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def chat_prompts(self, prompts) -> list[str]:
        """Each prompt as the one user turn of a chat in the tokenizer's chat template,
        the assistant's turn opened (``add_generation_prompt``): the text to encode with
        ``add_special_tokens=False``, as the template holds the special tokens it wants."""
        return [
            self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            for prompt in prompts
        ]

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first end-of-sequence token, without special tokens."""
        kept = []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            kept.append(i)
        return self.tok.decode(kept, skip_special_tokens=True)

    def __str__(self) -> str:
        return f"HFTokenizer({self.vocab_size} tokens from {self.path})"


def tokenizer_path(args: dict) -> str | None:
    """The directory ``args.hf_tokenizer`` names (``true``: the ``hf_model`` directory)."""
    choice = args.get("hf_tokenizer")
    if choice is None or choice is False:
        return None
    if choice is True:
        if "hf_model" not in args:
            raise ValueError("args.hf_tokenizer: true reads the tokenizer of args.hf_model, "
                             "which is not set; give hf_tokenizer a directory instead")  # fmt: skip
        return str(args["hf_model"])
    return str(choice)


class HFCache:
    """The running attention mask and ``transformers``' own cache of past keys/values."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.past = None


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM with ``TinyGPT``'s call: ``model(ids, mask, cache)``
    gives logits ``[B, T, vocab]`` (``logits_from=k``: of positions ``k`` on only);
    ``new_cache`` starts a cache for ``generate``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def new_cache(self, batch: int, length: int) -> HFCache:
        return HFCache()

    def forward(
        self, input_ids, attention_mask=None, cache: HFCache | None = None, logits_from: int = 0
    ):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = input_ids.shape[1] - logits_from  # transformers' logits_to_keep: the last ones
        if cache is None:
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=mask_positions(attention_mask),
                use_cache=False,
                logits_to_keep=keep,
            )
            return out.logits
        full = attention_mask if cache.mask is None else torch.cat([cache.mask, attention_mask], 1)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=full,
            position_ids=mask_positions(full)[:, -input_ids.shape[1] :],
            past_key_values=cache.past,
            use_cache=True,
            logits_to_keep=keep,
        )
        cache.mask, cache.past = full, out.past_key_values
        return out.logits


class HFValueModel(nn.Module):
    """A ``transformers`` base model (no LM head) with a zero-initialised scalar head: one
    value per position, like ``ValueGPT``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=mask_positions(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden).squeeze(-1)
