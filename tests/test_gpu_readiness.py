"""CUDA-only settings whose choice logic runs anywhere: MFU's peak by compute precision,
TF32, cuBLAS determinism, the grouped GEMM's conditions, NVML. The CUDA side itself is
exercised by tools/gpu_check.sh on a GPU machine."""

import os

import pytest
import torch

from engine.ops.moe import grouped_gemm_warnings
from engine.training import metrics
from engine.training.metrics import compute_precision, device_peak_flops


@pytest.mark.parametrize("name,dtype,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5e12),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9e12),
    ("NVIDIA H100 PCIe", "bf16", True, 756e12),
    ("NVIDIA H200", "fp32", True, 494.5e12),
    ("Tesla T4", "bf16", True, None),  # unknown devices report mfu=null, never a guess
])
def test_mfu_peak_follows_the_compute_precision(monkeypatch, name, dtype, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0), compute_precision(dtype, tf32)) == peak
    assert device_peak_flops(torch.device("cpu"), "bf16") is None


def test_grouped_gemm_conditions_are_told():
    assert grouped_gemm_warnings(2048, 768, "bf16") == []
    fp32 = grouped_gemm_warnings(2048, 768, "fp32")
    assert len(fp32) == 1 and "train.dtype is fp32" in fp32[0]
    odd = grouped_gemm_warnings(100, 48, "bf16")
    assert len(odd) == 1 and "model.hidden_size=100" in odd[0] and "moe_intermediate_size" not in odd[0]


def test_deterministic_mode_fixes_the_cublas_workspace(monkeypatch):
    from engine.training.trainer import seed_everything
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_tf32_switch(monkeypatch):
    from engine.training.trainer import set_matmul_precision
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_matmul_precision(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_matmul_precision(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_gpu_utilization_initialises_nvml_once(monkeypatch):
    import sys
    import types
    calls = {"init": 0}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: 3)  # CUDA_VISIBLE_DEVICES=3
    monkeypatch.setattr(metrics, "_NVML_HANDLES", {})
    assert [metrics.gpu_utilization(torch.device("cuda", 0)) for _ in range(3)] == [42.0] * 3
    assert calls["init"] == 1 and metrics._NVML_HANDLES == {0: ("handle", 3)}
    assert metrics.gpu_utilization(torch.device("cpu")) is None


def test_torch_api_check_passes_here_and_names_what_is_missing(tmp_path):
    """tools/check_torch_apis.py: every required API exists in this torch; a missing attribute
    or keyword is reported as missing (run first on a GPU machine's older torch)."""
    import importlib.util
    import json
    from launch import ROOT
    spec = importlib.util.spec_from_file_location("check_torch_apis", ROOT / "tools" / "check_torch_apis.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--json", str(tmp_path / "apis.json")]) == 0
    rows = json.loads((tmp_path / "apis.json").read_text())["apis"]
    assert len(rows) == len(tool.APIS) and all(r["present"] for r in rows if r["required"])
    assert tool.check("torch:no_such_api")[0] is False
    assert tool.check("torch.distributed.fsdp:fully_shard(no_such_keyword)") == (False, "no keyword 'no_such_keyword'")
