"""Triton paged attention against the torch reference backend on random pools and batches: decodes, prefills,
chunked prefills resuming mid-prompt, prefix-cached prompts (keys already in the pool) and mixes of them, with
GQA, head sizes 64/128, page sizes that do not divide the context lengths, sliding windows and 16-bit or FP8 pools.

Tolerance on ||out - ref|| / ||ref||, by activation dtype (the reference computes in fp32 and rounds to the dtype;
the kernel multiplies in the dtype on a GPU, in fp32 under the interpreter): fp32 1e-4, fp16 3e-3, bf16 1.5e-2.
FP8 pools get the same bounds: both backends dequantize the very same bytes, and the KV write must store exactly
the reference's bytes (compared bit for bit, after every step)."""
from __future__ import annotations

import random

import pytest
import torch

from quantkit.kernels.attention_torch import TorchAttentionBackend
from quantkit.layers.attention import (
    Attention,
    AttentionMetadata,
    select_attention_backend,
)
from tests.kernels.conftest import DEVICE, gpu

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
FP8_KV = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _triton():
    from quantkit.kernels.attention_triton import TritonAttentionBackend
    return TritonAttentionBackend()


class Pair:
    """The same layer twice (Triton, torch) over two copies of one random pool with shuffled block tables."""

    def __init__(self, gen: torch.Generator, kv_heads: int, group: int, head_dim: int, page: int, num_blocks: int,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None = None, window: int | None = None) -> None:
        self.gen, self.dtype, self.page = gen, dtype, page
        kv_dtype = kv_dtype or dtype
        pool = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=gen)
        self.layers = []
        for backend in (_triton(), TorchAttentionBackend()):
            layer = Attention(kv_heads * group, head_dim, kv_heads, window, backend).to(DEVICE)
            if kv_dtype != dtype:  # FP8: values up to ~4x the scale, stored as x / scale
                layer.k_scale.fill_(0.75)
                layer.v_scale.fill_(1.5)
            layer.kv_cache = pool.to(kv_dtype).to(DEVICE)
            self.layers.append(layer)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: dict[int, list[int]] = {}

    def step(self, seqs: list[tuple[int, int, int]], max_seq_len: int | None = None) -> float:
        """One forward over sequences (id, tokens already in the pool, new tokens); returns the relative error.
        `max_seq_len` sizes the launch as a CUDA graph does (AttentionMetadata.max_seq_len)."""
        starts, lens, slots, tables = [0], [], [], []
        for sid, cached, new in seqs:
            total = cached + new
            table = self.tables.setdefault(sid, [])
            while len(table) * self.page < total:
                table.append(self.free.pop())
            starts.append(starts[-1] + new)
            lens.append(total)
            slots += [table[p // self.page] * self.page + p % self.page for p in range(cached, total)]
            tables.append(table)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            starts, lens, torch.tensor(slots, device=DEVICE),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
            max_seq_len=max_seq_len)
        return self.compare(meta, starts[-1])

    def compare(self, meta: AttentionMetadata, num_tokens: int) -> float:
        layer = self.layers[1]
        shape = (num_tokens, layer.num_heads + 2 * layer.num_kv_heads, layer.head_dim)
        qkv = torch.randn(shape, generator=self.gen).to(device=DEVICE, dtype=self.dtype)
        q, k, v = qkv.split([layer.num_heads, layer.num_kv_heads, layer.num_kv_heads], dim=1)  # strided views
        out, ref = (lay(q, k, v, meta).float() for lay in self.layers)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        pools = [lay.kv_cache for lay in self.layers]
        if pools[0] is not None:
            assert torch.equal(pools[0].view(torch.uint8), pools[1].view(torch.uint8)), "KV write differs"
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < TOLERANCE[self.dtype], f"relative error {err:.2e}"
        return err


# (kv heads, group, head dim, page, dtype, kv dtype)
SHAPES = [
    (2, 1, 64, 16, torch.float32, None),
    (2, 3, 128, 16, torch.float32, None),
    (1, 3, 64, 8, torch.bfloat16, None),
    (2, 3, 64, 16, torch.float32, torch.float8_e4m3fn),
    (1, 1, 128, 16, torch.bfloat16, torch.float8_e5m2),
]
BATCHES = {  # (tokens already in the pool, new tokens) per sequence
    "decode": [(9, 1), (30, 1), (0, 1), (47, 1)],
    "prefill": [(0, 13), (0, 1), (0, 40)],
    "mixed": [(20, 1), (0, 21), (33, 1), (16, 9)],
    "prefix_cached": [(32, 7), (17, 30)],
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(str(x).removeprefix("torch.") for x in s))
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(shape, batch, gen):
    kv_heads, group, head_dim, page, dtype, kv_dtype = shape
    pair = Pair(gen, kv_heads, group, head_dim, page, 24, dtype, kv_dtype)
    pair.step([(i, cached, new) for i, (cached, new) in enumerate(BATCHES[batch])])


@pytest.mark.parametrize("kv_dtype", [None, *FP8_KV.values()], ids=["16bit", *FP8_KV])
def test_chunked_prefill_then_decodes(kv_dtype, gen):
    """A prompt in chunks that resume mid-page, beside another sequence's decodes, then decodes of both: each
    step reads what the earlier steps wrote."""
    pair = Pair(gen, 2, 3, 64, 16, 16, torch.float32, kv_dtype)
    pair.step([(0, 0, 11), (1, 0, 5)])
    pair.step([(0, 11, 19), (1, 5, 1)])
    pair.step([(0, 30, 7), (1, 6, 1)])
    for n in range(3):
        pair.step([(0, 37 + n, 1), (1, 7 + n, 1)])


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp32", "e4m3"])
def test_sliding_window(kv_dtype, gen):
    pair = Pair(gen, 2, 3, 64, 16, 24, torch.float32, kv_dtype, window=12)
    pair.step([(0, 0, 30), (1, 40, 1), (2, 20, 9)])


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp32", "e4m3"])
def test_split_kv_decode(kv_dtype, gen):
    """Few long decodes: the context is split into segments merged by the second kernel."""
    from quantkit.kernels import attention_triton
    assert attention_triton._segments(2, 600, 64, DEVICE) > 1
    pair = Pair(gen, 1, 3, 64, 16, 80, torch.float32, kv_dtype)
    pair.step([(0, 599, 1), (1, 300, 1)])
    pair.layers[0].sliding_window = pair.layers[1].sliding_window = 100  # segments wholly outside the window
    pair.step([(0, 600, 1), (1, 301, 1)])


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp32", "e4m3"])
def test_decode_launch_sized_for_a_graph(kv_dtype, gen):
    """A CUDA graph sizes the launch by max_model_len, not by the step's contexts: short sequences then leave
    most segments empty, and those must weigh nothing in the merge."""
    from quantkit.kernels import attention_triton
    assert attention_triton._segments(2, 4096, 32, DEVICE) >= 16
    pair = Pair(gen, 1, 3, 64, 16, 24, torch.float32, kv_dtype)
    pair.step([(0, 40, 1), (1, 0, 1)], max_seq_len=4096)
    pair.step([(0, 41, 1), (1, 1, 1)], max_seq_len=4096)


@pytest.mark.parametrize("batch", ["mixed", "split"])
def test_output_order(batch, gen):
    """write_output_in (an act-order o_proj's input order): the kernels store column c at out_dest[c] (in the merge
    kernel too, when the context is split), the torch path scatters; both equal the plain output's columns taken in
    that order. A non-permutation is refused."""
    pair = Pair(gen, 2, 3, 64, 16, 80, torch.float32)
    order = torch.randperm(6 * 64, generator=gen).to(DEVICE)
    for layer in pair.layers:
        layer.write_output_in(order)
    pair.step([(0, 599, 1), (1, 300, 1)] if batch == "split" else [(0, 20, 1), (1, 0, 21), (2, 16, 9)])
    plain = Attention(6, 64, 2, None, TorchAttentionBackend()).to(DEVICE)
    q, k, v = (torch.randn(9, h, 64, generator=gen).to(DEVICE) for h in (6, 2, 2))
    meta = AttentionMetadata.for_prefill([9], DEVICE)
    assert torch.equal(pair.layers[1](q, k, v, meta), plain(q, k, v, meta)[:, order])
    with pytest.raises(ValueError, match="permutation of the 384 output columns"):
        plain.write_output_in(torch.zeros(384, dtype=torch.int32))
    plain.write_output_in(None)
    assert plain.out_dest is None


def test_fp8_head_dim_below_its_power_of_two(gen):
    """FP8 values are read as byte pairs over the padded head dim: 80 of 128 dims real, the pairs past 40 masked."""
    pair = Pair(gen, 2, 2, 80, 16, 12, torch.float32, torch.float8_e5m2)
    pair.step([(0, 0, 7), (1, 20, 1), (2, 33, 1)])
    with pytest.raises(ValueError, match="even head_dim, got 63"):
        Pair(gen, 1, 2, 63, 16, 4, torch.float32, torch.float8_e4m3fn).step([(0, 0, 3)])


def test_without_cache(gen):
    """No pool (a full prefill, as evaluation runs it): keys and values are the step's own."""
    pair = Pair(gen, 2, 3, 64, 16, 4, torch.float32)
    for layer in pair.layers:
        layer.kv_cache = None
    pair.compare(AttentionMetadata.for_prefill([9, 1, 20], DEVICE), 30)


def test_selection():
    assert select_attention_backend(torch.device("cpu")).name == "torch"
    if DEVICE.type == "cpu":  # conftest turned the interpreter on
        assert select_attention_backend(torch.device("cpu"), "triton").name == "triton"
    else:
        with pytest.raises(ValueError, match="needs a CUDA device"):
            select_attention_backend(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        select_attention_backend(torch.device("cpu"), "flash")
    if torch.cuda.is_available():
        assert select_attention_backend(torch.device("cuda")).name == "triton"


@gpu
@pytest.mark.parametrize("kv", ["16bit", *FP8_KV])
@pytest.mark.parametrize("kv_heads,group,head_dim,dtype", [(8, 4, 128, torch.bfloat16), (3, 3, 64, torch.float16),
                                                           (2, 8, 128, torch.bfloat16), (4, 1, 64, torch.bfloat16)])
def test_gpu_sweep(kv, kv_heads, group, head_dim, dtype, gen):
    """Random batch compositions over long contexts, several pages and windows."""
    rng = random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    for page, window in [(16, None), (32, None), (16, 1000)]:
        kinds = [(rng.randrange(3000), 1) for _ in range(rng.randrange(1, 40))]  # decodes
        kinds += [(rng.choice([0, rng.randrange(2000)]), rng.randrange(1, 1500)) for _ in range(rng.randrange(4))]
        blocks = sum(-(-(c + n + 1) // page) for c, n in kinds) + 20000 // page
        pair = Pair(gen, kv_heads, group, head_dim, page, blocks, dtype, FP8_KV.get(kv), window)
        pair.step([(i, c, n) for i, (c, n) in enumerate(kinds)])
        pair.step([(i, c + n, 1) for i, (c, n) in enumerate(kinds)])  # then all decode, reading the writes
        pair.step([(0, 20000 - 1, 1)]) if page == 32 else None  # one very long decode: split-KV


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
def test_gpu_generation_matches_torch_backend(kv_cache_dtype):
    """Greedy generation (smollm2-135m shapes, dummy weights, bf16): the first tokens equal the torch backend's on
    the same engine, the backend swapped in with prefix caching off so every key is recomputed."""
    from quantkit import LLM, SamplingParams
    from quantkit.engine.kv_cache import attention_layers
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", dtype="bfloat16", skip_tokenizer_init=True,
              kv_cache_dtype=kv_cache_dtype, attention_backend="triton", num_kv_blocks=256,
              enable_prefix_caching=False)
    prompts = [[(11 * i + 5 * j) % 40000 + 100 for j in range(n)] for i, n in enumerate([9, 200, 700])]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for backend in (_triton(), TorchAttentionBackend()):
        for layer in attention_layers(llm.llm_engine.model):
            layer.backend = backend
        outs[backend.name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["triton"] == outs["torch"]
