"""Copies between the KV pool and a block-major host pool that the host does not wait for
(minillm/engine/host_transfers.py): on a CPU `defer=True` keeps every store pending until the next load or settle,
as the GPU's stream runs them, so the ordering the GPU path relies on is checked here against a plain dictionary of
block contents."""
from __future__ import annotations

import random
import time

import pytest
import torch

from minillm.engine.host_transfers import HostTransfers, block_runs
from test_engine import model_and_config  # noqa: F401  (fixture)
from test_engine_stress import head_dirs, reference  # noqa: F401  (fixtures)
from tiny import one_thread  # noqa: F401  (autouse fixture)


def ids(blocks: list[int]) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.long)


@pytest.mark.parametrize("seed", range(20))
def test_random_stores_and_loads_read_what_was_last_written(seed):
    """Random stores (device -> host) and loads (host -> device) over two host pools, the device blocks rewritten
    between them: every load reads the host block's latest store, however many stores are still pending."""
    rng = random.Random(seed)
    device = torch.zeros(2, 3, 6, 2, 1, 2)  # [K/V, layers, device blocks, block_size, kv heads, head_dim]
    pools = [torch.zeros(5, 2, 3, 2, 1, 2), torch.zeros(4, 2, 3, 2, 1, 2)]  # [host blocks, K/V, layers, ...]
    host_truth = [dict(), dict()]  # pool -> host block -> the value its latest store carried
    transfers = HostTransfers(torch.device("cpu"), defer=True)
    for step in range(40):
        for block in rng.sample(range(6), 2):  # a forward writes some device blocks
            device[:, :, block] = float(step * 10 + block)
        which = rng.randrange(2)
        pool = pools[which]
        n = rng.randint(1, 3)
        if rng.random() < 0.6 or not host_truth[which]:
            src, dst = rng.sample(range(6), n), rng.sample(range(pool.shape[0]), n)
            transfers.store(device, ids(src), pool, ids(dst))
            for s, d in zip(src, dst):
                host_truth[which][d] = float(device[0, 0, s, 0, 0, 0])
        else:
            src = rng.sample(sorted(host_truth[which]), min(n, len(host_truth[which])))
            dst = rng.sample(range(6), len(src))
            transfers.load(pool, ids(src), device, ids(dst))
            for s, d in zip(src, dst):
                assert bool((device[:, :, d] == host_truth[which][s]).all()), (step, s, d)
    transfers.settle()
    assert transfers.num_pending == 0
    for pool, truth in zip(pools, host_truth):
        for block, value in truth.items():
            assert bool((pool[block] == value).all())


def test_a_load_reads_the_stores_queued_before_it():
    """Deferred stores are not in the host pool yet; a load behind them reads what they carry (stream order)."""
    device = torch.arange(4.0).view(1, 1, 4, 1).expand(2, 1, 4, 1).contiguous()
    pool = torch.zeros(3, 2, 1, 1)
    transfers = HostTransfers(torch.device("cpu"), defer=True)
    transfers.store(device, ids([2]), pool, ids([0]))
    transfers.store(device, ids([3]), pool, ids([1]))
    assert transfers.num_pending == 2 and float(pool[0, 0, 0, 0]) == 0.0  # nothing landed yet
    transfers.load(pool, ids([1, 0]), device, ids([0, 1]))
    assert device[0, 0, :, 0].tolist() == [3.0, 2.0, 2.0, 3.0] and transfers.num_pending == 0


def test_block_runs_make_one_copy_per_run_of_consecutive_blocks():
    assert block_runs([7, 8, 9, 2, 3, 5]) == [(7, 0, 3), (2, 3, 2), (5, 5, 1)]
    assert block_runs([4, 3]) == [(4, 0, 1), (3, 1, 1)] and block_runs([]) == []


def test_fp8_pools_move_as_bytes():
    fp8 = torch.float8_e4m3fn
    device = torch.tensor([0.5, -1.0, 2.0]).to(fp8).view(1, 1, 3, 1).expand(2, 1, 3, 1).contiguous()
    pool = torch.zeros(2, 2, 1, 1, dtype=fp8)
    transfers = HostTransfers(torch.device("cpu"))
    transfers.store(device, ids([1, 2]), pool, ids([0, 1]))
    transfers.load(pool, ids([1, 0]), device, ids([0, 1]))
    assert device[0, 0, :, 0].float().tolist() == [2.0, -1.0, 2.0]


@pytest.mark.parametrize("seed", [0, 40, 82])
def test_engine_workloads_with_every_store_deferred_match_requests_run_alone(model_and_config, head_dirs,  # noqa: F811
                                                                             reference, seed, monkeypatch):
    """The engine stress scenarios with the prefix cache's CPU tier (tests/test_kv_offload.py), every store left
    pending as on a GPU until a load or a reader needs it: the same differential checks hold."""
    from test_kv_offload import test_random_engine_workloads_with_the_tier_match_requests_run_alone as run_seed
    made = []
    init = HostTransfers.__init__

    def deferring(self, device, defer=False):
        init(self, device, defer=True)
        made.append(self)
    monkeypatch.setattr(HostTransfers, "__init__", deferring)
    most = []
    store = HostTransfers.store
    monkeypatch.setattr(HostTransfers, "store", lambda self, *a: store(self, *a) or most.append(self.num_pending))
    run_seed(model_and_config, head_dirs, reference, seed)
    assert made and max(most) >= 2  # stores did wait: the deferred path ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the non-blocking path needs a GPU")
def test_on_a_gpu_a_store_behind_a_long_kernel_returns_before_it_and_lands_after():
    """The host does not wait: a store queued behind a busy stream returns while its copy has not run, and so does
    a load of the same host blocks queued behind it; the load brings back exactly the stored bytes (stream order),
    and the host pool shows them once settled."""
    device = torch.randn(2, 2, 8, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    pool = torch.zeros(4, 2, 2, 16, 2, 64, dtype=torch.bfloat16, pin_memory=True)  # block-major, as KVCache's
    transfers = HostTransfers(torch.device("cuda"))
    want = device[:, :, [5, 1, 6]].cpu()
    # the device ids before the busy kernel: a pageable .cuda() copy queued behind it would wait for it
    device_ids, load_ids = ids([5, 1, 6]).cuda(), ids([0, 2, 7]).cuda()
    transfers.store(device, device_ids, pool, ids([3, 0, 1]))  # once before: a kernel's first launch loads its
    transfers.load(pool, ids([3, 0, 1]), device, load_ids)  # module (CUDA's lazy loading), which waits for the device
    device[:, :, load_ids] = 0
    pool.zero_()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of a busy stream
    start = time.perf_counter()
    transfers.store(device, device_ids, pool, ids([3, 0, 1]))  # (device ids: KVCache._device_ids)
    assert transfers.num_pending == 1  # returned before its copy ran
    transfers.load(pool, ids([3, 0, 1]), device, load_ids)
    assert time.perf_counter() - start < 0.5 and transfers.num_pending == 1  # the load did not wait either
    torch.testing.assert_close(device[:, :, [0, 2, 7]].cpu(), want, rtol=0, atol=0)
    transfers.settle()
    assert transfers.num_pending == 0
    torch.testing.assert_close(pool[[3, 0, 1]].movedim(0, 2), want, rtol=0, atol=0)
