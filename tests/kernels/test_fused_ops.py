"""The Triton small ops (kernels/fused_ops.py: RMSNorm with residual, rotary, SiLU-and-mul, and their fused
per-token quantization) against the layers' torch code, on fresh random data; the W8A8 Linear taking
pre-quantized activations; and a tiny Llama whose Triton path matches its torch path.

Tolerances. The kernels round to the activation dtype where the eager reference rounds, so 16-bit outputs equal
the reference's except where an fp32 step (rsqrt, exp, summation order) differs by an ulp across a rounding
boundary: every element within one ulp of the dtype (|out - ref| <= eps * |ref|) and at most 1% of elements
differing at all; fp32 outputs within 16 eps relative (GPU exp, rsqrt and division are approximate). Rotary:
within eps * (|x1| + |x2|) of the pair it rotates (the reference's own rounding error; fp32 FMA contraction). The
residual sum is bit-exact. Quantized outputs: scales within 1e-6 relative of quantize_dynamic applied to the
kernel's own float output, codes equal to its codes except one-step differences in at most 1% of elements (the
quantizing launch may land an ulp away from the float launch)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from quantkit.checkpoint.resolve import ModelSource
from quantkit.config import RopeConfig
from quantkit.kernels.triton_common import round_to
from quantkit.kernels.cuda_row_quant import use_cuda_row_quant
from quantkit.layers import fused
from quantkit.layers.activation import SiluAndMul
from quantkit.layers.attention import AttentionMetadata, use_attention_backend
from quantkit.layers.fused import use_fused_ops
from quantkit.layers.norm import RMSNorm
from quantkit.layers.rotary import RotaryEmbedding
from quantkit.models.loader import build_model
from quantkit.quant.registry import get_quant_config
from quantkit.quant.w8a8 import (
    FP8,
    INT8,
    QuantizedActivation,
    W8Type,
    quantize_activation,
    quantize_dynamic,
)
from tests.kernels.conftest import DEVICE, TOLERANCE, capture, gpu, poison_outputs, w8a8_layer

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
QTYPES = {"fp8": FP8, "int8": INT8}


def _run(path: str, fn, *args):
    with use_fused_ops(path):
        return fn(*args)


def _ulp_bound(dtype: torch.dtype) -> float:
    """assert_close_ulp's relative bound for `dtype`."""
    return torch.finfo(dtype).eps * (16 if dtype == torch.float32 else 2)


def assert_close_ulp(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor | None = None) -> None:
    """Within eps of the dtype (fp32: 16 eps, as GPU exp, rsqrt and division are approximate; 16-bit: 2 eps, as an
    fp32 step on the other side of a rounding boundary is rounded twice, e.g. RMSNorm's normalized value and its
    product with the weight: measured on H200 at hidden 4096) relative to `bound` (default |ref|, plus the
    subnormal step); 16-bit: at most 1% of elements differ at all."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    diff = (out.float() - ref.float()).abs()
    limit = _ulp_bound(out.dtype) * ((ref.float().abs() if bound is None else bound) + torch.finfo(out.dtype).tiny)
    assert (diff <= limit).all(), f"{out.dtype}: {(diff > limit).sum().item()} elements beyond the bound"
    if out.dtype != torch.float32:
        assert (diff > 0).float().mean().item() <= 0.01


def assert_quantized_like(qa: QuantizedActivation, values: torch.Tensor, qtype: W8Type) -> None:
    """`qa` is quantize_dynamic of `values` (the same op's float output): scales to one ulp of the values' dtype
    (fp32: assert_close_ulp's 16, as the row's amax itself may differ that much: H100, RMSNorm, 2 ulps), codes but
    for one-step differences in at most 1% of elements: the quantizing launch may land an ulp away from the float
    launch (the 1% assert_close_ulp allows), which moves a row's scale by that ulp when the element is the
    row's amax (H100, fp16, T = 4096: about one run in five), and near the row's amax one bf16 ulp is about one INT8
    step (measured on H200: 0.17% of codes at hidden 4096)."""
    ref_q, ref_s = quantize_dynamic(values.reshape(-1, values.shape[-1]).float(), qtype)
    assert qa.q.dtype == qtype.dtype and qa.q.shape == values.shape and qa.dtype == values.dtype
    assert qa.scale.shape == (*values.shape[:-1], 1) and qa.scale.dtype == torch.float32
    ulp = _ulp_bound(values.dtype) if values.dtype == torch.float32 else torch.finfo(values.dtype).eps
    assert ((qa.scale.reshape(-1, 1) - ref_s).abs() <= ulp * ref_s).all()
    got, want = qtype.to_float(qa.q.reshape(ref_q.shape)), qtype.to_float(ref_q)
    differ = got != want
    assert differ.float().mean().item() <= 1e-2
    step = torch.where(want.abs() < 2 ** -6, torch.full_like(want, 2 ** -9), want.abs() / 8) if not qtype.is_int \
        else torch.ones_like(want)
    assert ((got - want).abs() <= step).all(), "a code differs by more than one step"


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _norm(n: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    with torch.device(DEVICE):
        norm = RMSNorm(n, 1e-5, dtype)
    norm.weight.data.copy_(1.0 + 0.3 * torch.randn(n, generator=gen))
    return norm


# ---- RMSNorm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,t", [(576, 5), (1000, 40), (64, 37)])  # 40 and 37 rows: several rows per program
def test_rms_norm(n, t, dtype, gen):
    norm = _norm(n, dtype, gen)
    x, res = _rand(gen, t, n, scale=3, dtype=dtype), _rand(gen, t, n, dtype=dtype)
    ref_out, ref_res = _run("torch", norm, x, res)
    out, new_res = _run("triton", norm, x, res)
    assert torch.equal(new_res, ref_res)
    assert_close_ulp(out, ref_out)
    assert_close_ulp(_run("triton", norm, x), _run("torch", norm, x))
    for qtype in QTYPES.values():
        qa, quant_res = _run("triton", norm, x, res, qtype)
        assert torch.equal(quant_res, ref_res)
        assert_quantized_like(qa, out, qtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_writes_permuted_columns(dtype, gen):
    """out_perm (an act-order Linear's input order): output column j is column perm[j] of the unpermuted output,
    the residual keeps its order; the Triton kernel matches, quantized too; a wrong perm is refused by name."""
    n, t = 576, 40
    norm = _norm(n, dtype, gen)
    x, res = _rand(gen, t, n, scale=3, dtype=dtype), _rand(gen, t, n, dtype=dtype)
    plain_out, plain_res = _run("torch", norm, x, res)
    perm = torch.randperm(n, generator=gen).to(torch.int32).to(DEVICE)
    norm.out_perm = perm
    ref_out, ref_res = _run("torch", norm, x, res)
    assert torch.equal(ref_out, plain_out[:, perm.long()]) and torch.equal(ref_res, plain_res)
    out, new_res = _run("triton", norm, x, res)
    assert torch.equal(new_res, ref_res)
    assert_close_ulp(out, ref_out)
    assert_close_ulp(_run("triton", norm, x), _run("torch", norm, x))
    qa, _ = _run("triton", norm, x, res, INT8)
    assert_quantized_like(qa, out, INT8)
    norm.out_perm = perm[:-1]
    with pytest.raises(ValueError, match=r"rms_norm: perm must be int32 \[576\]"):
        _run("triton", norm, x, res)


def test_rms_norm_3d_and_strided_rows(gen):
    """[B, S, H] activations, and rows with a stride (a slice of a wider tensor)."""
    norm = _norm(200, torch.bfloat16, gen)
    x = _rand(gen, 2, 3, 200, dtype=torch.bfloat16)
    assert_close_ulp(_run("triton", norm, x), _run("torch", norm, x))
    wide, res = _rand(gen, 7, 300, dtype=torch.bfloat16)[:, :200], _rand(gen, 7, 200, dtype=torch.bfloat16)
    assert_close_ulp(_run("triton", norm, wide, res)[0], _run("torch", norm, wide, res)[0])


# ---- rounding ----------------------------------------------------------------------------------------------


@triton.jit
def _round_trip(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i, mask=i < n)
    tl.store(out_ptr + i, round_to(v, DTYPE).to(tl.float32), mask=i < n)  # down and straight back up


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_to_rounds_as_an_eager_cast(dtype, gen):
    """Every magnitude (16-bit subnormals, ties, overflow to inf) rounds as torch's cast does, also when the
    kernel casts straight back to fp32 (which a GPU compiler may fold away)."""
    x = torch.cat([torch.randn(512, generator=gen) * s for s in (1e-7, 1e-5, 6e-5, 1e-2, 1.0, 300.0, 6e4, 1e38)] +
                  [torch.tensor([65504.0, 65519.0, 65520.0, -65520.0, 2.0 ** -25, 1.5 * 2.0 ** -24, 0.0, -0.0])])
    x = x.to(DEVICE)
    out = torch.empty_like(x)
    _round_trip[(1,)](x, out, x.numel(), DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16,
                      BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(out, x.to(dtype).float())


# ---- rotary ------------------------------------------------------------------------------------------------


def check_rotary(t: int, head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """q and k are views of one qkv output, as LlamaAttention makes them; v must stay untouched."""
    rope = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
    with torch.device(DEVICE):
        rotary = RotaryEmbedding(head_dim, 512, rope)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = _rand(gen, t, sum(sizes), scale=2, dtype=dtype)
    positions = torch.randint(0, 512, (t,), generator=gen).to(DEVICE)

    def views(z):
        q, k, v = z.split(sizes, dim=-1)
        return q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v

    q_ref, k_ref = _run("torch", rotary, positions, *views(qkv.clone())[:2])
    q, k, v = views(qkv.clone())
    q_out, k_out = _run("triton", rotary, positions, q, k)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(v, views(qkv)[2])
    for out, ref, x in ((q_out, q_ref, views(qkv)[0]), (k_out, k_ref, views(qkv)[1])):
        pair = x.float().abs() + torch.cat(x.float().abs().chunk(2, dim=-1)[::-1], dim=-1)
        assert_close_ulp(out, ref, bound=pair)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 2), (128, 3, 1), (80, 2, 2)])
def test_rotary_in_place_on_qkv_views(head_dim, heads, kv_heads, dtype, gen):
    check_rotary(11, head_dim, heads, kv_heads, dtype, gen)


# ---- SiLU-and-mul ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,t", [(576, 5), (1000, 3), (5000, 2), (33000, 1), (1004, 70)])  # 33000: quant mode
def test_silu_and_mul(inter, t, dtype, gen):  # loops (Triton); 1004 (not a multiple of 8): Triton on Hopper too
    act = SiluAndMul()
    x = _rand(gen, t, 2 * inter, scale=2, dtype=dtype)
    out = _run("triton", act, x)
    assert_close_ulp(out, _run("torch", act, x))
    for qtype in QTYPES.values():
        assert_quantized_like(_run("triton", act, x, qtype), out, qtype)
        with use_cuda_row_quant(False):  # the Triton kernel where the cluster kernel serves by default
            assert_quantized_like(_run("triton", act, x, qtype), out, qtype)


@gpu
@pytest.mark.parametrize("silu_mul", [True, False], ids=["silu_and_mul", "plain"])
@pytest.mark.parametrize("cols,t", [(576, 300), (14336, 16), (4096, 1), (65536, 2)])
def test_cluster_row_quant(cols, t, silu_mul, gen):
    """csrc/row_quant.cu at every cluster size that covers the row (1 to 8 blocks per row), on a strided view of
    wider rows (x is read with its row stride), outputs poisoned: plain quant equal to the Triton kernel's (which
    equals the torch reference's bit for bit: test_w8a8_kernels), SiLU-and-mul quantized like the float op's
    output (the fp32 exp and division may land an ulp apart)."""
    from quantkit.kernels.triton_w8a8 import quantize_per_token
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")
    width = 2 * cols if silu_mul else cols
    x = _rand(gen, t, width + 24, scale=2, dtype=torch.bfloat16)[:, :width]
    values = SiluAndMul()(x) if silu_mul else x
    for qtype in QTYPES.values():
        with use_cuda_row_quant(False):
            want = QuantizedActivation(*quantize_per_token(x, qtype.dtype), x.dtype) if not silu_mul else None
        for clusters in range(1, 9):
            if -(-cols // 8 // clusters) > 1024:
                continue
            q = torch.full((t, cols), -99.0 if qtype.is_int else float("nan"), device=DEVICE).to(qtype.dtype)
            scale = torch.full((t, 1), float("nan"), device=DEVICE)
            torch.ops.quantkit.row_quant(x, q, scale, silu_mul, clusters)
            got = QuantizedActivation(q, scale, x.dtype)
            if silu_mul:
                assert_quantized_like(got, values, qtype)
            else:
                assert torch.equal(scale, want.scale), f"{clusters} blocks per row: scales differ"
                assert torch.equal(qtype.to_float(q), qtype.to_float(want.q)), f"{clusters} blocks: codes differ"


@gpu
def test_cluster_row_quant_refuses_what_it_cannot_take(gen):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")
    x = _rand(gen, 4, 64, dtype=torch.bfloat16)
    q, s = torch.empty(4, 64, dtype=torch.int8, device=DEVICE), torch.empty(4, 1, device=DEVICE)
    op = torch.ops.quantkit.row_quant
    with pytest.raises(RuntimeError, match="cluster_size must be in"):
        op(x, q, s, False, 9)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        op(x[:, :60], q[:, :60], s, False, 1)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        op(x.float(), q, s, False, 1)
    with pytest.raises(RuntimeError, match=r"q must be int8 or float8_e4m3fn \[T, C\] = \[4, 32\]"):
        op(x, q, s, True, 1)
    with pytest.raises(RuntimeError, match="over 1024"):
        op(_rand(gen, 1, 16384, dtype=torch.bfloat16), torch.empty(1, 16384, dtype=torch.int8, device=DEVICE),
           s[:1], False, 1)


def test_zero_row_quantizes_to_the_scale_floor(gen):
    x = _rand(gen, 3, 2 * 96, dtype=torch.bfloat16)
    x[1] = 0
    qa = _run("triton", SiluAndMul(), x, INT8)
    assert qa.scale[1].item() == pytest.approx(1e-12) and not qa.q[1].any()


# ---- dispatch ----------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch, gen):
    x = _rand(gen, 2, 8)
    with use_fused_ops(None):
        assert (fused.triton_ops(x) is not None) == (DEVICE.type == "cuda")
    with pytest.raises(ValueError, match="fused ops 'cuda'"), use_fused_ops("cuda"):
        pass
    if DEVICE.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(fused, "_checked", set())
        with pytest.raises(ValueError, match="need a CUDA device"), use_fused_ops("triton"):
            fused.triton_ops(x)


# ---- the W8A8 Linear taking pre-quantized activations ------------------------------------------------------


def _w8a8_kernels():
    from quantkit.kernels import triton_w8a8
    kernels = [triton_w8a8.TritonW8A8, triton_w8a8.TritonW8A8SplitK]
    return kernels + [triton_w8a8.ScaledMMFP8] if DEVICE.type == "cuda" else kernels


@pytest.mark.parametrize("qname", QTYPES)
def test_w8a8_takes_quantized_activation(qname, gen):
    """A QuantizedActivation gives what the float input gives (the codes are the same), through the torch
    reference and every Triton kernel; static-scale layers do not ask for one, and wrong codes are refused."""
    qtype = QTYPES[qname]
    layer = w8a8_layer(320, 160, qname == "fp8", False, torch.bfloat16, bias=True, gen=gen)
    method = layer.quant_method
    assert method.input_quant == qtype
    x = _rand(gen, 6, 320, dtype=torch.bfloat16)
    qa = quantize_activation(x, qtype)
    assert torch.equal(method.reference_apply(layer, qa, layer.bias), method.reference_apply(layer, x, layer.bias))
    for cls in _w8a8_kernels():
        if not cls.can_implement(layer, method, DEVICE)[0]:
            continue
        kernel = cls(layer, method)
        out, ref = kernel.apply(layer, qa, layer.bias), kernel.apply(layer, x, layer.bias)
        assert out.shape == ref.shape == (6, 160) and out.dtype == torch.bfloat16
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < TOLERANCE[torch.bfloat16]
    other = quantize_activation(x, INT8 if qtype == FP8 else FP8)
    with pytest.raises(ValueError, match="was handed"):
        method.reference_apply(layer, other, None)
    static = w8a8_layer(320, 160, qname == "fp8", True, torch.bfloat16, bias=False, gen=gen)
    assert static.quant_method.input_quant is None


# ---- the model ---------------------------------------------------------------------------------------------

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "vocab_size": 256, "hidden_size": 192, "intermediate_size": 320,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 128,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_llama(dtype: torch.dtype, quantization: str | None, device: torch.device = DEVICE, **shape):
    """Dummy weights with random norm weights (dummy norms are all ones, which would hide a norm weight bug)."""
    cfg = {**TINY, **shape}
    qc = get_quant_config(quantization, None, dummy=True)
    model = build_model(ModelSource("tiny", None, cfg), dtype, device, dummy=True, quant_config=qc, seed=5)
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


@torch.no_grad()
def _logits(model, helpers, path: str) -> torch.Tensor:
    """Logits of two sequences run as one no-cache prefill on the model's device."""
    seqs = helpers.random_seqs([13, 6], TINY["vocab_size"], seed=1)
    ids = torch.cat(seqs).to(DEVICE)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).to(DEVICE)
    with use_fused_ops(path):
        hidden = model(ids, positions, AttentionMetadata.for_prefill([len(s) for s in seqs], DEVICE))
        return model.compute_logits(hidden)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_act_order_permutations_fold_into_the_ops_before(path, helpers, monkeypatch):
    """GPTQ act-order: the norms write qkv's and gate_up's input order, attention o_proj's, and gate_up's columns
    come out in down's, so no Linear gathers; the logits are bit-identical to the unfolded model on CPU (Triton
    attention and small ops on the "triton" path), and close on a GPU, where the Linears run other kernels with and
    without a gather (TF32 dots for fp32 activations, split-K partials added in no fixed order)."""
    from quantkit.models.llama import LlamaDecoderLayer
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}

    def act_order_llama():
        qc = get_quant_config("gptq", None, {"desc_act": True}, dummy=True)
        with use_attention_backend(path):
            return build_model(ModelSource("tiny", None, {**TINY, **shape}), torch.float32, DEVICE, dummy=True,
                               quant_config=qc, seed=5)
    folded = act_order_llama()
    with monkeypatch.context() as m:
        m.setattr(LlamaDecoderLayer, "fold_input_permutations", lambda self: None)
        plain = act_order_llama()
    for layer, before in zip(folded.model.layers, plain.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert all(lin.perm is None for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        assert torch.equal(attn.attn.out_dest[before.self_attn.o_proj.perm.long()], torch.arange(256, device=DEVICE))
        assert torch.equal(layer.input_layernorm.out_perm, before.self_attn.qkv_proj.perm)
        assert torch.equal(layer.post_attention_layernorm.out_perm, before.mlp.gate_up_proj.perm)
    tol = 2e-3 if DEVICE.type == "cuda" else 0.0
    torch.testing.assert_close(_logits(folded, helpers, path), _logits(plain, helpers, path), rtol=tol, atol=tol)


MODEL_CASES = [(torch.float32, None, 1e-4), (torch.bfloat16, None, 2e-2), (torch.float16, "fp8", 2e-2),
               (torch.bfloat16, "fp8", 3e-2), (torch.bfloat16, "int8", 3e-2)]


@pytest.mark.parametrize("dtype,quantization,tol", MODEL_CASES)
def test_model_triton_path_matches_torch_path(dtype, quantization, tol, helpers):
    """Same logits (max |diff| / max |ref|) through the Triton and the torch small ops; W8A8 models take the fused
    quant path (every Linear after a norm or SiLU-and-mul is handed codes)."""
    model = tiny_llama(dtype, quantization)
    handed: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: handed.append(isinstance(args[0], QuantizedActivation)))
             for name, m in model.named_modules() if name.endswith(("qkv_proj", "gate_up_proj", "down_proj"))]
    ref = _logits(model, helpers, "torch")
    out = _logits(model, helpers, "triton")
    for h in hooks:
        h.remove()
    assert handed == [quantization is not None] * len(handed) and len(handed) == 2 * 3 * TINY["num_hidden_layers"]
    assert torch.isfinite(out).all()
    err = helpers.max_rel_err(out, ref)
    print(f"max relative error {err:.2e}")
    assert err <= tol, f"max relative error {err:.2e}"


def test_fused_quant_changes_nothing_on_the_torch_path(helpers):
    """The hand-off is exact: the norm's and SiLU's torch quantization is the Linear's own, bit for bit."""
    model = tiny_llama(torch.bfloat16, "fp8")
    fused_logits = _logits(model, helpers, "torch")
    for m in model.modules():  # as if the layers' kernels took no codes: the ops before them emit floats
        if hasattr(m, "quant_method") and m.quant_method.input_quant is not None:
            m.quant_method._kernels_take_codes = False
            assert m.quant_method.input_quant is None
    assert torch.equal(_logits(model, helpers, "torch"), fused_logits)


# ---- GPU, real sizes ---------------------------------------------------------------------------------------

GPU_TOKENS = [1, 17, 256, 4096]


@gpu
@pytest.mark.parametrize("t", GPU_TOKENS)
def test_gpu_llama3_8b_sizes(t, gen):
    """Hidden 4096, intermediate 14336, 32 q / 8 kv heads of 128, bf16 and fp16."""
    for dtype in (torch.bfloat16, torch.float16):
        poison_outputs(t, 14336)
        norm = _norm(4096, dtype, gen)
        x, res = _rand(gen, t, 4096, scale=3, dtype=dtype), _rand(gen, t, 4096, dtype=dtype)
        out, new_res = _run("triton", norm, x, res)
        ref_out, ref_res = _run("torch", norm, x, res)
        assert torch.equal(new_res, ref_res)
        assert_close_ulp(out, ref_out)
        act = SiluAndMul()
        y = _rand(gen, t, 2 * 14336, scale=2, dtype=dtype)
        act_out = _run("triton", act, y)
        assert_close_ulp(act_out, _run("torch", act, y))
        for qtype in QTYPES.values():
            assert_quantized_like(_run("triton", norm, x, res, qtype)[0], out, qtype)
            assert_quantized_like(_run("triton", act, y, qtype), act_out, qtype)
    check_rotary(t, 128, 32, 8, torch.bfloat16, gen)


@gpu
def test_gpu_ops_capture_in_a_cuda_graph(gen):
    """No host sync, no data-dependent allocation: the ops capture in a CUDA graph and replay to the same result."""
    norm, act = _norm(4096, torch.bfloat16, gen), SiluAndMul()
    with torch.device(DEVICE):
        rotary = RotaryEmbedding(128, 8192, RopeConfig())
    x, res = _rand(gen, 64, 4096, dtype=torch.bfloat16), _rand(gen, 64, 4096, dtype=torch.bfloat16)
    y = _rand(gen, 64, 2 * 14336, dtype=torch.bfloat16)
    qkv = _rand(gen, 64, 48 * 128, dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (64,), generator=gen).to(DEVICE)

    def step():
        q, k, _ = qkv.clone().split([32 * 128, 8 * 128, 8 * 128], dim=-1)
        q, k = rotary(positions, q.view(64, 32, 128), k.view(64, 8, 128))
        return norm(x, res, FP8)[0].q, act(y, INT8).q, act(y), q, k

    with use_fused_ops("triton"):
        eager = step()
        graph, captured = capture(step)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):  # codes compared as bytes (no fp8 equality kernel needed)
        assert torch.equal(*(t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b)))


@gpu
@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_gpu_model_triton_path_matches_torch_path(quantization, helpers):
    """On the GPU the W8A8 Linears run the Triton GEMM on the fused ops' codes."""
    model = tiny_llama(torch.bfloat16, quantization, hidden_size=576, intermediate_size=1536,
                       num_attention_heads=9, num_key_value_heads=3)
    ref = _logits(model, helpers, "torch")
    out = _logits(model, helpers, "triton")
    assert helpers.max_rel_err(out, ref) <= 3e-2
