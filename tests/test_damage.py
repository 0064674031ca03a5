"""Quantization damage: the relative weight error recorded with every quantized base, and the damage table
(the un-tuned model under each quantizer beside its 16-bit self, with paired differences)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import methods
from methods.base import weight_error
from methods.quant import bnb_nf4_fake_quant, int_fake_quant
from qftbench import pipeline as P
from qftbench import report as R


def _linear(d_out=64, d_in=128, seed=0):
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    lin.weight.data = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))
    return lin


@pytest.mark.parametrize("hp,reference", [
    ({"bits": 4, "group_size": 32}, lambda w: int_fake_quant(w, 4, (1, 32))),
    ({"bits": 2, "group_size": 32}, lambda w: int_fake_quant(w, 2, (1, 32))),
    ({"bits": 4, "quant_type": "nf", "group_size": 64}, lambda w: bnb_nf4_fake_quant(w)),
    ({"bits": 16}, lambda w: w),
])
def test_weight_error_is_the_relative_frobenius_error_of_the_base(hp, reference):
    """Recorded at quantization (model.qft_base['weight_error']) and equal to an independent computation."""
    model = torch.nn.Sequential()
    model.add_module("q_proj", _linear())
    w = model.q_proj.weight.detach().clone()
    m = methods.build("base", targets=["q_proj"], **hp)
    m.quantize(model)
    want = float((w - reference(w)).norm() / w.norm())
    assert model.qft_base["weight_error"]["q_proj"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert weight_error(_linear(), _linear()) == 0.0


def test_int4_g32_reproduces_a_q4_1_grid_exactly_and_g64_does_not():
    """What the damage table shows on SmolLM2 (de-quantized Q4_1: asymmetric 4-bit, blocks of 32 along the
    input), on a weight made the same way: INT4 g32 is lossless, INT4 g64 (two blocks per group) is not."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    q41 = int_fake_quant(w, 4, (1, 32))  # the shipped weights are already on such a grid
    assert float((q41 - int_fake_quant(q41, 4, (1, 32))).norm() / q41.norm()) < 1e-6
    assert float((q41 - int_fake_quant(q41, 4, (1, 64))).norm() / q41.norm()) > 1e-2


@pytest.mark.slow
def test_damage_table_from_tiny_runs(tmp_path):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_pipeline import tiny_cfg

    for hp in ({"bits": 16}, {"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 32}):
        cfg = tiny_cfg(tmp_path, {"name": "base", **hp})
        rd = P.run_all(cfg)
        acc = json.loads((rd / "accounting.json").read_text())
        err = json.loads((P.base_dir(cfg) / "base_manifest.json").read_text()).get("weight_error")
        if hp["bits"] == 16:
            assert acc["base_quant"] == "16-bit" and acc["base_weight_error"]["max"] == 0.0
        else:
            assert acc["base_quant"] == f"int{hp['bits']}-g32 rtn" and len(err) == acc["base_weight_error"]["n_layers"]
            assert acc["base_weight_error"]["mean"] == pytest.approx(sum(err.values()) / len(err))
            assert 0 < acc["base_weight_error"]["mean"] <= acc["base_weight_error"]["max"] < 1
    df = R.collect(tmp_path / "results")
    t = R.damage_table(df)
    assert list(t["quant"]) == ["16-bit", "int4-g32 rtn", "int2-g32 rtn"]
    e2, e4 = (float(t[t["quant"] == q]["weight err. mean (%)"].iloc[0]) for q in ("int2-g32 rtn", "int4-g32 rtn"))
    assert e2 > e4 > 0 and t.iloc[0]["Δ vs 16-bit"] == ""
    for q in ("int4-g32 rtn", "int2-g32 rtn"):
        row = t[t["quant"] == q].iloc[0]
        assert row["Δ vs 16-bit"].endswith("(synthetic)") and row["verdict"] in ("lossy", "better", "identical", "inconclusive")
        assert row["n items"] == 6 and row["synthetic"].count("[") == 1
    assert "damage" in R.tables(df) and "damage" not in R.tables(df[df["quant"] != "int2-g32 rtn"].pipe(
        lambda d: d[d["quant"] == "16-bit"]))


@pytest.mark.slow
@pytest.mark.shared_data
def test_perplexity_task_and_its_damage_columns(tmp_path):
    """qft_alpaca_ppl (lm-eval's rolling log-likelihood over held-out Alpaca records): the per-document records
    reproduce lm-eval's word perplexity exactly, and the damage table shows it with an interval and the paired
    ratio to 16 bits."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_pipeline import tiny_cfg

    for hp in ({"bits": 16}, {"bits": 2, "group_size": 32}):
        cfg = tiny_cfg(tmp_path, {"name": "base", **hp}, eval={"tasks": ["qft_alpaca_ppl"], "limit": 6})
        rd = P.run_all(cfg)
        res = json.loads(next((rd / "eval" / "base").glob("*.json")).read_text())
        items = res["items"]["qft_alpaca_ppl"]
        assert len(items["loglikelihood"]) == 6 and all(w > 0 for w in items["words"])
        ppl = math.exp(-math.fsum(items["loglikelihood"]) / sum(items["words"]))
        assert res["tasks"]["qft_alpaca_ppl"]["word_perplexity"] == pytest.approx(ppl, rel=1e-9)
    t = R.damage_table(R.collect(tmp_path / "results"))
    assert list(t["quant"]) == ["16-bit", "int2-g32 rtn"]
    cell = t.iloc[1]["Alpaca ppl [95% CI]"]
    v, lo, hi = (float(x) for x in cell.replace("[", "").replace("]", "").replace(",", "").split())
    assert R.ppl_interval({("r", i): (-2.0, 1) for i in range(5)})[0] == pytest.approx(math.exp(2.0))
    assert lo <= v <= hi
    assert t.iloc[1]["Alpaca ppl ratio vs 16-bit"].endswith("(n=6)") and t.iloc[0]["Alpaca ppl ratio vs 16-bit"] == ""


def test_loftq_records_the_error_its_initialisation_starts_from():
    """LoftQ's claim in numbers: ``init_error`` = ||W - (Q + s·B·A)|| / ||W|| recorded at quantization equals an
    independent computation from the injected model, and lies below plain NF2 quantization's error -- the
    starting error of QLoRA's initialisation (B = 0) on the same NF2 base, where no init_error is recorded."""
    from methods.adapter import AdapterLinear
    from methods.quant import dequantize_module, nf_fake_quant

    def model():
        m = torch.nn.Sequential()
        m.add_module("q_proj", _linear(seed=5))
        return m

    plain, lq = model(), model()
    w = plain.q_proj.weight.detach().clone()
    q = methods.build("qlora", bits=2, rank=8, targets=["q_proj"])
    q.quantize(plain)
    want_plain = float((w - nf_fake_quant(w, 2, 64)).norm() / w.norm())
    assert plain.qft_base["weight_error"]["q_proj"] == pytest.approx(want_plain, rel=1e-5)
    assert "init_error" not in plain.qft_base  # B = 0: it starts from its base
    m = methods.build("loftq", bits=2, group_size=64, rank=8, iters=3, targets=["q_proj"])
    m.quantize(lq)
    recorded = lq.qft_base["init_error"]["q_proj"]
    m.inject(lq)
    layer = lq.q_proj
    assert isinstance(layer, AdapterLinear)
    start = dequantize_module(layer.base) + layer.adapter.delta_weight().float()
    assert recorded == pytest.approx(float((w - start).norm() / w.norm()), rel=1e-4)
    assert recorded < want_plain
    assert lq.qft_base["weight_error"]["q_proj"] != pytest.approx(recorded)  # Q of the residual alone is not it


def test_perplexity_ratio_pairs_documents_and_averages_a_sides_seeds():
    """ppl(A) / ppl(B) on the documents both scored: with two seeds on A, each document enters with A's mean
    log-likelihood (before, the second seed's records overwrote the first's); equal sides give exactly 1."""
    b = {("rb", "d1"): (-10.0, 5), ("rb", "d2"): (-20.0, 10), ("rb", "d3"): (-6.0, 3)}
    a = {("ra0", "d1"): (-12.0, 5), ("ra0", "d2"): (-22.0, 10),
         ("ra1", "d1"): (-14.0, 5), ("ra1", "d2"): (-26.0, 10)}
    ratio, lo, hi, n = R.ppl_ratio(a, b, key=("t",))
    want = math.exp(-((-13.0 - 24.0) - (-10.0 - 20.0)) / 15)  # d3 is not scored by A
    assert n == 2 and ratio == pytest.approx(want) and lo <= ratio <= hi
    assert R.ppl_ratio(b, dict(b), key=("t",))[:3] == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    assert R.ppl_ratio(a, {("rb", "d9"): (-1.0, 1)}) is None
