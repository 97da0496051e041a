"""Batches: collate, split, concat, merge; the seeded dataset order; StreamDataset."""

import pytest
import torch

from flowgraph.data import (
    Dataset,
    StreamDataset,
    batch_size,
    collate,
    concat,
    merge_inputs,
    select,
    split,
)
from flowgraph.errors import BatchMergeError, DataError


def test_collate_stacks_equal_tensors_and_lists_the_rest():
    batch = collate(
        [
            {"x": torch.zeros(3), "ids": torch.tensor([1, 2]), "text": "a", "n": 1},
            {"x": torch.ones(3), "ids": torch.tensor([3]), "text": "b", "n": 2},
        ]
    )
    assert batch["x"].shape == (2, 3)
    assert isinstance(batch["ids"], list) and batch["ids"][1].tolist() == [3]  # ragged
    assert batch["text"] == ["a", "b"] and batch["n"] == [1, 2]
    assert batch_size(batch) == 2


def test_collate_rejects_samples_with_different_keys():
    with pytest.raises(DataError, match=r"sample 1 has keys \['y'\] but sample 0 has \['x'\]"):
        collate([{"x": 1}, {"y": 2}])


def test_split_and_concat_round_trip_tensors_and_lists():
    batch = {"x": torch.arange(10).reshape(5, 2), "s": list("abcde")}
    parts = split(batch, 2)
    assert [batch_size(p) for p in parts] == [2, 2, 1]
    assert parts[2]["s"] == ["e"] and parts[2]["x"].tolist() == [[8, 9]]
    joined = concat(parts)
    assert torch.equal(joined["x"], batch["x"]) and joined["s"] == batch["s"]


def test_concat_of_ragged_tensors_gives_a_list_of_rows():
    joined = concat([{"t": torch.zeros(2, 3)}, {"t": torch.zeros(1, 5)}])
    assert [tuple(r.shape) for r in joined["t"]] == [(3,), (3,), (5,)]


def test_concat_rejects_different_keys():
    with pytest.raises(DataError, match="different keys"):
        concat([{"a": [1]}, {"b": [1]}])


def test_batch_size_rejects_disagreeing_lengths_and_scalars():
    with pytest.raises(DataError, match=r"different lengths on dim 0 \(x: 2, s: 3\)"):
        batch_size({"x": torch.zeros(2), "s": [1, 2, 3]})
    with pytest.raises(DataError, match="0-dim tensor"):
        batch_size({"loss": torch.tensor(1.0)})
    with pytest.raises(DataError, match="holds a int"):
        batch_size({"n": 3})


def test_select_by_index_list():
    batch = {"x": torch.arange(4), "s": list("abcd")}
    picked = select(batch, [3, 0])
    assert picked["x"].tolist() == [3, 0] and picked["s"] == ["d", "a"]


def test_merge_equal_duplicates_silently_and_keeps_argument_order():
    x = torch.arange(3)
    merged = merge_inputs([{"x": x, "a": [1, 2, 3]}, {"x": x.clone(), "b": [4, 5, 6]}], ["p", "q"])
    assert list(merged) == ["x", "a", "b"]


def test_merge_unequal_duplicate_names_both_producers():
    with pytest.raises(BatchMergeError, match="key 'x' comes from both p and q"):
        merge_inputs([{"x": torch.zeros(2)}, {"x": torch.ones(2)}], ["p", "q"])
    with pytest.raises(BatchMergeError, match="key 's' comes from both"):
        merge_inputs([{"s": ["a"]}, {"s": ["b"]}], ["p", "q"])


def test_strings_become_prompt_samples():
    assert Dataset(["hi"], seed=0).samples == [{"prompt": "hi"}]


def test_dataset_order_depends_only_on_seed_and_position():
    samples = [{"i": i} for i in range(10)]
    a = Dataset(samples, seed=3).draw(start=7, count=8)  # crosses into the second pass
    b = Dataset(samples, seed=3).draw(start=7, count=8)
    assert a == b
    first_pass = [s["i"] for s in Dataset(samples, seed=3).draw(0, 10)]
    assert sorted(first_pass) == list(range(10))  # a permutation: each sample once per pass
    assert first_pass != list(range(10))  # shuffled
    other_seed = [s["i"] for s in Dataset(samples, seed=4).draw(0, 10)]
    assert other_seed != first_pass


def test_stream_dataset_global_batches_are_shuffled_and_drop_the_remainder():
    stream = StreamDataset([{"x": torch.arange(5)}, {"x": torch.arange(5, 10)}])
    batches = list(stream.global_batches(4, seed=1, epoch=0))
    assert len(batches) == 2  # 10 samples, 2 full steps of 4
    seen = torch.cat([b["x"] for b in batches]).tolist()
    assert len(set(seen)) == 8 and seen != sorted(seen)
    again = list(stream.global_batches(4, seed=1, epoch=0))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, again, strict=True))
    other_epoch = list(stream.global_batches(4, seed=1, epoch=1))
    assert torch.cat([b["x"] for b in other_epoch]).tolist() != seen


def test_stream_dataset_smaller_than_one_step_gives_no_step():
    # An env flow that filters rows (DAPO's dynamic sampling) may leave too few for a step.
    stream = StreamDataset([{"x": torch.arange(7)}])
    assert [len(b["x"]) for b in stream.global_batches(4, seed=0, epoch=0)] == [4]
    assert list(StreamDataset([{"x": torch.arange(3)}]).global_batches(4, 0, 0)) == []
