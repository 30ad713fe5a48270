"""Feature combinations: every pair of {activation checkpointing, compile, bf16, micro-batch
accumulation, async Ulysses SP, overlapped EP, replicate recipe, HSDP} that a model accepts
trains two steps with finite losses, on the dense, MoE and omni-MoE models (4 gloo ranks).

Not every pair as its own run (28 pairs x 3 models): a covering array of strength 2, i.e.
a few rows in which, for every pair of features, each of on/on, on/off, off/on and off/off
occurs in some row, so an interaction that breaks a pair, or that breaks a feature unless
another one is on, shows up. Row 0 turns everything on (the flagship's mix); compile, the
expensive feature on CPU, is on in only two rows (row 0 and a row of its own), on one model. Exact
numbers are the parity tests' job (test_moe_features, test_sequence_parallel, ...).
"""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from launch import ROOT

FEATURES = {
    "ac": [("parallel.activation_checkpointing", "true")],
    "compile": [("train.compile", "true")],
    "bf16": [("train.dtype", "bf16")],
    "accum": [("data.micro_batch_size", "1")],
    "sp_async": [("parallel.sp_size", "2"), ("parallel.sp_async", "true")],
    "ep_overlap": [("parallel.ep_size", "2"), ("parallel.ep_overlap", "true")],
    "replicate": [],  # a config file variant (a part's recipe is not a CLI key)
    "hsdp": [("parallel.dp_replicate", "2")],
}
# Compile's pairs are checked once, on the omni-MoE model (a superset of the others' code
# paths): compiling costs more than the rest of a row on CPU. Its pairs with checkpointing,
# bf16, async SP and overlapped EP on the MoE model are parity tests (test_moe_features.py),
# with checkpointing on the dense model too (test_compile.py).
MODELS = {
    "dense": ("tiny_dense.yaml", ["ac", "bf16", "accum", "sp_async", "hsdp"]),
    "moe": ("tiny_moe.yaml", ["ac", "bf16", "accum", "sp_async", "ep_overlap", "hsdp"]),
    "omni_moe": ("tiny_omni.yaml", list(FEATURES)),
}
OMNI_MOE_KEYS = [("model.backbone", "moe"), ("model.num_experts", "8"), ("model.num_experts_per_tok", "2"),
                 ("model.moe_intermediate_size", "48")]


def covering_rows(features: list[str], cheap_last: str = "compile") -> list[set[str]]:
    """Rows (sets of features on) covering every pair of features in all four on/off states.

    `cheap_last` is on in rows 0 and 1 only (row 1 has nothing on without it). Every other feature is on in row 0 and in two
    more rows among 2..R-1, each feature a different pair: two such 3-sets share row 0 (on/on),
    differ somewhere (on/off, off/on) and both miss row 1 (off/off); against `cheap_last`,
    row 0 is on/on, row 1 on/off, their other rows off/on and (off/off) any row both miss.
    """
    others = [f for f in features if f != cheap_last]
    n_rows = 2 + next(k for k in range(2, 10) if math.comb(k, 2) >= len(others))
    rows = [set(features), {cheap_last} & set(features)] + [set() for _ in range(n_rows - 2)]
    for feature, (a, b) in zip(others, itertools.combinations(range(2, n_rows), 2)):
        rows[a].add(feature)
        rows[b].add(feature)
    return rows


def test_rows_cover_every_pair_in_all_states():
    for _, features in MODELS.values():
        rows = covering_rows(features)
        for x, y in itertools.combinations(features, 2):
            states = {(x in r, y in r) for r in rows}
            assert states == {(True, True), (True, False), (False, True), (False, False)}, (x, y)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", list(MODELS))
def test_every_pair_of_features_trains(tmp_path, model):
    config_name, features = MODELS[model]
    config = ROOT / "examples" / "configs" / config_name
    replicated = tmp_path / "replicate.yaml"
    replicated.write_text(config.read_text().replace("{name: vision,", "{name: vision, recipe: replicate,"))
    cases = []
    for i, row in enumerate(covering_rows(features)):
        overrides = [("train.steps", "2"), ("checkpoint.enabled", "false"), ("train.progress_bar", "false"),
                     ("train.tensorboard", "false"), ("train.output_dir", str(tmp_path / f"row{i}")),
                     ("data.global_batch_size", "8"), ("data.seq_len", "64")]
        overrides += OMNI_MOE_KEYS if model == "omni_moe" else []
        overrides += [kv for f in sorted(row) for kv in FEATURES[f]]
        cases.append({"name": "+".join(sorted(row)), "overrides": overrides,
                      "config": str(replicated if "replicate" in row else config)})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(ROOT / "tests" / "combo_worker.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert list(results) == [c["name"] for c in cases]
    for name, result in results.items():
        values = result["loss"] + [v for series in result["extra"].values() for v in series]
        assert len(result["loss"]) == 2 and all(math.isfinite(v) for v in values), (name, result)
