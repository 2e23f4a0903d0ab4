"""compressed-tensors pack-quantized (W4A16 / W8A16) against compressed-tensors' own compressor, the shared
packing primitives against its pack_to_int32, and the kernel format's checks."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from quantkit.layers.linear import Linear
from quantkit.quant.base import QuantConfig
from quantkit.quant.primitives import pack, unpack
from quantkit.quant.wna16 import (
    PackQuantizedMethod,
    dequantize_kernel_weights,
    verify_linears,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams


class PackQuantizedStub(QuantConfig):
    """Stands in for the compressed-tensors config: every decoder Linear gets PackQuantizedMethod(**kwargs)."""
    name = "pack-quantized"

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def get_method(self, layer, prefix):
        return None if prefix == "lm_head" else PackQuantizedMethod(**self.kwargs)

    def verify(self, model_config) -> None:
        verify_linears(self, model_config)


def ct_tensors(w: torch.Tensor, bits: int, group: int, sym: bool, actorder: bool,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' qparams, quantize and packing of weight [N, K] -> (checkpoint tensors, its own
    dequantization [N, K]). act-order quantizes groups over a random column order and writes weight_g_idx."""
    n, k = w.shape
    g = k if group == -1 else group
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group > 0 else "channel",
                            group_size=group if group > 0 else None)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if actorder else torch.arange(k)
    cols = [w[:, perm][:, i:i + g] for i in range(0, k, g)]  # the last group may be ragged
    scale, zp = calculate_qparams(torch.stack([c.amin(1) for c in cols], 1), torch.stack([c.amax(1) for c in cols], 1),
                                  args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    if not actorder:
        state = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                      scheme)
        return dict(state), PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    q = ct_forward.quantize(w[:, perm], scale, zp, args, dtype=torch.int8)
    inv = perm.argsort()
    state = {"weight_packed": ct_helpers.pack_to_int32(q[:, inv], bits), "weight_scale": scale,
             "weight_shape": torch.tensor([n, k]), "weight_g_idx": (inv // g).to(torch.int32)}
    if not sym:
        state["weight_zero_point"] = ct_helpers.pack_to_int32(zp.to(torch.int8), bits, packed_dim=0)
    return state, ct_forward.dequantize(q, scale, zp, args)[:, inv]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 576), (3, 100), (2, 33)])
def test_pack_matches_compressed_tensors(bits, shape):
    v = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8,
                      generator=torch.Generator().manual_seed(bits))
    for dim in (0, 1):
        ref = ct_helpers.pack_to_int32(v, bits, packed_dim=dim)
        ours = pack(v.int() + 2 ** (bits - 1), bits, dim=dim)
        assert torch.equal(ours, ref)
        assert torch.equal(unpack(ours, bits, shape[dim], dim=dim), v.int() + 2 ** (bits - 1))


SWEEP = [  # (K, shard sizes, bits, group, sym, actorder)
    (576, [192, 64, 64], 4, 64, True, False),
    (576, [192, 64], 4, 32, False, False),
    (1536, [576], 4, 128, True, True),
    (192, [96, 64], 8, 32, False, True),
    (576, [192, 192], 8, -1, True, False),
    (576, [192, 64], 4, -1, False, False),
]


@pytest.mark.parametrize("k,sizes,bits,group,sym,actorder", SWEEP)
def test_dequantize_matches_compressed_tensors(k, sizes, bits, group, sym, actorder):
    method_args = {"num_bits": bits, "group_size": group if group > 0 else None, "symmetric": sym,
                       "actorder": "group" if actorder else None, "strategy": "group" if group > 0 else "channel"}
    names = [f"s{i}" for i in range(len(sizes))]
    layer = Linear(k, sizes, False, torch.float32, PackQuantizedStub(**method_args), "model.layers.0.x_proj", names)
    gen = torch.Generator().manual_seed(k + bits)
    deqs = []
    for shard, n in enumerate(sizes):
        tensors, deq = ct_tensors(torch.randn(n, k, generator=gen), bits, group, sym, actorder, seed=k)
        for name, t in tensors.items():
            layer.load_weight(getattr(layer, name), t, shard if len(sizes) > 1 else None)
        deqs.append(deq)
    layer.quant_method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight_packed")
    ref = torch.cat(deqs)
    w = dequantize_kernel_weights(layer.qweight, layer.qzeros, layer.scales, bits,
                                  layer.quant_method.groups(k)[0], k)
    if actorder:
        w = w[layer.perm.argsort()]
    assert torch.equal(w, ref.t())
    x = torch.randn(4, k, generator=gen)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group,sym,actorder", [(4, 128, True, False), (4, 64, False, True),
                                                     (8, -1, True, False)])
def test_end_to_end_matches_dequantized_reference(tmp_path, helpers, qh, bits, group, sym, actorder):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    q_dir, ref_dir = qh.write_pair(tmp_path, helpers, lambda m, w: ct_tensors(w, bits, group, sym, actorder), qc)
    stub = PackQuantizedStub(num_bits=bits, group_size=group if group > 0 else None, symmetric=sym,
                             actorder="group" if actorder else None, strategy="group" if group > 0 else "channel")
    qh.assert_same_model(q_dir, ref_dir, helpers, bits, group, quant_config=stub)


def test_weight_shape_disagreeing_is_an_error():
    layer = Linear(128, [64], False, torch.float32, PackQuantizedStub(num_bits=4, group_size=64, symmetric=True,
                                                                      actorder=None, strategy="group"),
                   "model.layers.0.mlp.down_proj")
    tensors, _ = ct_tensors(torch.randn(64, 128), 4, 64, True, False)
    tensors["weight_shape"] = torch.tensor([64, 120])
    for name, t in tensors.items():
        layer.load_weight(getattr(layer, name), t, None)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_shape is \[64, 120\]"):
        layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("kwargs,match", [({"num_bits": 5}, "5-bit"), ({"strategy": "block"}, "block"),
                                          ({"group_size": None}, "positive group_size"),
                                          ({"actorder": "bogus"}, "actorder")])
def test_bad_pack_quantized_args(kwargs, match):
    args = {"num_bits": 4, "group_size": 128, "symmetric": True, "actorder": None, "strategy": "group"}
    with pytest.raises(ValueError, match=match):
        PackQuantizedMethod(**{**args, **kwargs})


def test_asym_zero_points_need_whole_words_per_shard(embedded_source):
    from quantkit.config import ModelConfig
    cfg = ModelConfig.from_hf({**embedded_source.hf_config, "num_key_value_heads": 1, "head_dim": 36,
                               "num_attention_heads": 16})
    stub = PackQuantizedStub(num_bits=4, group_size=64, symmetric=False, actorder=None, strategy="group")
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.self_attn\.k_proj: out_features 36"):
        stub.verify(cfg)
    PackQuantizedStub(num_bits=4, group_size=64, symmetric=True, actorder=None, strategy="group").verify(cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.self_attn\.qkv_proj: in_features 576 not divisible"):
        PackQuantizedStub(num_bits=4, group_size=128, symmetric=True, actorder=None, strategy="group").verify(cfg)
