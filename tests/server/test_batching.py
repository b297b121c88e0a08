"""Micro-batching: grouping, size cap, per-request slices, errors, drain on stop."""
from __future__ import annotations

import asyncio

import pytest
import torch

from server.batching import MicroBatcher


class Rows:
    def __init__(self, t):
        self.t = t

    def __len__(self):
        return len(self.t)

    def slice(self, a, b):
        return Rows(self.t[a:b])


def run(coro):
    return asyncio.run(coro)


def test_queued_requests_share_calls_up_to_the_cap_and_get_their_own_rows():
    calls = []

    def runner(served, mode, x):
        calls.append((served, mode, len(x)))
        return Rows(x * 10)

    async def main():
        b = MicroBatcher(runner, max_batch_size=8)
        await b.start()
        inputs = [torch.full((n, 1), float(i)) for i, n in enumerate([3, 2, 4, 1, 5])]
        # All submitted before the consumer runs: it sees them queued together.
        results = await asyncio.gather(*(b.submit("m", "on", x) for x in inputs))
        await b.stop()
        return inputs, results

    inputs, results = run(main())
    for x, (rows, timing) in zip(inputs, results):
        assert torch.equal(rows.t, x * 10)
        assert timing.batch_size <= 8
    # 3+2 (+4 would exceed 8) | 4+1 | 5
    assert [c[2] for c in calls] == [5, 5, 5]


def test_versions_and_modes_never_share_a_call():
    calls = []

    def runner(served, mode, x):
        calls.append((served, mode, x[:, 0].tolist()))
        return Rows(x)

    async def main():
        b = MicroBatcher(runner, max_batch_size=32)
        await b.start()
        jobs = [("v1", "on", 1.0), ("v2", "on", 2.0), ("v1", "off", 3.0), ("v1", "on", 4.0)]
        await asyncio.gather(*(b.submit(s, m, torch.tensor([[v]])) for s, m, v in jobs))
        await b.stop()

    run(main())
    assert sorted(calls) == sorted([("v1", "on", [1.0, 4.0]), ("v2", "on", [2.0]), ("v1", "off", [3.0])])


def test_a_failing_batch_fails_only_its_requests():
    def runner(served, mode, x):
        if mode == "bad":
            raise ValueError("boom")
        return Rows(x)

    async def main():
        b = MicroBatcher(runner, max_batch_size=4)
        await b.start()
        out = await asyncio.gather(b.submit("m", "bad", torch.zeros(1, 1)),
                                   b.submit("m", "on", torch.ones(1, 1)), return_exceptions=True)
        await b.stop()
        return out

    bad, good = run(main())
    assert isinstance(bad, ValueError) and "boom" in str(bad)
    assert torch.equal(good[0].t, torch.ones(1, 1))


def test_max_wait_gathers_late_arrivals_and_stop_drains():
    sizes = []

    def runner(served, mode, x):
        sizes.append(len(x))
        return Rows(x)

    async def main():
        b = MicroBatcher(runner, max_batch_size=16, max_wait_ms=200)
        await b.start()
        first = asyncio.ensure_future(b.submit("m", "on", torch.zeros(1, 1)))
        await asyncio.sleep(0.02)  # arrives inside the first request's wait window
        second = asyncio.ensure_future(b.submit("m", "on", torch.zeros(2, 1)))
        await asyncio.gather(first, second)
        tail = [asyncio.ensure_future(b.submit("m", "on", torch.zeros(1, 1))) for _ in range(3)]
        await asyncio.sleep(0)
        await b.stop()  # queued work still runs
        return [t.result()[0] for t in tail]

    tail = run(main())
    assert sizes[0] == 3 and sum(sizes) == 6 and len(tail) == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch size"):
        MicroBatcher(lambda *a: None, max_batch_size=0)
    with pytest.raises(ValueError, match="wait"):
        MicroBatcher(lambda *a: None, max_wait_ms=-1)


def test_batched_forward_equals_unbatched(digits_data, tmp_path):
    """The real model: one batch of 16 vs 16 single calls: same labels, probabilities to 1e-6."""
    from repair.bundle import Bundle, state_dict_for_saving
    from repair.models import build_model
    from server.runtime import Served

    spec = {"arch": "vit", "img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 4,
            "embed_dim": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0}
    torch.manual_seed(0)
    v = Bundle(tmp_path / "b").write_version(
        {"kind": "vision", "architecture": spec, "labels": [str(i) for i in range(10)],
         "preprocessing": {"kind": "image", "channels": 1, "height": 16, "width": 16}},
        {"model": state_dict_for_saving(build_model(spec))})
    served = Served(v, torch.device("cpu"), max_batch_size=16, warmup=False)
    x = digits_data.x_test[:16]
    batch = served.forward(x, "on").probabilities
    single = torch.cat([served.forward(x[i:i + 1], "on").probabilities for i in range(16)])
    assert torch.equal(batch.argmax(-1), single.argmax(-1))
    assert torch.allclose(batch, single, atol=1e-6, rtol=0)


def test_graphed_forward_pads_to_buckets_chunks_large_batches_and_slices_back():
    """The CUDA-graph wrapper's batching, run eagerly (capture=False) so it runs on the CPU:
    each call sees a power-of-two batch of at most ``max_batch``, answers match the plain call."""
    from repair.cuda_graphs import GraphedForward

    seen = []

    def fn(x):
        seen.append(len(x))
        return x.flatten(1).sum(1) * 2, x.amax(dim=(1, 2))

    graphed = GraphedForward(fn, max_batch=16, capture=False)
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 16, 37):
        x = torch.rand(n, 3, 4, generator=g)
        total, peak = graphed(x)
        assert torch.equal(total, x.flatten(1).sum(1) * 2) and torch.equal(peak, x.amax(dim=(1, 2)))
    assert seen == [1, 8, 16, 16, 16, 8]


def test_a_version_loaded_on_request_is_loaded_warm_once_it_becomes_current(tmp_path):
    """``/versions/{v}`` loads a version cold (no warm-up, no CUDA graphs); when CURRENT later
    points at it, the runtime serves a freshly warmed copy, not the cold one."""
    from repair.bundle import Bundle, state_dict_for_saving
    from repair.models import build_model
    from server.runtime import ModelRuntime

    spec = {"arch": "vit", "img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 4,
            "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
    bundle = Bundle(tmp_path / "b")
    manifest = {"kind": "vision", "architecture": spec, "labels": [str(i) for i in range(10)],
                "preprocessing": {"kind": "image", "channels": 1, "height": 16, "width": 16}}
    first = bundle.write_version(manifest, {"model": state_dict_for_saving(build_model(spec))}).id
    bundle.write_version(manifest, {"model": state_dict_for_saving(build_model(spec))})
    runtime = ModelRuntime(bundle.root, device="cpu", max_batch_size=4)
    assert runtime.refresh() and runtime.served.id != first and runtime.served.warm
    cold = runtime.get(first)
    assert cold.id == first and not cold.warm and runtime.get(first) is cold
    bundle.activate(first)
    assert runtime.refresh()
    assert runtime.served.id == first and runtime.served.warm and runtime.served is not cold


def test_idle_upkeep_runs_once_the_queue_is_empty_and_its_failure_stops_nothing():
    events = []

    def runner(served, mode, x):
        events.append(("run", len(x)))
        return Rows(x)

    def on_idle():
        events.append("idle")
        raise RuntimeError("upkeep broke")

    async def main():
        b = MicroBatcher(runner, max_batch_size=2, on_idle=on_idle)
        await b.start()
        # queued together: two batches back to back, then one idle call
        await asyncio.gather(*(b.submit("m", "on", torch.zeros(1, 1)) for _ in range(3)))
        rows, _ = await b.submit("m", "on", torch.ones(1, 1))  # the failed upkeep left it running
        await asyncio.sleep(0.05)  # idle again
        await b.submit("m", "on", torch.ones(1, 1))
        await b.stop()  # queued at once: the stop, not idleness, follows this batch
        return rows

    rows = run(main())
    assert events == [("run", 2), ("run", 1), "idle", ("run", 1), "idle", ("run", 1)]
    assert torch.equal(rows.t, torch.ones(1, 1))


def test_plain_times_forget_a_bad_warm_up_once_refreshed(tmp_path):
    """The reference of "added latency": warm-up timings taken on a busy machine (planted here as
    10 s) are outvoted by idle refreshes of the buckets patched requests use, and only those."""
    from repair.bundle import Bundle, state_dict_for_saving
    from repair.models import build_model
    from server.runtime import PLAIN_REFRESH_SECONDS, PLAIN_SAMPLES, Served

    spec = {"arch": "vit", "img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 4,
            "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
    v = Bundle(tmp_path / "b").write_version(
        {"kind": "vision", "architecture": spec, "labels": [str(i) for i in range(10)],
         "preprocessing": {"kind": "image", "channels": 1, "height": 16, "width": 16}},
        {"model": state_dict_for_saving(build_model(spec))})
    served = Served(v, torch.device("cpu"), max_batch_size=4, warmup=False)
    times = served.plain_times
    for n in (1, 4):
        for _ in range(3):
            times.observe(n, 10.0, now=0.0)
    assert times.estimate(1) == 10.0 and times.estimate(3) == 10.0  # 3 rides in bucket 4
    assert served.refresh_plain(now=1e6) is None  # no patched request has used a bucket yet
    times.used(1)
    assert times.stalest(now=PLAIN_REFRESH_SECONDS) is None  # still recent
    refreshed = [served.refresh_plain(now=1e6 + i * (PLAIN_REFRESH_SECONDS + 1)) for i in range(3)]
    assert refreshed == [1, 1, 1]
    assert served.refresh_plain(now=1e6 + 2 * (PLAIN_REFRESH_SECONDS + 1)) is None  # just refreshed
    assert 0 < times.estimate(1) < 1.0  # three fresh timings of five outvote the warm-up's
    assert times.estimate(4) == 10.0  # unused bucket left alone
    assert len(times._samples[1]) == PLAIN_SAMPLES


def test_patched_requests_mark_their_bucket_for_refresh_and_plain_ones_refresh_it(atpatch_bundle, digits_data):
    """The wiring on a served AtPatch version: a patched batch marks its bucket as one to keep
    timed; a plain (``off``) batch of that size is itself a fresh timing."""
    from repair.bundle import Bundle
    from repair.cuda_graphs import bucket
    from server.runtime import Served

    served = Served(Bundle(atpatch_bundle).version(), torch.device("cpu"), max_batch_size=8, warmup=False)
    x = digits_data.x_test[:3]
    assert served.plain_times.stalest(now=1e9) is None
    served.forward(x, "on")
    assert served.plain_times.stalest(now=1e9) == bucket(3) == 4
    served.forward(x, "off")
    assert served.plain_times.stalest() is None  # just timed by the plain batch
    assert served.refresh_plain(now=1e9) == 4
