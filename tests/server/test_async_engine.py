"""The async engine without HTTP, on a tiny random Llama: concurrent streams share the step loop, an abort frees
the KV blocks at once, the queue bound, graceful drain, and a failing step fails its requests instead of hanging;
with async scheduling on and off."""
from __future__ import annotations

import asyncio

import pytest

from quantkit import SamplingParams
from quantkit.config import EngineConfig
from quantkit.engine.async_engine import (
    AsyncLLMEngine,
    EngineClosedError,
    EngineDeadError,
    QueueFullError,
    RequestAbortedError,
)
from quantkit.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(params=[True, False], ids=["async-scheduling", "sync-scheduling"])
def make(small_llama_dir, request):
    def make(**kwargs) -> tuple[AsyncLLMEngine, list]:
        finished = []
        config = EngineConfig(str(small_llama_dir), device="cpu", skip_tokenizer_init=True, num_kv_blocks=16,
                              block_size=8, max_model_len=64, max_num_seqs=2, async_scheduling=request.param)
        return AsyncLLMEngine(LLMEngine(config), on_finished=finished.append, **kwargs), finished
    return make


async def _collect(stream) -> list:
    last = {}
    async for outputs in stream:
        last.update((o.request_id, o) for o in outputs)
    return [last[rid] for rid in stream.request_ids]


def test_streams_abort_and_free_blocks(make):
    engine, finished = make()

    async def main():
        engine.start()
        a = await engine.add([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        b = await engine.add([[6, 7, 8], [9, 10]], GREEDY)
        async for outputs in a:  # the first token of the long request, then its client leaves
            if outputs[0].outputs[0].token_ids:
                a.abort()
                break
        with pytest.raises(RequestAbortedError):
            async for _ in a:
                pass
        outs = await _collect(b)
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
        assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
        for _ in range(100):
            if engine.stats.num_free_blocks == engine.stats.num_blocks and len(finished) == 3:
                break
            await asyncio.sleep(0.02)
        await engine.close()

    asyncio.run(main())
    assert engine.stats.num_free_blocks == engine.stats.num_blocks == 16
    assert sorted(f.finish_reasons[0] for f in finished) == ["abort", "length", "length"]
    done = next(f for f in finished if f.finish_reasons == ["length"])
    assert done.num_output_tokens == 6 and done.ttft_s is not None and done.tpot_s is not None


def test_queue_bound_validation_and_drain(make):
    engine, finished = make(max_queue=1)

    async def main():
        engine.start()
        with pytest.raises(ValueError, match="max_num_seqs"):
            await engine.add([[1, 2]], SamplingParams(n=3))  # a bad request changes nothing
        long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        streams = [await engine.add([[1, 2, 3]], long), await engine.add([[4, 5, 6]], long)]
        with pytest.raises(QueueFullError):  # max_num_seqs=2 + max_queue=1 in flight, asking for a 4th
            await engine.add([[7], [8]], GREEDY)
        drain = asyncio.create_task(engine.drain(timeout=0.0))
        await asyncio.sleep(0)  # let the drain begin
        with pytest.raises(EngineClosedError):
            await engine.add([[9]], GREEDY)
        outs = [await _collect(s) for s in streams]
        await drain
        await engine.close()
        return outs

    outs = asyncio.run(main())
    assert all(o[0].outputs[0].finish_reason == "abort" for o in outs)
    assert [f.finish_reasons for f in finished] == [["abort"], ["abort"]]
    assert engine.stats.num_free_blocks == engine.stats.num_blocks


def test_a_failing_step_fails_its_requests(make, monkeypatch):
    engine, _ = make()

    def broken():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.engine, "step", broken)

    async def main():
        engine.start()
        stream = await engine.add([[1, 2, 3]], GREEDY)
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            await _collect(stream)
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.add([[1]], GREEDY)
        await engine.close()

    asyncio.run(main())
