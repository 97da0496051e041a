"""Parameter sync: in place on one rank, bucketed broadcasts across ranks, name mapping,
validate_sync."""

import os
import pickle

import pytest
import torch
import torch.distributed as dist

from flowgraph import TorchModule
from flowgraph.errors import ParameterSyncError
from flowgraph.runtime.sync import CrossSync, SyncPlan
from spmd import init_gloo, spawn


class Net(TorchModule):
    """A small stack whose weights depend on ``seed``; its first layer is large enough
    (4 MiB) to travel directly, the others share a flat buffer."""

    def __init__(self, name, seed):
        super().__init__(name)
        self.seed = seed

    def setup(self):
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.model = torch.nn.Sequential(
                torch.nn.Linear(1024, 1024),
                torch.nn.Linear(1024, 4, bias=False),
                torch.nn.Linear(4, 3),
            )


class Renamed(Net):
    """The same network under other parameter names: ``layers.N.*`` instead of ``N.*``."""

    def setup(self):
        super().setup()
        self.model = torch.nn.ModuleDict({"layers": self.model})

    def map_sync_name(self, src_name):
        return f"layers.{src_name}"


def params(module):
    return {k: v.detach().clone() for k, v in module.sync_parameters()}


def test_colocated_sync_copies_in_place():
    src, dst = Net("trainer", 1), Net("inference", 2)
    src.setup()
    dst.setup()
    storage = [t.data_ptr() for _, t in dst.sync_parameters()]
    plan = SyncPlan.build(src, dst)
    plan.apply()
    plan.validate()
    assert all(torch.equal(a, b) for a, b in zip(params(src).values(), params(dst).values(),
                                                  strict=True))  # fmt: skip
    assert [t.data_ptr() for _, t in dst.sync_parameters()] == storage  # no new tensors
    assert str(plan) == "sync trainer -> inference: 5 tensors, 1,053,711 parameters"


def test_name_mapping_hook():
    src, dst = Net("trainer", 1), Renamed("inference", 2)
    src.setup()
    dst.setup()
    SyncPlan.build(src, dst).apply()
    assert torch.equal(params(dst)["layers.1.weight"], params(src)["1.weight"])


def test_validate_sync_names_a_corrupted_parameter():
    src, dst = Net("trainer", 1), Net("inference", 2)
    src.setup()
    dst.setup()
    plan = SyncPlan.build(src, dst)
    plan.apply()
    with torch.no_grad():
        dict(dst.sync_parameters())["1.weight"][0, 0] += 1.0
    with pytest.raises(
        ParameterSyncError, match=r"these parameters differ .*: 1\.weight -> 1\.weight"
    ):
        plan.validate()


LAYOUTS = {"2->2": ((0, 1), (2, 3)), "2->1": ((0, 1), (2,)), "1->3": ((0,), (1, 2, 3))}


def _worker(rank, port, out):
    init_gloo(rank, 4, port)
    results = {}
    groups = {name: dist.new_group(sorted(set(s) | set(d))) for name, (s, d) in LAYOUTS.items()}
    # Each bucket travels from one source rank to the destination ranks only.
    senders = {(name, r): dist.new_group(sorted({r, *d}))
               for name, (s, d) in LAYOUTS.items() for r in s}  # fmt: skip
    for name, (src_ranks, dst_ranks) in LAYOUTS.items():
        members = set(src_ranks) | set(dst_ranks)
        if rank not in members:
            continue
        src, dst = Net("trainer", 1), Renamed("inference", 2)
        if rank in src_ranks:
            src.setup()
        if rank in dst_ranks:
            dst.setup()
        sync = CrossSync(src, dst, 3, rank, src_ranks, dst_ranks)
        for bucket in range(3):
            sync.broadcast(bucket, senders[(name, sync.root(bucket))])
        sync.validate(groups[name])
        if rank in dst_ranks:
            results[name] = params(dst)
            results[name + " roots"] = [sync.root(b) for b in range(3)]
        if name == "2->2":  # a corrupted receive on rank 3 is caught on every member
            if rank == 3:
                with torch.no_grad():
                    dict(dst.sync_parameters())["layers.2.bias"][0] += 1.0
            try:
                sync.validate(groups[name])
                results["corrupt"] = "not caught"
            except ParameterSyncError as err:
                results["corrupt"] = str(err)
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_bucketed_sync_across_ranks_equals_the_source(tmp_path):
    out = str(tmp_path / "sync")
    spawn(_worker, args=(out,), nprocs=4, timeout=120)
    expected = Net("trainer", 1)
    expected.setup()
    want = {f"layers.{k}": v for k, v in params(expected).items()}
    per_rank = {r: pickle.loads(open(f"{out}.{r}", "rb").read()) for r in range(4)}
    for name, (_, dst_ranks) in LAYOUTS.items():
        for rank in dst_ranks:
            got = per_rank[rank][name]
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), (name, rank)
    # Senders are spread over the source ranks, bucket by bucket.
    assert per_rank[2]["2->2 roots"] == [0, 1, 0]
    for rank in (0, 1, 2, 3):
        assert "these parameters differ" in per_rank[rank]["corrupt"]
        assert "2.bias -> layers.2.bias" in per_rank[rank]["corrupt"]
