"""BlockTables (server/engine/block_tables.py): each row always equals its request's block list, zero-padded,
whatever happened to the list since it was last read: grown, emptied and refilled by a preemption, or a new request
under an old id; rows of requests no longer running are reused, and the table doubles when every row is in use."""
import numpy as np

from server.engine.block_tables import BlockTables
from server.engine.request import Request, SamplingParams, Status


def _req(rid: str, blocks: list[int]) -> Request:
    req = Request(rid, [1, 2], SamplingParams())
    req.block_ids, req.status = list(blocks), Status.RUNNING
    return req


def _check(tables: BlockTables, reqs: list[Request]) -> None:
    rows = tables.rows(reqs)
    got = tables.table[rows]
    want = np.zeros_like(got)
    for i, req in enumerate(reqs):
        want[i, : len(req.block_ids)] = req.block_ids
    assert np.array_equal(got, want)


def test_rows_follow_the_block_lists():
    tables = BlockTables(width=6, rows=2)
    a, b, c = _req("a", [1, 2]), _req("b", [3]), _req("c", [4, 5, 6])
    _check(tables, [a, b])
    a.block_ids.append(7)  # grown
    _check(tables, [a, b])
    _check(tables, [a, b, c])  # a third running request: the table doubles
    assert tables.table.shape[0] == 4
    b.block_ids.clear()  # preempted, then refilled with as many blocks as before
    b.num_preemptions += 1
    b.block_ids.append(9)
    _check(tables, [b, a, c])
    a.status = Status.FINISHED
    d, a2 = _req("d", [8]), _req("a", [10, 11, 12, 13])  # a new request under a finished one's id
    _check(tables, [c, d, a2, b])
    e = _req("e", [14])
    for req in (b, c, d):
        req.status = Status.FINISHED
    _check(tables, [a2, e])  # rows of finished requests reused: no doubling
    assert tables.table.shape[0] == 4
