"""DPO: the loss against values worked out by hand, the pair layout, the ready modules and
their mistakes, the counting task's preference file, and examples/dpo.py learning."""

import json
import math

import pytest
import torch

import flowgraph
from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.data import Dataset
from flowgraph.errors import ConfigError, DataError
from flowgraph.rl.dpo import dpo_loss, sequence_logprobs
from flowgraph.rl.gpt import GPTConfig, TinyGPT
from flowgraph.rl.modules import PolicyInference, RewardInference
from flowgraph.rl.preference import (
    DPOReference,
    DPOTrainer,
    encode_pairs,
    pair_answers,
    pair_logprobs,
)
from flowgraph.rl.sampling import token_logprobs
from flowgraph.rl.tasks import count_up, count_up_preferences, digit_prompts, write_jsonl
from flowgraph.rl.tokenizer import CharTokenizer
from test_examples import QUIET, load_example, metrics_lines, run_script

TOK = CharTokenizer()  # pad 0, bos 1, eos 2, digit d is d + 3


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------- the math


def test_sequence_logprobs_sum_or_average_the_real_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -50.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert sequence_logprobs(logprobs, mask).tolist() == [-3.0, -1.5]
    assert sequence_logprobs(logprobs, mask, average=True).tolist() == [-1.5, -0.5]
    # a pair axis: [B, 2, R] -> [B, 2]
    assert sequence_logprobs(logprobs[None], mask[None]).shape == (1, 2)


def test_sigmoid_loss_and_its_statistics_by_hand():
    # h = (pi_c - ref_c) - (pi_r - ref_r): row 0: (-1 + 2) - (-3 + 2) = 2; row 1: -1 - 0 = -1
    ref = torch.tensor([-2.0, -1.0])
    loss, stats = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), ref, ref, 0.5)
    # beta h = 1 and -0.5: -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-0.5) = log(1 + e^0.5)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2)
    # implicit rewards 0.5 * (pi - ref): chosen [0.5, -0.5], rejected [-0.5, 0]
    assert stats == pytest.approx(
        {"reward_chosen": 0.0, "reward_rejected": -0.25, "margin": 0.25, "accuracy": 0.5}
    )


def test_label_smoothing_mixes_in_the_flipped_pair():
    # beta h = 1: (1 - 0.1) log(1 + e^-1) + 0.1 log(1 + e^1)
    one = torch.tensor([0.0])
    loss, _ = dpo_loss(one + 2.0, one, one, one, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))


def test_ipo_loss_is_the_squared_distance_to_half_over_beta():
    # 1 / (2 beta) = 2 at beta 0.25: h = 2 costs nothing, h = 0 costs 4, h = 5 costs 9
    zero = torch.zeros(3)
    loss, stats = dpo_loss(torch.tensor([2.0, 0.0, 5.0]), zero, zero, zero, 0.25, loss_type="ipo")
    assert loss.item() == pytest.approx((0 + 4 + 9) / 3)
    assert stats["accuracy"] == pytest.approx(2 / 3)  # h = 0 is not a win


@pytest.mark.parametrize(
    "settings, d_chosen",
    [
        ({"beta": 1.0}, -0.5),  # beta sigmoid(-beta h) = 0.5 at h = 0
        ({"beta": 1.0, "label_smoothing": 0.1}, -0.4),  # (1 - 2 * 0.1) * 0.5
        ({"beta": 0.25, "loss_type": "ipo"}, -4.0),  # 2 (h - 1 / (2 beta)) at h = 0
    ],
)
def test_the_gradient_raises_the_chosen_and_lowers_the_rejected(settings, d_chosen):
    chosen, rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.zeros(1), torch.zeros(1), **settings)
    loss.backward()
    assert chosen.grad.item() == pytest.approx(d_chosen)  # descent raises log p(chosen)
    assert rejected.grad.item() == pytest.approx(-d_chosen)


@pytest.mark.parametrize(
    "settings, pattern",
    [
        ({"loss_type": "hinge"}, "loss_type 'hinge' is unknown; use one of sigmoid, ipo"),
        ({"beta": 0.0}, "beta must be above 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing .* in \[0, 0.5\), got 0.5"),
        ({"label_smoothing": 0.1, "loss_type": "ipo"}, "applies to the sigmoid loss only"),
    ],
)
def test_dpo_loss_refuses_settings_it_cannot_use(settings, pattern):
    zero = torch.zeros(1)
    with pytest.raises(ValueError, match=pattern):
        dpo_loss(zero, zero, zero, zero, **settings)


# ------------------------------------------------------------------------------ pair batches


def test_pairs_are_laid_out_like_sampled_answers_with_a_pair_axis():
    rows = {"prompt": ["12", "3"], "chosen": ["456", "7"], "rejected": ["9", ""]}
    pairs = encode_pairs(TOK, rows, prompt_length=3, response_length=3)
    assert pairs["sequences"].shape == (2, 2, 6) and pairs["response_mask"].shape == (2, 2, 3)
    # Prompts left-padded to 3; a response of exactly response_length has no eos (like an
    # answer cut at the limit), a shorter one ends with eos (2); then padding (0).
    assert pairs["sequences"].tolist() == [
        [[0, 4, 5, 7, 8, 9], [0, 4, 5, 12, 2, 0]],
        [[0, 0, 6, 10, 2, 0], [0, 0, 6, 2, 0, 0]],
    ]
    assert pairs["attention_mask"].tolist() == [
        [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]],
        [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]],
    ]
    assert pairs["response_mask"].dtype == torch.float32
    assert pairs["response_mask"].sum(-1).tolist() == [[3.0, 2.0], [2.0, 1.0]]


def test_pair_logprobs_are_each_sequence_s_own():
    torch.manual_seed(0)
    gpt = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16,
                            max_seq_len=16))  # fmt: skip
    rows = {"prompt": ["12", "3456"], "chosen": ["7", "89"], "rejected": ["0123", "4"]}
    pairs = encode_pairs(TOK, rows, prompt_length=4, response_length=4)
    got = pair_logprobs(gpt, pairs)
    for b, prompt in enumerate(rows["prompt"]):
        for i, key in enumerate(("chosen", "rejected")):
            response = TOK.encode(rows[key][b])
            tokens = TOK.encode(prompt) + response + ([TOK.eos_id] if len(response) < 4 else [])
            ids = torch.tensor([tokens])  # unpadded, alone
            alone = token_logprobs(gpt(ids), ids, len(prompt)).sum()
            assert got[b, i].item() == pytest.approx(alone.item(), abs=1e-5), (b, key)


def test_a_sample_without_chosen_names_the_column_and_the_fix():
    rows = {"prompt": ["12"], "answer": ["34"], "rejected": ["5"]}
    with pytest.raises(DataError, match="no 'chosen' column .*give every row of the dataset"):
        encode_pairs(TOK, rows, 2, 4, where="reference.forward_step")


def test_a_column_that_is_not_text_is_named():
    rows = {"prompt": ["12"], "chosen": [34], "rejected": ["5"]}
    with pytest.raises(DataError, match="column 'chosen' holds a int .*hold text"):
        encode_pairs(TOK, rows, 2, 4)


def test_a_response_longer_than_response_length_names_the_setting():
    rows = {"prompt": ["1", "2"], "chosen": ["3", "4"], "rejected": ["5", "67890"]}
    with pytest.raises(DataError, match="rejected response '67890' is 5 tokens, longer than "
                                        "runtime.response_length=4; raise"):  # fmt: skip
        encode_pairs(TOK, rows, 2, 4)


def test_a_prompt_longer_than_prompt_length_names_the_setting():
    rows = {"prompt": ["123"], "chosen": ["4"], "rejected": ["5"]}
    with pytest.raises(DataError, match="prompt '123' is 3 tokens, .*runtime.prompt_length=2"):
        encode_pairs(TOK, rows, 2, 4)


# ------------------------------------------------------------------------------ the modules

RUNTIME = {"prompt_length": 4, "response_length": 4, "sample_per_episode": 4,
           "train_micro_batch_size": 2, "train_global_batch_size": 4}  # fmt: skip
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "init_seed": 0}
ROWS = {"prompt": ["12", "3456", "7", "89"], "chosen": ["3", "7890", "89", "01"],
        "rejected": ["5", "1", "0", "99"]}  # fmt: skip


def module(kind, name, args=None, trainable=False):
    flowgraph.init({"runtime": RUNTIME, "models": {name: {"args": {**TINY, **(args or {})}}}})
    model = kind(name)
    model.config = flowgraph.config.current_config()
    model.trainable = trainable
    return model


def reference_rows():
    reference = module(DPOReference, "reference")
    reference.setup()
    return reference.forward_step(dict(ROWS))


def test_the_reference_adds_pairs_and_its_log_probs_and_keeps_other_columns():
    out = reference_rows()
    assert out["prompt"] == ROWS["prompt"]  # other columns pass through
    assert out["sequences"].shape == (4, 2, 8)
    assert out["ref_chosen_logps"].shape == out["ref_rejected_logps"].shape == (4,)
    assert (out["ref_chosen_logps"] < 0).all()


def test_one_micro_batch_or_two_unequal_ones_give_the_same_step_and_metrics():
    batch = reference_rows()
    steps = {}
    for bounds in ([0, 4], [0, 3, 4]):
        trainer = module(DPOTrainer, "dpo_policy", {"beta": 0.5}, trainable=True)
        trainer.setup()
        head = trainer.model.lm_head.weight
        with torch.no_grad():  # the policy has moved away from the reference a little
            noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(1))
            head.add_(0.1 * noise)
        mbs = [
            {k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        metrics = trainer.train_step(mbs)
        steps[len(mbs)] = (metrics, [p.detach().clone() for p in trainer.model.parameters()])
    (one, one_params), (two, two_params) = steps[1], steps[2]
    # 3 of 4 pairs won: micro-batches of 3 and 1 rows weigh 3/4 and 1/4 (their plain mean
    # would differ)
    assert one["accuracy"] == 0.75
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    for a, b in zip(one_params, two_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ipo_averages_the_policy_s_and_the_reference_s_log_probs_alike():
    trainer = module(DPOTrainer, "dpo_policy", {"loss_type": "ipo", "beta": 0.25}, True)
    trainer.setup()  # the weights of the reference (init_seed 0): h = 0
    metrics = trainer.train_step([reference_rows()])
    assert metrics["loss"] == pytest.approx(4.0, abs=1e-5)  # (0 - 1 / (2 * 0.25))^2
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)


def test_a_trainer_without_the_reference_s_log_probs_names_the_env_call():
    trainer = module(DPOTrainer, "dpo_policy", trainable=True)
    trainer.setup()
    batch = {k: v for k, v in reference_rows().items() if k != "ref_rejected_logps"}
    with pytest.raises(DataError, match="no ref_rejected_logps; call reference.forward_step"):
        trainer.train_step([batch])


@pytest.mark.parametrize(
    "args, pattern",
    [
        ({"loss_type": "ipo2"}, r"args.loss_type: did you mean 'ipo'\? loss_type 'ipo2' is unk"),
        ({"beta": 0}, r"models.dpo_policy.args.beta: beta must be above 0"),
        ({"beta": "strong"}, r"models.dpo_policy.args.beta: expected a number"),
        ({"label_smoothing": 0.2, "loss_type": "ipo"}, r"args.label_smoothing: .*sigmoid loss"),
        ({"label_smothing": 0.1}, r"args.label_smothing: unknown argument of DPOTrainer"),
    ],
)
def test_trainer_settings_mistakes_name_the_key(args, pattern):
    trainer = module(DPOTrainer, "dpo_policy", args, trainable=True)
    with pytest.raises(ConfigError, match=pattern):
        trainer.setup()


# ------------------------------------------------------------------------------ online pairs


def scored_answers():
    """Four prompts answered twice (rows 2i, 2i+1), as policy + reward give them."""
    rows = {"prompt": ["12", "34", "56", "78"], "chosen": ["7", "89", "0", "1"],
            "rejected": ["1", "2", "3", "4"]}  # fmt: skip
    pairs = encode_pairs(TOK, rows, prompt_length=4, response_length=4)
    flat = {k: v.reshape(8, -1) for k, v in pairs.items()}  # rows: a0 b0 a1 b1 ...
    return {**flat, "prompt": [p for p in rows["prompt"] for _ in range(2)],
            "answer": [t for pair in zip(rows["chosen"], rows["rejected"], strict=True)
                       for t in pair],
            "old_logprobs": torch.arange(8.0)[:, None].expand(8, 4),
            "score": torch.tensor([1.0, 0.0, 0.25, 0.5, 0.5, 0.5, 0.0, 1.0])}  # fmt: skip


def test_online_pairs_choose_the_better_answer_and_drop_ties():
    data = scored_answers()
    pairs = pair_answers(data)
    # prompt "56" is a tie (0.5, 0.5): no preference, no pair
    assert pairs["prompt"] == ["12", "34", "78"]
    assert pairs["chosen"] == ["7", "2", "4"] and pairs["rejected"] == ["1", "89", "1"]
    assert pairs["chosen_score"].tolist() == [1.0, 0.5, 1.0]
    assert pairs["rejected_score"].tolist() == [0.0, 0.25, 0.0]
    chosen_rows, rejected_rows = [0, 3, 7], [1, 2, 6]
    assert torch.equal(pairs["sequences"][:, 0], data["sequences"][chosen_rows])
    assert torch.equal(pairs["sequences"][:, 1], data["sequences"][rejected_rows])
    assert torch.equal(pairs["response_mask"][:, 1], data["response_mask"][rejected_rows])
    assert pairs["old_logprobs"][:, 0].tolist() == [0.0, 3.0, 7.0]  # the chosen answer's row
    assert "answer" not in pairs and "score" not in pairs


def test_a_batch_of_ties_gives_no_pairs_and_no_log_probs():
    data = scored_answers()
    data["score"] = torch.zeros(8)
    pairs = pair_answers(data)
    assert pairs["sequences"].shape == (0, 2, 8) and pairs["prompt"] == []
    torch.manual_seed(0)
    gpt = TinyGPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=16,
                            max_seq_len=16))  # fmt: skip
    assert pair_logprobs(gpt, pairs).shape == (0, 2)


def test_online_pairs_need_scored_answers_in_twos():
    data = scored_answers()
    with pytest.raises(DataError, match="no score; pairs are made of the policy's answers scored"):
        pair_answers({k: v for k, v in data.items() if k != "score"}, "reference.pair_step")
    odd = {k: v[:7] for k, v in data.items()}
    with pytest.raises(DataError, match="7 answers do not pair up.*num_inference_per_prompt=2"):
        pair_answers(odd)


def test_pair_step_needs_two_answers_per_prompt():
    reference = module(DPOReference, "reference")
    reference.config.runtime.num_inference_per_prompt = 4
    reference.setup()
    with pytest.raises(ConfigError, match="runtime.num_inference_per_prompt is 4; set it to 2"):
        reference.pair_step(scored_answers())


# ------------------------------------------------------------------------- the counting task


def test_count_up_preferences_are_reproducible_and_always_prefer_the_right_answer():
    rows = count_up_preferences(500, seed=3, length=6)
    assert rows == count_up_preferences(500, seed=3, length=6)
    assert rows != count_up_preferences(500, seed=4, length=6)
    for row in rows:
        assert len(row["chosen"]) == len(row["rejected"]) == 6
        assert count_up(row["prompt"], row["chosen"]) == 1.0
        assert count_up(row["prompt"], row["rejected"]) < 1.0
    # from all random (wrong at the first character) to a near miss (wrong at the last)
    wrong_at = [
        next(i for i, (a, b) in enumerate(zip(r["chosen"], r["rejected"], strict=True)) if a != b)
        for r in rows
    ]
    assert set(wrong_at) == set(range(6))


def test_a_written_preference_file_reads_back_as_its_rows(tmp_path):
    rows = count_up_preferences(20, seed=0)
    path = write_jsonl(rows, tmp_path / "sub" / "prefs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert list(Dataset(str(path), seed=0).samples) == rows
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # no temporary left


# ------------------------------------------------------------------------------ the example


def test_dpo_example_learns_the_counting_task_from_a_preference_file(tmp_path):
    dpo = load_example("dpo")
    # fp32: the first step's margins are exactly 0 only where the trainer and the reference
    # compute alike (with bf16 hardware, `auto` is bf16: the trainer's autocast keeps layer
    # norms and softmax in fp32, the bf16 reference does not, and ties become coin flips).
    fp32 = [f"models.{m}.precision=fp32" for m in ("reference", "policy", "dpo_policy")]
    records = dpo.main([*QUIET, *fp32, "runtime.num_episode=4", "runtime.eval_episode_interval=2",
                        f"runtime.log_dir={tmp_path}"])  # fmt: skip
    score = {r.episode: r.metrics["eval/score"] for r in records if "eval/score" in r.metrics}
    accuracy = [r.metrics["dpo_policy/accuracy"] for r in records if r.episode > 0]
    # A random model's greedy answers never count right; four optimizer steps of DPO on
    # 64 pairs each make them count right almost everywhere (1.0 measured).
    assert list(score) == [0, 2, 4] and score[0] < 0.1 and score[4] > 0.9, score
    # The first step's pairs meet a policy equal to the reference (margin 0: no wins);
    # every later step's are new pairs, and the policy prefers the chosen answers of all.
    assert accuracy[0] == 0.0 and min(accuracy[1:]) > 0.9, accuracy
    assert (tmp_path / "preferences-train-2048x8-seed0.jsonl").exists()


def test_dpo_example_names_a_preference_file_without_chosen(tmp_path):
    path = write_jsonl([{"prompt": "1234", "answer": "5678"}], tmp_path / "bad.jsonl")
    dpo = load_example("dpo")
    with pytest.raises(DataError, match="reference.forward_step: the batch has no 'chosen'"):
        dpo.main([*QUIET, "runtime.num_episode=1", f"runtime.data_path={path}",
                  "runtime.enable_eval_before_training=false",
                  f"runtime.log_dir={tmp_path}"])  # fmt: skip


# ------------------------------------------------------------------- a Hugging Face network

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 16}


def save_tokenizer_with_bos(directory):
    """A character-level Hugging Face tokenizer that puts <bos> before every text."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *"0123456789"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    core.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(directory)


def test_a_hugging_face_policy_trains_on_pairs_whose_responses_have_no_bos(tmp_path):
    save_tokenizer_with_bos(tmp_path)
    args = {"hf_config": GPT2, "hf_tokenizer": str(tmp_path)}
    reference = module(DPOReference, "reference", args)
    reference.setup()
    out = reference.forward_step({"prompt": ["12"], "chosen": ["34"], "rejected": ["5"]})
    # "<bos>12" left-padded to 4 (as the policy encodes prompts); the responses continue it
    assert out["sequences"].tolist() == [[[0, 1, 4, 5, 6, 7, 2, 0], [0, 1, 4, 5, 8, 2, 0, 0]]]
    trainer = module(DPOTrainer, "dpo_policy", args, trainable=True)
    trainer.setup()
    metrics = trainer.train_step([out])
    # equal initial weights: the trainer's log-probs are the reference's, loss log 2
    assert metrics["loss"] == pytest.approx(math.log(2)) and metrics["margin"] == 0.0


@pytest.mark.slow
def test_dpo_example_gives_the_same_metrics_on_one_process_and_two_ranks(tmp_path):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}"
        settings = ["runtime.num_episode=2", "runtime.eval_episode_interval=2"]
        settings += ["runtime.progress=false", f"runtime.log_dir={out}"]
        result = run_script("dpo.py", *settings, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = metrics_lines(out)
    one, two = runs[1], runs[2]
    assert [r["episode"] for r in one] == [r["episode"] for r in two] == [0, 1, 2]
    assert ["eval/score" in r["metrics"] for r in two] == [True, False, True]
    for a, b in zip(one, two, strict=True):
        assert set(a["metrics"]) == set(b["metrics"])
        for key, value in a["metrics"].items():  # one all-reduce of a sum apart
            assert b["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------ online DPO

ALPHABET = {"alphabet": "0123456789abcdefghijklmnopqrstuvwxyz", "n_layer": 2, "n_head": 2,
            "n_embd": 64, "init_seed": 0}  # fmt: skip


def online_dpo(episodes, log_dir, trainer=DPOTrainer, prompts=128, pairs_per_step=8):
    """Online DPO as a flow: the policy answers every prompt twice, the rule reward ranks
    the two answers, the trainer does DPO on the pair (ties dropped)."""
    policy, reward = PolicyInference("policy"), RewardInference("reward")
    reference, dpo_policy = DPOReference("reference"), trainer("dpo_policy")

    def env_flow(batch):
        answers = policy.forward_step(batch)
        scored = reward.forward_step(answers)
        return reference.pair_step(scored)

    def trainer_flow(batch):
        dpo_policy.train_step(batch)

    def eval_flow(batch):
        return reward.eval_step(policy.eval_step(batch))

    evaluator = Evaluator(eval_flow).set_dataset(digit_prompts(64, seed=1))
    engine = Engine(Environment(env_flow), Trainer(trainer_flow), evaluator)
    engine.set_parameter_sync(dpo_policy, policy).set_dataset(digit_prompts(4096, seed=0))
    flowgraph.init(
        {
            "runtime": {
                "num_episode": episodes, "sample_per_episode": prompts,
                "num_inference_per_prompt": 2, "generation_batch_size": 32,
                # a random model's two answers mostly tie at 0: few pairs at first
                "train_micro_batch_size": pairs_per_step,
                "train_global_batch_size": pairs_per_step,
                "prompt_length": 4, "response_length": 8, "eval_episode_interval": episodes,
                "enable_eval_before_training": True, "seed": 1, "log_dir": str(log_dir),
                "log_episodes": False, "progress": False,
            },
            "models": {
                "policy": {"args": ALPHABET},
                "reference": {"args": ALPHABET},
                "reward": {"args": {"task": "count_up"}},
                "dpo_policy": {"args": {**ALPHABET, "lr": 3e-3, "beta": 0.1}},
            },
        }
    )  # fmt: skip
    return engine.learn()


# Pairing halves the env's rows (and drops ties), which the runtime reports as filtering.
ONE_PAIR_PER_PROMPT = "ignore:episode .*the env flow returned"


@pytest.mark.filterwarnings(ONE_PAIR_PER_PROMPT)
def test_online_dpo_runs_as_a_flow_and_trains_on_the_ranked_pairs(tmp_path):
    seen = []

    class Recording(DPOTrainer):
        def train_step(self, micro_batches):
            seen.extend(mb["chosen_score"] - mb["rejected_score"] for mb in micro_batches)
            return super().train_step(micro_batches)

    records = online_dpo(1, tmp_path, Recording, prompts=32, pairs_per_step=2)
    assert seen and all((gap > 0).all() for gap in seen)  # the better answer is chosen
    assert 0 < records[-1].metrics["dpo_policy/loss"] < 1


@pytest.mark.slow
@pytest.mark.filterwarnings(ONE_PAIR_PER_PROMPT)
def test_online_dpo_learns_the_counting_task(tmp_path):
    records = online_dpo(12, tmp_path)
    score = {r.episode: r.metrics["eval/score"] for r in records if "eval/score" in r.metrics}
    # From never counting right to about half right after 12 episodes (0.50 measured).
    assert score[0] < 0.05 and score[12] > 0.3, score
