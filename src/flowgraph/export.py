"""Trained models out of a checkpoint in Hugging Face format (``flowc export``).

    flowc export runs/grpo/ckpt --model grpo_policy --out exported/grpo
    flowc export runs/grpo/ckpt/episode_000050 --model grpo_policy --out exported/grpo --force

The source is one checkpoint (an ``episode_*`` directory) or a run's
``runtime.checkpoint_dir``, whose newest complete checkpoint is used (damaged ones are
skipped with a warning, as a resume skips them). The model is rebuilt from the
``models.<name>.args`` that the checkpoint's ``meta.json`` recorded, its saved weights
are loaded into it, and ``--out`` receives what ``transformers`` loads:

- a ``TinyGPT`` becomes the equivalent ``GPT2LMHeadModel`` (the same logits: pre-LN
  blocks, learned positions, fused qkv, exact GELU, an untied LM head without bias);
- a Hugging Face policy (``args.hf_model`` / ``args.hf_config``) is saved as itself;
- a ``CharTokenizer`` becomes a fast tokenizer that gives the same ids for every text of
  its alphabet; an ``args.hf_tokenizer`` is saved as it is;
- a DeepSpeed trainer's weights, split per rank under ZeRO, are gathered with
  DeepSpeed's own ``zero_to_fp32`` (stage 0 keeps them whole).

The directory is written next to ``--out`` and renamed into place at the end, so an
interrupted export leaves no half-written model; an ``export.json`` in it records where
the weights came from.

Example (after ``python examples/grpo.py runtime.checkpoint_dir=runs/grpo/ckpt
runtime.save_episode_interval=10``)::

    exported = export("runs/grpo/ckpt", "grpo_policy", "exported/grpo")
    print(exported)
    # exported grpo_policy (TinyGPT, episode 50 of runs/grpo/ckpt/episode_000050) to
    # exported/grpo as GPT2LMHeadModel
    model = transformers.AutoModelForCausalLM.from_pretrained("exported/grpo")
    tokenizer = transformers.AutoTokenizer.from_pretrained("exported/grpo")
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowgraph.config import Config
from flowgraph.errors import ExportError, FlowgraphError, did_you_mean
from flowgraph.rl import hf
from flowgraph.rl.gpt import TinyGPT
from flowgraph.rl.modules import GPTModule
from flowgraph.rl.tokenizer import CharTokenizer
from flowgraph.runtime.checkpoint import PREFIX, Checkpoint, CheckpointStore
from flowgraph.runtime.resume import RUN_META, foreign_meta

SOURCE_HELP = "pass a run's runtime.checkpoint_dir or one episode_* directory in it"


@dataclass
class Exported:
    """What ``export`` wrote: the directory, the checkpoint and model it came from."""

    path: Path
    checkpoint: Checkpoint
    model: str
    network: str  # what the model was in flowgraph: TinyGPT, or the HF class
    architecture: str  # the transformers class that loads it

    def __str__(self) -> str:
        return (
            f"exported {self.model} ({self.network}, episode {self.checkpoint.episode} of "
            f"{self.checkpoint.path}) to {self.path} as {self.architecture}"
        )


# -- finding the checkpoint and the weights ------------------------------------------------
class _Finder(CheckpointStore):
    """A read-only store that remembers why it skipped each damaged checkpoint."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, keep=0)
        self.skipped: dict[str, str] = {}

    def warn_skipped(self, path: Path, problem: str) -> None:
        self.skipped[path.name] = problem
        super().warn_skipped(path, problem)

    def runs(self) -> list[Checkpoint]:
        """Complete checkpoints of flowgraph runs, newest first."""
        found = []
        for checkpoint in self.candidates():
            foreign = foreign_meta(checkpoint.path, checkpoint.meta, RUN_META)
            if foreign:
                self.warn_skipped(checkpoint.path, foreign)
            else:
                found.append(checkpoint)
        return found


def find_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """The checkpoint ``source`` names: an ``episode_*`` directory, or the newest complete
    one of a run's ``runtime.checkpoint_dir``.

    Example::

        >>> find_checkpoint("/no/such/run")
        Traceback (most recent call last):
        ...
        flowgraph.errors.ExportError: /no/such/run does not exist: pass a run's ...
    """
    path = Path(source)
    if not path.exists():
        raise ExportError(f"{path} does not exist: {SOURCE_HELP}")
    if not path.is_dir():
        raise ExportError(f"{path} is a file, not a checkpoint directory: {SOURCE_HELP}")
    if path.name.startswith(PREFIX) or (path / "meta.json").exists():
        finder = _Finder(path.resolve().parent)
        for checkpoint in finder.runs():
            if checkpoint.path.name == path.resolve().name:
                return checkpoint
        if path.name.endswith(".tmp"):
            problem = "it is unfinished (a run was stopped while writing it)"
        else:
            problem = finder.skipped.get(path.resolve().name, "it is no finished checkpoint")
        raise ExportError(
            f"{path} cannot be exported: {problem}; pass another episode_* directory, or the "
            "run's checkpoint_dir for its newest complete checkpoint"
        )
    finder = _Finder(path)
    found = finder.runs()
    if not found:
        damaged = f" ({len(finder.skipped)} damaged, see the warnings)" if finder.skipped else ""
        raise ExportError(
            f"no complete checkpoint in {path}{damaged}: a run writes them into its "
            "runtime.checkpoint_dir every runtime.save_episode_interval episodes; "
            f"{SOURCE_HELP}"
        )
    return found[0]


def _deepspeed_files(checkpoint: Checkpoint, name: str) -> list[str]:
    return [f for f in checkpoint.meta["files"] if f.startswith(f"deepspeed_{name}/")]


def saved_weights(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """The state dict of model ``name`` in ``checkpoint``, on the CPU; a DeepSpeed
    trainer's ZeRO shards are gathered with ``deepspeed.utils.zero_to_fp32``."""
    saved = list(checkpoint.meta["models"])
    if name not in saved:
        configured = checkpoint.meta["config"].get("models", {})
        if name in configured:
            why = (
                f"{name} is in the run's config but its weights are not saved there: a "
                "checkpoint keeps the trainable models and the inference models that "
                "parameter sync does not refill, so an inference copy of a trainer has the "
                "trainer's weights; export its trainer"
            )
        else:
            why = f"it has no model {name!r}; {did_you_mean(name, saved)}".rstrip("; ")
        raise ExportError(f"{checkpoint}: {why} (saved models: {', '.join(saved)})")
    if _deepspeed_files(checkpoint, name):
        directory = checkpoint.path / f"deepspeed_{name}"
        try:
            state = _gathered(directory)
        except Exception as err:  # noqa: BLE001 - DeepSpeed's own errors, of many kinds
            raise ExportError(
                f"{checkpoint}: the DeepSpeed state of {name} in {directory} cannot be read "
                f"({type(err).__name__}: {' '.join(str(err).split())[:300]})"
            ) from None
    else:
        state = checkpoint.load(f"model_{name}.pt").get("model", {})
    if not state:
        raise ExportError(
            f"{checkpoint}: model {name} has no weights (its module keeps no self.model, "
            "like a rule reward); export a policy or its trainer"
        )
    return state


def _gathered(directory: Path) -> dict[str, torch.Tensor]:
    """The full weights of a DeepSpeed checkpoint (flowgraph saves it with tag ``state``)."""
    if not list((directory / "state").glob("*_optim_states.pt")):  # ZeRO stage 0: whole
        return torch.load(
            directory / "state" / "mp_rank_00_model_states.pt",
            map_location="cpu",
            weights_only=True,
        )["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # its progress lines and bars
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="state")


# -- rebuilding the model ------------------------------------------------------------------
def _kind(name: str, state: dict[str, torch.Tensor]) -> str:
    """``tinygpt`` or ``hf`` (an ``HFCausalLM``), from the names of the saved weights."""
    if "head.weight" in state and any(k.startswith("body.") for k in state):
        raise ExportError(
            f"model {name} is a value model (a scalar head, no language-model head), which "
            "AutoModelForCausalLM cannot hold; export a policy or its trainer"
        )
    if "tok_emb.weight" in state and "lm_head.weight" in state:
        return "tinygpt"
    if any(k.startswith("lm.") for k in state):
        return "hf"
    keys = ", ".join(sorted(state)[:4])
    raise ExportError(
        f"model {name} is a network flowc export does not know (weights {keys}, ...): it "
        "converts flowgraph.rl's TinyGPT and Hugging Face policies; save another network "
        "with its own save_pretrained()"
    )


def rebuild(checkpoint: Checkpoint, name: str, state: dict[str, torch.Tensor]):
    """``(network, tokenizer)`` of model ``name``: built from the ``args`` the checkpoint
    recorded, as ``flowgraph.rl``'s modules build them, with ``state`` loaded."""
    kind = _kind(name, state)
    saved = checkpoint.meta["config"]
    runtime = saved.get("runtime", {})
    lengths = {k: runtime[k] for k in ("prompt_length", "response_length") if k in runtime}
    args = saved.get("models", {}).get(name, {}).get("args", {})
    if kind == "hf" and not hf.wanted(args):
        raise ExportError(
            f"{checkpoint}: model {name} holds a Hugging Face network but its saved "
            f"models.{name}.args name no hf_model or hf_config to rebuild it from"
        )
    if kind == "tinygpt" and hf.wanted(args):
        raise ExportError(
            f"{checkpoint}: model {name} holds a TinyGPT but its saved models.{name}.args "
            "name a Hugging Face model; it was built by a module that does not follow "
            "flowgraph.rl's args"
        )
    module = GPTModule(name)
    module.config = Config(runtime=lengths, models={name: {"args": args}})
    try:
        with torch.random.fork_rng():
            network = module.build_network()
        tokenizer = module.tokenizer
    except (FlowgraphError, ValueError, FileNotFoundError) as err:
        raise ExportError(
            f"{checkpoint}: cannot rebuild {name} from the args the run saved: {err}"
        ) from None
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ExportError(
            f"{checkpoint}: the weights of {name} do not fit the network its saved "
            f"models.{name}.args describe ({detail}); it was built by a module that does not "
            "follow flowgraph.rl's args"
        ) from None
    return network.eval(), tokenizer


# -- converting ------------------------------------------------------------------------------
_GPT2_LAYER = {  # GPT-2 name -> TinyGPT name, within block i; Conv1D ones are transposed
    "ln_1": ("ln1", False),
    "attn.c_attn": ("qkv", True),
    "attn.c_proj": ("proj", True),
    "ln_2": ("ln2", False),
    "mlp.c_fc": ("mlp.0", True),
    "mlp.c_proj": ("mlp.2", True),
}


def gpt2_from_tinygpt(model: TinyGPT, tokenizer: Any):
    """The ``transformers.GPT2LMHeadModel`` that computes ``model``'s logits, with the
    special token ids of ``tokenizer`` (a ``CharTokenizer`` or ``HFTokenizer``).

    GPT-2's Conv1D layers hold ``nn.Linear``'s weights transposed; its ``c_attn`` is the
    fused q, k, v projection in the same order; ``activation_function: gelu`` is the exact
    GELU; no dropout, an untied LM head.

    Example::

        >>> from flowgraph.rl.gpt import GPTConfig
        >>> tiny = TinyGPT(GPTConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=8,
        ...                          max_seq_len=8)).eval()
        >>> gpt2 = gpt2_from_tinygpt(tiny, CharTokenizer())
        >>> ids = torch.tensor([[7, 5, 2]])
        >>> torch.allclose(gpt2(ids).logits, tiny(ids), atol=1e-6)
        True
        >>> type(gpt2).__name__, gpt2.config.n_positions, gpt2.config.eos_token_id
        ('GPT2LMHeadModel', 8, 2)
    """
    transformers = _transformers()
    c = model.config
    config = transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_seq_len,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
        "lm_head.weight": ours["lm_head.weight"],
    }
    for i in range(c.n_layer):
        for theirs, (mine, transposed) in _GPT2_LAYER.items():
            weight = ours[f"blocks.{i}.{mine}.weight"]
            weights[f"transformer.h.{i}.{theirs}.weight"] = (
                weight.t().contiguous() if transposed else weight
            )
            weights[f"transformer.h.{i}.{theirs}.bias"] = ours[f"blocks.{i}.{mine}.bias"]
    gpt2 = transformers.GPT2LMHeadModel(config)
    gpt2.load_state_dict(weights, strict=True)
    return gpt2.eval()


def char_tokenizer_fast(tokenizer: CharTokenizer, max_length: int):
    """A ``transformers`` fast tokenizer with ``tokenizer``'s ids: ``<pad>``, ``<bos>``,
    ``<eos>`` first, one token per alphabet character (any character, newlines too), no
    special token added when encoding, left padding as flowgraph's prompts have.

    Example::

        >>> fast = char_tokenizer_fast(CharTokenizer("0123456789"), max_length=16)
        >>> fast.encode("42"), fast.decode([7, 5, 2], skip_special_tokens=True)
        ([7, 5], '42')
        >>> fast("7")["input_ids"], fast.pad_token_id, fast.eos_token_id
        ([10], 0, 2)
    """
    transformers = _transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*tokenizer.SPECIALS, *tokenizer.alphabet])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    pad, bos, eos = tokenizer.SPECIALS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ExportError(
            "flowc export writes Hugging Face models and needs the transformers package: "
            "pip install 'flowgraph[hf]' (or pip install transformers)"
        ) from None
    return transformers


# -- writing ---------------------------------------------------------------------------------
def _check_out(out: Path, checkpoint: Checkpoint, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; name a directory (it is created)")
    held = checkpoint.path.resolve()
    if out.resolve() == held or out.resolve() in held.parents:
        raise ExportError(
            f"--out {out} holds the checkpoint being exported; write the model elsewhere"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(
            f"--out {out} is not empty; pass --force to replace it, or name a new or empty "
            "directory"
        )


def _publish(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``; a previous ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # put the previous export back
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    source: str | os.PathLike, model: str, out: str | os.PathLike, force: bool = False
) -> Exported:
    """Write model ``model`` of the checkpoint ``source`` names into ``out`` in Hugging
    Face format (see the module docstring); ``force`` replaces a non-empty ``out``."""
    checkpoint = find_checkpoint(source)
    out = Path(out)
    _check_out(out, checkpoint, force)
    transformers = _transformers()
    state = saved_weights(checkpoint, model)
    network, tokenizer = rebuild(checkpoint, model, state)
    if isinstance(network, TinyGPT):
        lm, kind = gpt2_from_tinygpt(network, tokenizer), "TinyGPT"
    else:
        lm = network.lm
        kind = type(lm).__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the published directory
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        lm.save_pretrained(tmp)
        if isinstance(tokenizer, CharTokenizer):
            length = getattr(lm.config, "max_position_embeddings", None) or int(1e30)
            char_tokenizer_fast(tokenizer, length).save_pretrained(tmp)
        else:
            tokenizer.tok.save_pretrained(tmp)
        provenance = {"checkpoint": str(checkpoint.path.resolve()), "episode": checkpoint.episode,
                      "model": model, "network": kind}  # fmt: skip
        (tmp / "export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return Exported(out, checkpoint, model, kind, type(lm).__name__)
