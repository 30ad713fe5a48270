"""Which attention kernel runs where, and the varlen kernels' plumbing.

The flash kernels themselves run on CUDA only (tests marked gpu). On CPU the plumbing around
them (flattening packed rows, cu_seqlens, GQA, dtype casts, the keyword differences between
torch releases) is checked against SDPA by standing in a per-document reference for
`torch.nn.attention.varlen.varlen_attn`."""

import functools

import pytest
import torch
import torch.nn.functional as F

import engine.ops.attention as attention
from engine.config import ConfigError
from engine.ops.attention import AttentionMeta, eager_attention, get_attention_fn, resolve_backend, sdpa_attention


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **_):
    """A per-document SDPA with torch 2.13's varlen_attn signature ([T, H, D] tensors)."""
    assert q.dtype == k.dtype == v.dtype
    assert enable_gqa or k.shape[1] == q.shape[1]
    bounds = cu_q.tolist()
    assert cu_k.tolist() == bounds and max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    causal = window_size == (-1, 0)
    return torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                     v[a:b].transpose(0, 1), is_causal=causal,
                                                     enable_gqa=enable_gqa).transpose(0, 1)
                      for a, b in zip(bounds[:-1], bounds[1:])])


def old_reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
    """The older keyword set (is_causal, no enable_gqa)."""
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    return q, k, v, torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 9])


@pytest.mark.parametrize("fake", [reference_varlen, old_reference_varlen])
def test_varlen_backbone_kernel_matches_sdpa(monkeypatch, qkv, fake):
    import torch.nn.attention.varlen as varlen
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    q, k, v, doc = qkv
    fn = attention.make_varlen_attention(torch.float32)
    torch.testing.assert_close(fn(q, k, v, AttentionMeta(doc_ids=doc)), sdpa_attention(q, k, v, AttentionMeta(doc)),
                               atol=1e-5, rtol=1e-5)
    # rows without document ids are one document each
    torch.testing.assert_close(fn(q, k, v, AttentionMeta(doc_ids=None)), sdpa_attention(q, k, v, AttentionMeta(None)),
                               atol=1e-5, rtol=1e-5)


def test_varlen_casts_autocast_inputs_to_the_run_dtype(monkeypatch, qkv):
    """Under autocast q and k leave RoPE in fp32 while v is bf16: the kernel gets one dtype."""
    import torch.nn.attention.varlen as varlen
    seen = []

    @functools.wraps(reference_varlen)  # keeps its signature, which the caller inspects
    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return reference_varlen(q, *args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", spy)
    q, k, v, doc = qkv
    out = attention.make_varlen_attention(torch.bfloat16)(q, k, v.bfloat16(), AttentionMeta(doc))
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager_attention(q, k, v, AttentionMeta(doc)), atol=3e-2, rtol=3e-2)


def test_vision_varlen_kernel_matches_block_diagonal_sdpa(monkeypatch):
    import torch.nn.attention.varlen as varlen

    from engine.modalities.vision import VisionSegments, block_diagonal_sdpa
    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 18, 8) for _ in range(3))  # 6 + 2 x 4 + 4 patches
    segments = VisionSegments.from_grid([[1, 2, 3], [2, 2, 2], [1, 2, 2]], torch.device("cpu"))
    out = attention.make_vision_varlen_attention(torch.float32)(q, k, v, segments)
    torch.testing.assert_close(out, block_diagonal_sdpa(q, k, v, segments), atol=1e-5, rtol=1e-5)


def test_auto_backend_by_device_and_dtype(monkeypatch):
    assert resolve_backend("auto", "cpu", "bf16") == "auto_cpu"
    assert resolve_backend("sdpa_doc", "cuda", "bf16") == "sdpa_doc"
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    assert resolve_backend("auto", "cuda", "bf16") == "varlen"
    assert resolve_backend("auto", "cuda", "fp32") == "sdpa"  # flash kernels are half precision only
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert resolve_backend("auto", "cuda", "bf16") == "flash_attn"


@pytest.mark.parametrize("backend", ["varlen", "flash_attn"])
def test_gpu_only_kernels_are_config_errors_on_cpu(backend):
    with pytest.raises(ConfigError, match=f"model.attention_backend' is {backend}.*use --model.attention_backend"):
        get_attention_fn(backend, "cpu", "bf16")


def test_flash_kernels_refuse_fp32_runs(monkeypatch):
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    with pytest.raises(ConfigError, match="bf16 only, but train.dtype is fp32"):
        get_attention_fn("varlen", "cuda", "fp32")


def test_sdpa_shares_kv_heads_without_repeating_them(qkv):
    q, k, v, doc = qkv
    torch.testing.assert_close(sdpa_attention(q, k, v, AttentionMeta(doc)), eager_attention(q, k, v, AttentionMeta(doc)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flash_attn"])
def test_flash_kernels_match_sdpa_on_gpu(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "flash_attn" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed (the [flash] extra)")
    if backend == "varlen" and not attention.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    doc = torch.tensor([[0] * 20 + [1] * 44, [0] * 64], device="cuda")
    fn = get_attention_fn(backend, "cuda", "bf16")
    torch.testing.assert_close(fn(q, k, v, AttentionMeta(doc)), sdpa_attention(q, k, v, AttentionMeta(doc)),
                               atol=2e-2, rtol=2e-2)
    # autocast's mix (fp32 q, k after RoPE; bf16 v) is accepted and answered in v's dtype
    out = fn(q.float(), k.float(), v, AttentionMeta(doc))
    assert out.dtype == torch.bfloat16
