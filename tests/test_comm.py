"""The communicator's contract: tag-free transfers, the 1-rank implementation."""

import pytest
import torch
import torch.distributed as dist

from flowgraph.errors import PlanError
from flowgraph.runtime.comm import DistComm, LocalComm
from flowgraph.runtime.transport import _header, pack


class _Done:
    def wait(self):
        return None


def test_point_to_point_messages_carry_no_tag(monkeypatch):
    """NCCL ignores tags, so the runtime must not depend on them: every message is tag 0."""
    tags = []
    monkeypatch.setattr(dist, "isend", lambda t, dst, tag=0: tags.append(("isend", tag)) or _Done())

    meta, _ = pack({"text": ["a", "b"]})  # a batch without tensors: one header message
    header, _ = _header(meta)

    def recv(tensor, src, tag=0):
        tags.append(("recv", tag))
        tensor.copy_(header)

    monkeypatch.setattr(dist, "recv", recv)
    comm = DistComm(rank=0, world_size=2, local_rank=0, local_world_size=2,
                    device=torch.device("cpu"))  # fmt: skip
    comm.send({"x": torch.arange(3), "text": ["a", "b", "c"]}, dst=1)
    comm.wait_sends()
    assert comm.recv(src=1) == {"text": ["a", "b"]}
    assert tags and {tag for _, tag in tags} == {0}
    assert {kind for kind, _ in tags} == {"isend", "recv"}


def test_one_rank_comm_returns_its_own_part_and_refuses_transfers():
    comm = LocalComm()
    assert comm.all_gather_objects({"a": 1}) == [{"a": 1}]
    batch = {"x": torch.ones(2)}
    assert comm.gather({0: batch}, (0,)) == {0: batch}
    assert comm.group((0,)) is None
    with pytest.raises(PlanError, match="a plan for one rank has no SEND"):
        comm.send(batch, 1)
    with pytest.raises(PlanError, match="gathers from ranks"):
        comm.gather({0: batch}, (0, 1))
    with pytest.raises(ValueError, match="boom"):
        comm.stop("rank 0 failed at ...", ValueError("boom"))
