"""train.fp8_backend=te: the module swap and the FP8 autocast wiring, on CPU, against a stand-in
package with Transformer Engine's interface (Linear, RMSNorm, autocast, recipes) that computes
the plain math. TE itself cannot be installed here (it builds against CUDA): its numerics are
not tested, only that the right modules are swapped, the layout (names, shapes, seeded
initialisation) stays plain, and every forward runs inside TE's autocast with the configured
recipe."""

import contextlib
import sys
import types

import pytest
import torch
import torch.nn as nn

from engine.config import ConfigError, load_config
from engine.models import build_model
from engine.models.layers import RMSNorm
from engine.parallel import ParallelDims, materialize, parallelize
from launch import ROOT

TINY = str(ROOT / "examples" / "configs" / "tiny_dense.yaml")


class FakeLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=params_dtype)


class FakeRMSNorm(RMSNorm):
    def __init__(self, hidden_size, eps=1e-5, params_dtype=None, device=None):
        super().__init__(hidden_size, eps)
        self.to(device=device, dtype=params_dtype)


@pytest.fixture
def fake_te(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        entered.append(recipe)
        yield

    recipe = types.SimpleNamespace(
        Format=types.SimpleNamespace(HYBRID="hybrid"),
        DelayedScaling=lambda **kw: ("delayed", kw), Float8CurrentScaling=lambda **kw: ("current", kw))
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.SimpleNamespace(Linear=FakeLinear, RMSNorm=FakeRMSNorm, autocast=autocast)
    te.common = types.SimpleNamespace(recipe=recipe)
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", te.common)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe)
    return entered


def _model(cfg):
    with torch.device("meta"):
        model = build_model(cfg.model)
    model = parallelize(model, cfg, ParallelDims.from_layout({"dp_replicate": 1, "dp_shard": 1, "sp": 1, "ep": 1,
                                                              "micro_batch": 1}, 1), None, "cpu")
    materialize(model, torch.device("cpu"), cfg.train.seed)
    return model


def _batch(cfg):
    from engine.batch import Batch
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return Batch(input_ids=ids, labels=ids.roll(-1, 1), position_ids=torch.arange(32).expand(2, 32),
                 doc_ids=torch.zeros(2, 32, dtype=torch.long), token_mask=torch.ones(2, 32, dtype=torch.bool))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_swap_keeps_the_plain_layout_and_runs_under_te_autocast(fake_te, recipe):
    plain_cfg = load_config(TINY, [])
    te_cfg = _te_config(recipe)  # set after loading: validation refuses te on a machine without CUDA
    plain, swapped = _model(plain_cfg), _model(te_cfg)
    linears = [n for n, m in swapped.named_modules() if isinstance(m, FakeLinear)]
    norms = [n for n, m in swapped.named_modules() if isinstance(m, FakeRMSNorm)]
    assert len(linears) == 7 * plain_cfg.model.num_layers  # q, k, v, o, gate, up, down of every block
    assert len(norms) == 2 * plain_cfg.model.num_layers  # the blocks' two norms; the final norm stays
    assert not any(isinstance(m, FakeLinear) for m in [swapped.lm_head])
    # same names, shapes and seeded values: checkpoints and exports do not see the swap
    a, b = plain.state_dict(), swapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = _batch(plain_cfg)
    with torch.no_grad():
        want, got = plain.loss_sums(batch), swapped.loss_sums(batch)
    assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
    assert fake_te == [("current" if recipe == "tensorwise" else "delayed",
                        {"fp8_format": "hybrid"} if recipe == "tensorwise" else
                        {"fp8_format": "hybrid", "amax_history_len": 16, "amax_compute_algo": "max"})]


def _te_config(recipe):
    cfg = load_config(TINY, [])
    cfg.train.dtype, cfg.train.fp8_backend, cfg.train.fp8_recipe = "fp8", "te", recipe
    return cfg


def test_te_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    from engine.parallel.transformer_engine import apply_transformer_engine
    with pytest.raises(ConfigError, match="train.fp8_backend' is te, but Transformer Engine does not import"):
        apply_transformer_engine(nn.Module())


def test_rowwise_is_torchao_only(fake_te):
    from engine.parallel.transformer_engine import te_recipe
    with pytest.raises(ConfigError, match="train.fp8_recipe' is rowwise.*use one of tensorwise, delayed"):
        te_recipe(_te_config("rowwise"))
