"""Datasets from files: every format draws the rows a list of them would, runs on a file
train exactly as on the list, runtime.data_path / eval_data_path override the script's
data, and unreadable files are named with their cause."""

import json

import datasets
import pytest

import flowgraph
from flowgraph import Engine, Environment, Evaluator
from flowgraph.data import Dataset
from flowgraph.errors import ConfigError, DataError, EngineError
from flowgraph.rl.tasks import digit_prompts
from test_examples import load_example

ROWS = [
    {"prompt": p, "solution": str(i), "weight": i / 10}
    for i, p in enumerate(digit_prompts(23, seed=3))
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write(tmp_path, kind, rows=ROWS):
    """``rows`` as a dataset of ``kind`` under ``tmp_path``; returns its path."""
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "saved":
        table.save_to_disk(str(path))
    elif kind == "saved_dict":
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved", "saved_dict"])
def test_a_file_draws_what_the_list_of_its_rows_draws(tmp_path, kind):
    from_file = Dataset(write(tmp_path, kind), seed=5)
    from_list = Dataset(ROWS, seed=5)
    assert len(from_file) == len(ROWS)
    # Three passes: the seeded shuffle of every pass, and the rows' values and types.
    assert from_file.draw(7, 60) == from_list.draw(7, 60)
    assert type(from_file.draw(0, 1)[0]["weight"]) is float


def test_csv_columns_are_text(tmp_path):
    rows = [{"prompt": "0042", "n": 1}]
    drawn = Dataset(write(tmp_path, "csv", rows), seed=0).draw(0, 1)
    assert drawn == [{"prompt": "0042", "n": "1"}]  # not 42: a digit prompt stays a prompt


def test_a_file_is_memory_mapped_not_loaded(tmp_path):
    dataset = Dataset(write(tmp_path, "jsonl"), seed=0)
    files = dataset.samples.table.cache_files
    assert files and all(f["filename"].endswith(".arrow") for f in files)
    assert f"{len(ROWS)} samples from" in str(dataset)


def test_the_eval_set_of_a_file_is_read_in_order(tmp_path):
    rows = Dataset(write(tmp_path, "parquet"), seed=0).samples
    assert rows[2:5] == ROWS[2:5] and list(rows) == ROWS


def grpo_records(tmp_path, name, *overrides, data=None):
    """Records of examples/grpo.py's 2 tiny episodes with eval (its own data unless
    ``runtime.data_path`` is among ``overrides``)."""
    grpo = load_example("grpo")
    settings = ["runtime.num_episode=2", "runtime.sample_per_episode=8",
                "runtime.generation_batch_size=8", "runtime.train_global_batch_size=64",
                "runtime.eval_episode_interval=1", "runtime.log_episodes=false",
                "runtime.progress=false", f"runtime.log_dir={tmp_path / name}"]  # fmt: skip
    if data is not None:
        grpo.engine.set_dataset(data)
    return [(r.episode, r.metrics) for r in grpo.main([*settings, *overrides])]


def test_examples_train_on_a_file_exactly_as_on_its_rows(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p} for p in digit_prompts(8192, 0)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in digit_prompts(64, 1)])
    from_lists = grpo_records(tmp_path, "lists")
    from_files = grpo_records(tmp_path, "files", f"runtime.data_path={train}",
                              f"runtime.eval_data_path={evals}")  # fmt: skip
    assert from_files == from_lists
    assert "eval/score" in dict(from_files)[2]
    # set_dataset(path) in the script itself is the same as the override.
    assert grpo_records(tmp_path, "set", data=str(train)) == from_lists


def test_data_path_overrides_the_scripts_dataset(tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p} for p in digit_prompts(16, 9)])
    from_lists = grpo_records(tmp_path, "lists")
    from_other = grpo_records(tmp_path, "other", f"runtime.data_path={other}")
    assert from_other != from_lists  # other prompts, other rewards


class Echo(flowgraph.TorchModule):
    def setup(self):
        pass

    def forward_step(self, data):
        return dict(data)

    def eval_step(self, data):
        return dict(data)


def echo_engine(with_evaluator=False):
    echo = Echo("echo")
    evaluator = Evaluator(lambda batch: echo.eval_step(batch)) if with_evaluator else None
    return Engine(Environment(lambda batch: echo.forward_step(batch)), evaluator=evaluator)


@pytest.mark.parametrize(
    ("content", "name", "pattern"),
    [
        (None, "missing.jsonl", r"dataset '.*missing.jsonl' does not exist \(formats: .jsonl"),
        ("x", "prompts.txt", r"unknown file type '.txt'; use .jsonl, .json, .parquet, .csv"),
        ('{"prompt": "1"}\n{"prompt": oops}\n', "bad.jsonl",
         r"bad.jsonl: cannot read it: JSON parse error: Invalid value. in row 1"),
        ("", "empty.jsonl", r"empty.jsonl is an empty file"),
        ('{"prompt": "1", "n": 1}\n{"prompt": "2", "n": "two"}\n', "mixed.jsonl",
         r"mixed.jsonl sample 1 key 'n' holds a str \(str\), sample 0's a number"),
    ],
)  # fmt: skip
def test_unreadable_files_are_named_with_their_cause(tmp_path, content, name, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        Dataset(path, seed=0)


def test_a_directory_that_is_no_saved_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="not one written by datasets.Dataset.save_to_disk"):
        echo_engine().set_dataset(tmp_path)


def test_a_saved_dataset_dict_without_train_split_names_its_splits(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"holds the splits \['a', 'b'\]; pass one split's"):
        Dataset(tmp_path / "d", seed=0)


def test_a_missing_file_is_refused_at_set_dataset(tmp_path):
    with pytest.raises(DataError, match="Engine dataset .* does not exist"):
        echo_engine().set_dataset(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="Evaluator dataset .* does not exist"):
        Evaluator(lambda batch: Echo("e").eval_step(batch)).set_dataset(tmp_path / "x.csv")


def test_a_bad_data_path_setting_is_named(tmp_path):
    flowgraph.init({"runtime": {"data_path": str(tmp_path / "nope.jsonl"), "log_episodes": False}})
    with pytest.raises(DataError, match="runtime.data_path .*nope.jsonl' does not exist"):
        echo_engine().learn()


def test_data_path_alone_is_training_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    flowgraph.init({"runtime": {"data_path": str(path), "sample_per_episode": 2,
                                "log_episodes": False, "progress": False}})  # fmt: skip
    assert len(echo_engine().learn()) == 1
    flowgraph.init({"runtime": {"log_episodes": False}})
    with pytest.raises(EngineError, match="set_dataset.*or set runtime.data_path=FILE"):
        echo_engine().learn()


def test_eval_data_path_needs_an_evaluator(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    flowgraph.init({"runtime": {"eval_data_path": str(path), "log_episodes": False}})
    with pytest.raises(
        ConfigError, match="eval_data_path is set, but this Engine has no Evaluator"
    ):
        echo_engine().set_dataset(["a"]).learn()


def test_the_data_fingerprint_is_the_rows_not_their_source(tmp_path):
    from_file = Dataset(write(tmp_path, "parquet"), seed=0).fingerprint()
    assert from_file == Dataset(ROWS, seed=1).fingerprint()
    assert from_file != Dataset(ROWS[:-1], seed=0).fingerprint()
    assert from_file != Dataset([*ROWS[:-1], {**ROWS[-1], "solution": "x"}], 0).fingerprint()
