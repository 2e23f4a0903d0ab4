"""The paged torch attention path (KV pool, block tables, chunked prefill, decode, mixed batches, FP8 cache)
must give the logits of the no-cache full prefill."""
from __future__ import annotations

import pytest
import torch

from quantkit.checkpoint.resolve import ModelSource
from quantkit.kernels.attention_torch import causal_mask, gather_kv, write_kv
from quantkit.layers.attention import Attention, AttentionMetadata
from quantkit.models.loader import build_model

CPU = torch.device("cpu")
BLOCK = 16
NUM_BLOCKS = 12
TOL = 1e-5

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 96, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
CONFIGS = {"llama-gqa": BASE,
           "mistral-window": {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 12}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, helpers):
    m = build_model(ModelSource(request.param, None, dict(CONFIGS[request.param])), torch.float32, CPU, dummy=True)
    helpers.randomize_(m, seed=7, std=0.2)  # larger weights than the dummy init: peaked attention, so errors show
    return m


def attach_cache(model, dtype=torch.float32, scale: float = 1.0) -> None:
    cfg = model.config
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        attn.kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
        attn.k_scale.fill_(scale)
        attn.v_scale.fill_(scale)


def detach_cache(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.attn.kv_cache = None
        layer.self_attn.attn.k_scale.fill_(1.0)
        layer.self_attn.attn.v_scale.fill_(1.0)


def block_table(seed: int, n: int = 4) -> list[int]:
    """Shuffled, non-contiguous physical blocks."""
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def step(model, parts: list[tuple[torch.Tensor, list[int], int, int]]) -> torch.Tensor:
    """One engine step. parts: (token ids of the whole sequence, its block table, tokens already cached, tokens
    new this step). Returns the logits of every new token, in order."""
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for tokens, table, cached, new in parts:
        pos = list(range(cached, cached + new))
        ids.append(tokens[cached:cached + new])
        positions += pos
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in pos]
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
    width = max(len(p[1]) for p in parts)
    tables = torch.tensor([p[1] + [0] * (width - len(p[1])) for p in parts], dtype=torch.int32)
    meta = AttentionMetadata(query_start_loc=torch.tensor(starts, dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc_cpu=starts,
                             seq_lens_cpu=seq_lens, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                             block_tables=tables)
    with torch.no_grad():
        return model.compute_logits(model(torch.cat(ids), torch.tensor(positions), meta))


def reference(model, tokens: torch.Tensor) -> torch.Tensor:
    detach_cache(model)
    with torch.no_grad():
        hidden = model(tokens, torch.arange(len(tokens)), AttentionMetadata.for_prefill([len(tokens)]))
        return model.compute_logits(hidden)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


SEQ = 45  # 3 blocks of 16, the last one partial; longer than the Mistral window (12)


def test_full_prefill_with_cache(model):
    ids = tokens(SEQ, 0)
    ref = reference(model, ids)
    attach_cache(model)
    assert rel(step(model, [(ids, block_table(1), 0, SEQ)]), ref) <= TOL


@pytest.mark.parametrize("split", [1, 16, 20, 44])
def test_chunked_prefill(model, split):
    ids, table = tokens(SEQ, 1), block_table(2)
    ref = reference(model, ids)
    attach_cache(model)
    first = step(model, [(ids, table, 0, split)])
    rest = step(model, [(ids, table, split, SEQ - split)])
    assert rel(torch.cat([first, rest]), ref) <= TOL


def test_prefill_then_decodes(model):
    ids, table = tokens(SEQ, 2), block_table(3)
    ref = reference(model, ids)
    attach_cache(model)
    prompt = 13
    out = [step(model, [(ids, table, 0, prompt)])]
    out += [step(model, [(ids, table, n, 1)]) for n in range(prompt, SEQ)]  # crosses block boundaries 16 and 32
    assert rel(torch.cat(out), ref) <= TOL


def test_mixed_decode_and_prefill_batch(model):
    a, b = tokens(SEQ, 3), tokens(30, 4)
    ta = block_table(5, 3)
    tb = [blk for blk in block_table(6, NUM_BLOCKS) if blk not in ta][:2]  # disjoint from a's blocks
    ref_a, ref_b = reference(model, a), reference(model, b)
    attach_cache(model)
    first = step(model, [(a, ta, 0, SEQ - 1)])
    mixed = step(model, [(a, ta, SEQ - 1, 1), (b, tb, 0, 30)])  # a decodes while b prefills, one step
    assert rel(torch.cat([first, mixed[:1]]), ref_a) <= TOL
    assert rel(mixed[1:], ref_b) <= TOL
    # b then decodes on its own: its prefill went into the right blocks
    b2 = torch.cat([b, tokens(1, 9)])
    ref_b2 = reference(model, b2)
    attach_cache(model)
    step(model, [(b2, tb, 0, 30)])
    assert rel(step(model, [(b2, tb, 30, 1)]), ref_b2[30:]) <= TOL


def test_cache_is_actually_read(model):
    """A decode against a wiped pool must go wrong: the paged path does not silently ignore the cache."""
    ids, table = tokens(SEQ, 5), block_table(7)
    ref = reference(model, ids)
    attach_cache(model)
    step(model, [(ids, table, 0, SEQ - 1)])
    for layer in model.model.layers:
        layer.self_attn.attn.kv_cache.zero_()
    assert rel(step(model, [(ids, table, SEQ - 1, 1)]), ref[-1:]) > 1e-2


def _kv_amax(model, ids: torch.Tensor) -> list[tuple[float, float]]:
    """Per-layer max |K| and |V| of a no-cache run (what a KV-scale calibration measures)."""
    amax, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.attn.register_forward_pre_hook(
            lambda mod, args: amax.append((args[1].abs().max().item(), args[2].abs().max().item()))))
    reference(model, ids)
    for h in hooks:
        h.remove()
    return amax


def _fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).to(torch.float8_e4m3fn).float() * scale


def test_fp8_cache(model, monkeypatch):
    ids, table = tokens(SEQ, 6), block_table(8)
    ref = reference(model, ids)
    amax = _kv_amax(model, ids)
    attach_cache(model, torch.float8_e4m3fn)
    for layer, (k_max, v_max) in zip(model.model.layers, amax):
        layer.self_attn.attn.k_scale.fill_(k_max / 448)
        layer.self_attn.attn.v_scale.fill_(v_max / 448)
    prompt = 30
    out = [step(model, [(ids, table, 0, prompt)])]
    out += [step(model, [(ids, table, n, 1)]) for n in range(prompt, SEQ)]
    out = torch.cat(out)
    cache = model.model.layers[0].self_attn.attn.kv_cache
    assert cache.dtype == torch.float8_e4m3fn and cache.float().abs().sum() > 0
    assert torch.isfinite(out).all()
    assert 0 < rel(out, ref) <= 0.3  # lossy but close (random weights with peaked attention amplify errors)
    # Exactly what the no-cache path gives when K and V are rounded through E4M3 with the same scales.
    scales = {id(l.self_attn.attn): (l.self_attn.attn.k_scale.clone(), l.self_attn.attn.v_scale.clone())
              for l in model.model.layers}
    real_forward = Attention.forward

    def fake_quant_forward(self, q, k, v, meta):
        ks, vs = scales[id(self)]
        return real_forward(self, q, _fake_quant_fp8(k, ks), _fake_quant_fp8(v, vs), meta)
    monkeypatch.setattr(Attention, "forward", fake_quant_forward)
    assert rel(out, reference(model, ids)) <= TOL


# --- unit level -------------------------------------------------------------------------------------------------

def test_causal_mask_semantics():
    # 3 new queries at positions 5, 6, 7 of an 8-token context, window 3: keys q-2..q.
    mask = causal_mask(3, 8, 3, CPU)
    expected = torch.zeros(3, 8, dtype=torch.bool)
    for j, q in enumerate((5, 6, 7)):
        expected[j, q - 2:q + 1] = True
    assert torch.equal(mask, expected)
    assert torch.equal(causal_mask(4, 4, None, CPU), torch.ones(4, 4, dtype=torch.bool).tril())


def _layer(dtype=torch.float32):
    layer = Attention(4, 8, 2, None, backend=None)
    layer.kv_cache = torch.zeros(2, 3, 4, 2, 8, dtype=dtype)  # 3 blocks of 4
    return layer


def test_write_kv_skips_minus_one_and_gather_follows_block_table():
    layer = _layer()
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    write_kv(layer, k, v, torch.tensor([9, 10, -1, 4, 5]))  # block 2 offsets 1-2, skip, block 1 offsets 0-1
    flat = layer.kv_cache.view(2, -1, 2, 8)
    assert torch.equal(flat[0, [9, 10, 4, 5]], k[[0, 1, 3, 4]])
    assert torch.equal(flat[1, [9, 10, 4, 5]], v[[0, 1, 3, 4]])
    assert int((flat.abs().sum(dim=(-1, -2)) > 0).sum()) == 8  # nothing else written
    keys, values = gather_kv(layer, torch.tensor([2, 1, 0], dtype=torch.int32), 6, torch.float32)
    assert keys.shape == (6, 2, 8)
    assert torch.equal(keys[:4], flat[0, 8:12]) and torch.equal(keys[4:], flat[0, 4:6])
    assert torch.equal(values[1:3], v[:2])


def test_fp8_write_divides_and_gather_multiplies_by_scale():
    layer = _layer(torch.float8_e4m3fn)
    layer.k_scale.fill_(0.5)
    layer.v_scale.fill_(0.25)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    write_kv(layer, k, v, torch.arange(4))
    stored = layer.kv_cache.view(2, -1, 2, 8)
    assert torch.equal(stored[0, :4].float(), (k / 0.5).to(torch.float8_e4m3fn).float())
    assert torch.equal(stored[1, :4].float(), (v / 0.25).to(torch.float8_e4m3fn).float())
    keys, values = gather_kv(layer, torch.tensor([0], dtype=torch.int32), 4, torch.float32)
    assert torch.equal(keys, stored[0, :4].float() * 0.5)
    assert torch.equal(values, stored[1, :4].float() * 0.25)
    torch.testing.assert_close(keys, k, rtol=0.07, atol=0.01)
