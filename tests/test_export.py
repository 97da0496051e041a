"""flowc export: a checkpoint's model in Hugging Face format, loaded back by transformers
with the same logits, the same token ids and the same greedy answers.

Run as a script, this file is the DeepSpeed job of the ZeRO test (under torchrun)::

    torchrun --standalone --nproc-per-node 2 tests/test_export.py OUT_DIR ZERO_STAGE
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

import flowgraph
from flowgraph import DeepSpeedModule, Engine, Environment, Trainer
from flowgraph.cli import main
from flowgraph.export import ExportError, char_tokenizer_fast, export
from flowgraph.rl import hf
from flowgraph.rl.gpt import GPTConfig, TinyGPT, ValueGPT
from flowgraph.rl.modules import GPTModule, PolicyInference, prompt_length
from flowgraph.rl.ppo import masked_mean
from flowgraph.rl.sampling import generate, response_logits, token_logprobs
from flowgraph.rl.tasks import digit_prompts
from flowgraph.rl.tokenizer import CharTokenizer
from flowgraph.runtime.checkpoint import CheckpointStore
from spmd import run_command, torchrun
from test_examples import EXAMPLES, QUIET, load_example
from test_rl_hf import save_char_tokenizer

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"  # examples/grpo.yaml's
TINY = {"n_layer": 2, "n_head": 4, "n_embd": 32}
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 16}
# One short GRPO episode, checkpointed: prompts of up to 4 tokens, answers of up to 8.
ONE_EPISODE = [*QUIET, "runtime.num_episode=1", "runtime.sample_per_episode=4",
               "runtime.num_inference_per_prompt=2", "runtime.generation_batch_size=4",
               "runtime.train_micro_batch_size=8", "runtime.train_global_batch_size=8",
               "runtime.eval_episode_interval=0", "runtime.enable_eval_before_training=false",
               "runtime.save_episode_interval=1"]  # fmt: skip
ROLES = ("policy", "reference", "grpo_policy")


def grpo_checkpoint(directory: Path, *settings: str, config: str = "grpo.yaml") -> Path:
    """examples/grpo.py run for one episode, its checkpoint_dir in ``directory``."""
    load_example("grpo").main(["--config", str(EXAMPLES / config), *ONE_EPISODE,
                               f"runtime.checkpoint_dir={directory}", *settings])  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    small = [f"models.{m}.args.{k}={v}" for m in ROLES for k, v in TINY.items()]
    return grpo_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", *small)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    small = [f"models.{m}.args.hf_config={json.dumps(GPT2)}" for m in ROLES]
    return grpo_checkpoint(tmp_path_factory.mktemp("gpt2") / "ckpt", *small, config="grpo_hf.yaml")


def trained_tinygpt(ckpt: Path, name: str = "grpo_policy") -> TinyGPT:
    """The TinyGPT of the run, rebuilt here by hand (vocab: 3 specials + 36 characters;
    context: prompt_length 4 + response_length 8)."""
    model = TinyGPT(GPTConfig(vocab_size=39, max_seq_len=12, **TINY))
    state = torch.load(ckpt / "episode_000001" / f"model_{name}.pt", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


def random_ids(rows: int, width: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(0))


# -- TinyGPT -> GPT2LMHeadModel ------------------------------------------------------------
def test_a_tinygpt_exports_as_gpt2_with_the_same_logits(tiny_run, tmp_path):
    exported = export(tiny_run, "grpo_policy", tmp_path / "hf")
    assert str(exported).endswith(f"to {tmp_path / 'hf'} as GPT2LMHeadModel")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["episode"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(model, transformers.GPT2LMHeadModel)
    ours = trained_tinygpt(tiny_run)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the init_seed: what rebuilding without the checkpoint gives
        initial = TinyGPT(ours.config)
    assert not torch.equal(initial.lm_head.weight, ours.lm_head.weight)  # it trained
    ids = random_ids(3, 12, 39)  # every position of the context
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_the_exported_tokenizer_gives_the_char_tokenizers_ids(tiny_run, tmp_path):
    export(tiny_run, "grpo_policy", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = CharTokenizer(ALPHABET)
    for text in ["", "42", "0123456789", "count9up", ALPHABET[::-1]]:
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(theirs.encode(text)) == text
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (0, 1, 2)
    ids, mask = ours.batch(["42", "7"], side="left")
    batch = theirs(["42", "7"], padding=True)
    assert batch["input_ids"] == ids.tolist() and batch["attention_mask"] == mask.tolist()
    assert theirs.decode([7, 5, 2, 0], skip_special_tokens=True) == ours.decode([7, 5, 2, 0])


def test_an_alphabet_of_spaces_punctuation_and_newlines_keeps_its_ids(tmp_path):
    ours = CharTokenizer("ab c.,\n")
    char_tokenizer_fast(ours, max_length=32).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["a b", "  ", "c.\n\n,a", "\n", "a  ,  b."]:
        assert theirs.encode(text) == ours.encode(text), repr(text)
        assert theirs.decode(theirs.encode(text)) == text, repr(text)
    assert theirs.model_max_length == 32


def test_transformers_greedy_generation_gives_flowgraphs_greedy_answers(tiny_run, tmp_path):
    export(tiny_run, "grpo_policy", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = trained_tinygpt(tiny_run)
    ids, mask = CharTokenizer(ALPHABET).batch(["123", "4", "70", "abc"])  # left-padded
    mine = generate(ours, ids, mask, max_new_tokens=8, temperature=0.0, stop_tokens=[2])
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    theirs = torch.nn.functional.pad(theirs, (0, mine.sequences.shape[1] - theirs.shape[1]))
    assert torch.equal(theirs, mine.sequences), (theirs, mine.sequences)


# -- Hugging Face policies -------------------------------------------------------------------
def test_a_hugging_face_policy_exports_as_itself(gpt2_run, tmp_path):
    print(export(gpt2_run, "grpo_policy", tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(model, transformers.GPT2LMHeadModel)
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    ours = hf.build({"hf_config": GPT2}, value=False, vocab_size=39, special_ids=special)
    state = torch.load(gpt2_run / "episode_000001" / "model_grpo_policy.pt", weights_only=True)
    ours.load_state_dict(state["model"])
    ids = random_ids(2, 12, 39)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours.eval()(ids), atol=1e-5, rtol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode("count42") == CharTokenizer(ALPHABET).encode("count42")


# -- the command line and its errors ---------------------------------------------------------
def flowc(capsys, *argv):
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_flowc_export_writes_and_replaces_only_with_force(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf"
    code, printed, _ = flowc(capsys, tiny_run, "--model", "grpo_policy", "--out", out)
    assert code == 0 and "as GPT2LMHeadModel" in printed
    code, _, err = flowc(capsys, tiny_run, "--model", "grpo_policy", "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert "is not empty; pass --force to replace it" in err
    (out / "stale.txt").write_text("from before")
    code, _, _ = flowc(capsys, tiny_run, "--model", "grpo_policy", "--out", out, "--force")
    assert code == 0 and not (out / "stale.txt").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary dirs left


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("grpo_polcy", "has no model 'grpo_polcy'; did you mean 'grpo_policy'? (saved models: "),
        ("policy", "policy is in the run's config but its weights are not saved there"),
        ("reward", "model reward has no weights"),
    ],
)
def test_a_model_the_checkpoint_cannot_give_is_one_line_with_the_fix(
    tiny_run, tmp_path, capsys, model, message
):
    code, _, err = flowc(capsys, tiny_run, "--model", model, "--out", tmp_path / "hf")
    assert code == 2 and err.startswith("flowc: ExportError: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "hf").exists()


def test_the_newest_complete_checkpoint_is_used_and_a_damaged_one_named(tiny_run, tmp_path):
    runs = tmp_path / "ckpt"
    shutil.copytree(tiny_run, runs)
    for episode in (4, 5):  # copies of episode 1 that say they are episodes 4 and 5
        copy = runs / f"episode_00000{episode}"
        shutil.copytree(runs / "episode_000001", copy)
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({**meta, "episode": episode}))
    damaged = runs / "episode_000005"
    (damaged / "model_grpo_policy.pt").write_bytes(b"cut")
    assert export(runs, "grpo_policy", tmp_path / "a").checkpoint.episode == 4
    with pytest.raises(ExportError, match="episode_000005 cannot be exported: model_grpo_policy"
                       r".pt has 3 bytes, \d+ were written \(truncated\)"):  # fmt: skip
        export(damaged, "grpo_policy", tmp_path / "b")
    shutil.copytree(runs / "episode_000001", runs / "episode_000003.tmp")
    with pytest.raises(
        ExportError, match="episode_000003.tmp cannot be exported: it is unfinished"
    ):
        export(runs / "episode_000003.tmp", "grpo_policy", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint in .*runtime.checkpoint_dir"):
        export(tmp_path / "empty", "grpo_policy", tmp_path / "d")
    with pytest.raises(ExportError, match="does not exist: pass a run's runtime.checkpoint_dir"):
        export(tmp_path / "nowhere", "grpo_policy", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ckpt", "empty"]


def test_a_failed_export_leaves_out_as_it_was(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("previous model")

    def breaks(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("flowgraph.export.char_tokenizer_fast", breaks)
    with pytest.raises(OSError, match="disk full"):
        export(tiny_run, "grpo_policy", out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the temporary dir is gone


def test_an_out_that_is_a_file_or_holds_the_checkpoint_is_refused(tiny_run, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="--out .*file is a file; name a directory"):
        export(tiny_run, "grpo_policy", tmp_path / "file")
    with pytest.raises(ExportError, match="holds the checkpoint being exported"):
        export(tiny_run, "grpo_policy", tiny_run.parent, force=True)
    assert (tiny_run / "latest").is_file()


def test_without_transformers_the_error_says_what_to_install(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ExportError, match=r"needs the transformers package: pip install "):
        export(tiny_run, "grpo_policy", tmp_path / "hf")


# -- checkpoints of networks flowc export cannot convert -----------------------------------
def handmade_checkpoint(directory: Path, network: torch.nn.Module, args: dict) -> Path:
    """A checkpoint as a run writes it, holding ``network`` as model ``trainer``."""
    config = {"runtime": {"prompt_length": 4, "response_length": 4},
              "models": {"trainer": {"args": args}}}  # fmt: skip
    meta = {"fingerprint": "f", "models": ["trainer"], "config": config, "history": []}
    state = {"model": network.state_dict()}
    CheckpointStore(directory, keep=1).save(1, lambda d: torch.save(state, d / "model_trainer.pt"),
                                            meta)  # fmt: skip
    return directory


@pytest.mark.parametrize(
    ("network", "args", "message"),
    [
        (ValueGPT(GPTConfig(13, 1, 2, 8, 8)), {"n_layer": 1, "n_embd": 8},
         "model trainer is a value model .* export a policy or its trainer"),
        (torch.nn.Linear(3, 2), {}, r"a network flowc export does not know \(weights bias, "
         r"weight, ...\): it converts flowgraph.rl's TinyGPT and Hugging Face policies"),
        (TinyGPT(GPTConfig(13, 1, 2, 8, 8)), {"n_layer": 1, "n_embd": 16},
         r"the weights of trainer do not fit the network its saved models.trainer.args "
         r"describe \(Error\(s\) in loading state_dict for TinyGPT: size mismatch"),
        (TinyGPT(GPTConfig(13, 1, 2, 8, 8)), {"n_layer": 1, "n_embd": 8, "hf_config": GPT2},
         "holds a TinyGPT but its saved models.trainer.args name a Hugging Face model"),
    ],
    ids=["value-model", "custom-network", "args-do-not-fit", "args-of-the-other-kind"],
)  # fmt: skip
def test_a_network_that_cannot_be_converted_is_named_with_the_reason(
    tmp_path, network, args, message
):
    ckpt = handmade_checkpoint(tmp_path / "ckpt", network, args)
    with pytest.raises(ExportError, match=message):
        export(ckpt, "trainer", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_tinygpt_with_large_weights_exports_with_the_same_logits(tmp_path):
    # the shape comes from the args as the run used them: max_seq_len from the runtime
    network = TinyGPT(GPTConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=8, max_seq_len=8))
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():  # 15 times the initial weights: the exact GELU matters (by 8e-5)
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=draw) * 0.3)
    ckpt = handmade_checkpoint(tmp_path / "ckpt", network, {"n_layer": 1, "n_embd": 8})
    export(ckpt, "trainer", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(2, 8, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, network.eval()(ids), atol=1e-5, rtol=1e-5)


def test_a_hugging_face_tokenizer_is_saved_as_it_is(tmp_path):
    save_char_tokenizer(tmp_path / "tok")
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    original.chat_template = "{{ messages[0]['content'] }}="  # only the original has one
    original.save_pretrained(tmp_path / "tok")
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    network = hf.build({"hf_config": GPT2}, value=False, vocab_size=13, special_ids=special)
    args = {"hf_config": GPT2, "hf_tokenizer": str(tmp_path / "tok")}
    export(handmade_checkpoint(tmp_path / "ckpt", network, args), "trainer", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.chat_template == original.chat_template
    assert theirs.get_vocab() == original.get_vocab()
    assert theirs.encode("3907") == original.encode("3907")


# -- DeepSpeed ZeRO ------------------------------------------------------------------------
class ZeroSFT(GPTModule, DeepSpeedModule):
    """A TinyGPT trained by DeepSpeed: likelihood of the policy's own answers."""

    def train_step(self, micro_batches):
        for mb in micro_batches:
            p = prompt_length(mb)
            logits = response_logits(self.engine, mb["sequences"], mb["attention_mask"], p)
            loss = -masked_mean(token_logprobs(logits, mb["sequences"], p), mb["response_mask"])
            self.engine.backward(loss)
            self.engine.step()
        return {"loss": loss.item()}


def zero_job(out: Path, zero_stage: int) -> None:
    policy, trainer = PolicyInference("policy"), ZeroSFT("trainer")
    args = {**TINY, "lr": 0.01}
    flowgraph.init({
        "runtime": {"num_episode": 1, "sample_per_episode": 8, "generation_batch_size": 4,
                    "train_micro_batch_size": 2, "train_global_batch_size": 8,
                    "prompt_length": 4, "response_length": 4, "save_episode_interval": 1,
                    "checkpoint_dir": str(out / "ckpt"), "colocation": [["trainer", "policy"]],
                    "log_episodes": False, "progress": False},
        "models": {"policy": {"num_gpu": 2, "args": args},
                   "trainer": {"num_gpu": 2, "backend": "deepspeed", "zero_stage": zero_stage,
                               "args": args}},
    })  # fmt: skip
    engine = Engine(
        Environment(lambda batch: policy.forward_step(batch)),
        Trainer(lambda batch: trainer.train_step(batch)),
    )
    engine.set_parameter_sync(trainer, policy).set_dataset(digit_prompts(64, seed=0))
    engine.learn()
    if torch.distributed.get_rank() == 0:  # the policy holds the trainer's synced weights
        torch.save(policy.model.state_dict(), out / "trained.pt")


@pytest.mark.slow  # two processes (about 10 s on 2 idle cores)
@pytest.mark.parametrize("zero_stage", [3, 0])
def test_a_deepspeed_trainers_weights_are_gathered_from_its_shards(tmp_path, zero_stage):
    done = run_command(torchrun(2, __file__, str(tmp_path), str(zero_stage)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = tmp_path / "ckpt" / "episode_000001" / "deepspeed_trainer" / "state"
    shards = sorted(p.name for p in state.glob("zero_pp_rank_*_model_states.pt"))
    assert len(shards) == (2 if zero_stage == 3 else 0)  # ZeRO-3: one part per rank
    export(tmp_path / "ckpt", "trainer", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = TinyGPT(GPTConfig(vocab_size=13, max_seq_len=8, **TINY))
    ours.load_state_dict(torch.load(tmp_path / "trained.pt", weights_only=True))
    ids = random_ids(2, 8, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours.eval()(ids), atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    zero_job(Path(sys.argv[1]), int(sys.argv[2]))
