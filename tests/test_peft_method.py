"""The ``peft`` method: any peft method on the suite's bases, checked against the suite's own methods and plain peft.

Table-driven over peft types (as peft's own tests are): every case prepares, trains a step, round-trips its
adapter through plain peft and merges; plus the cross-checks with the suite's qlora/lora and the bad-input
errors (all raised before any model is loaded)."""
from __future__ import annotations

import json

import pytest
import torch

import methods
from methods.errors import ConfigError
from methods.peft_method import measure
from qftbench.train import TrainConfig, finetune
from tests.conftest import make_tiny_llama as _tiny


def make_tiny_llama(**kw):
    """tiny-llama with widths that are multiples of 64: bitsandbytes' own CPU dequantization (which peft uses for
    DoRA's weight norm and for its merges on Linear4bit) is wrong for widths that are not (methods.quant.bnb)."""
    return _tiny(**{"hidden": 128, "intermediate": 192, "heads": 4, "kv_heads": 2, **kw})

peft = pytest.importorskip("peft")

#: (base, peft config): the LoRA family and non-LoRA methods, on each base peft supports them on
CASES = [
    ("nf4", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}),
    ("nf4", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}),
    ("nf4", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}),
    ("16bit", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}),
    ("16bit", {"peft_type": "VERA", "r": 16}),
    ("nf4", {"peft_type": "IA3", "feedforward_modules": ["down_proj"]}),
    ("16bit", {"peft_type": "LOHA", "r": 4, "alpha": 8}),
    ("16bit", {"peft_type": "HIRA", "r": 4}),
]
IDS = [f"{b}-{c['peft_type'].lower()}{'-dora' if c.get('use_dora') else ''}{'-rs' if c.get('use_rslora') else ''}"
       f"{'-' + c['init_lora_weights'] if isinstance(c.get('init_lora_weights'), str) else ''}" for b, c in CASES]


def batch(seed=0, n=4, length=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def examples(n=8, length=12, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (length,), generator=g).tolist(),
             "labels": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def trained(base, spec, tmp_path, steps=2, seed=0):
    m = methods.build("peft", base=base, peft=spec, seed=seed)
    model = m.prepare(make_tiny_llama())
    cfg = TrainConfig(max_steps=steps, batch_size=4, micro_batch_size=4, save_steps=100, lr=1e-2,
                      optimizer="adamw_32bit", precision="fp32", seed=0)
    finetune(model, examples(), cfg, tmp_path / "scratch", tmp_path / "log.jsonl", pad_id=0)
    return m, model


# ------------------------------------------------------------------------------------------- per type
@pytest.mark.parametrize("base,spec", CASES, ids=IDS)
def test_each_peft_type_trains_round_trips_through_plain_peft_and_merges(tmp_path, base, spec):
    m, model = trained(base, spec, tmp_path)
    n = methods.count_trainable(model)
    # trainable parameters: the model's own count is what accounting's per-layer probe measures
    shapes = [(name, mod.out_features, mod.in_features) for name, mod in make_tiny_llama().named_modules()
              if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")]
    assert n == sum(m.layer_trainable_params(name, o, i) for name, o, i in shapes) > 0
    model.eval()
    b = batch()
    with torch.no_grad():
        ref = model(**b).logits
    # saved by the suite -> loaded by plain peft onto the same base
    methods.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == spec["peft_type"]
    plain_base = methods.build("peft", base=base, peft=spec).quantize(make_tiny_llama())  # the suite's base only
    plain_base.qft_base = None
    pm = peft.PeftModel.from_pretrained(plain_base, str(tmp_path / "adapter"))
    pm.eval()
    with torch.no_grad():
        plain = pm(**b).logits
    assert torch.equal(plain, ref)
    # and back: the suite loads its own saved adapter onto a fresh model
    again = methods.load_adapter(make_tiny_llama(), tmp_path / "adapter")
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(**b).logits, ref)
    # merged (peft's merge_and_unload; on NF4 into the de-quantized weights): the same function as 4+16
    merged = m.merge_dense(model, dtype=torch.float32)
    assert not any(isinstance(x, peft.tuners.tuners_utils.BaseTunerLayer) for x in merged.modules())
    with torch.no_grad():
        out = merged(**b).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- cross-checks
def test_qlora_and_peft_lora_on_nf4_give_the_same_training():
    """The suite's qlora and {name: peft, base: nf4, peft: LORA} with the same initial A, B and the same data:
    the same losses at every step (fp32, so no autocast differences) and the same final logits."""
    q = methods.build("qlora", rank=4, alpha=8)
    p = methods.build("peft", base="nf4", peft={"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    mq, mp = q.prepare(make_tiny_llama()), p.prepare(make_tiny_llama())
    # same start: peft's lora_A/B take the suite's (kaiming A, B = 0; only the RNG streams differ)
    qa = {n.removesuffix(".adapter"): mod for n, mod in mq.named_modules() if isinstance(mod, methods.PooledAdapter)}
    for name, mod in qa.items():
        layer = mp.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(mod.A)
        layer.lora_B["default"].weight.data.copy_(mod.B)
    logs = []
    for i, model in enumerate((mq, mp)):
        cfg = TrainConfig(max_steps=4, batch_size=4, micro_batch_size=4, save_steps=100, lr=1e-2,
                          optimizer="adamw_32bit", precision="fp32", seed=0)
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            finetune(model, examples(), cfg, Path(d) / "s", Path(d) / "log.jsonl", pad_id=0)
            logs.append([json.loads(x)["loss"] for x in (Path(d) / "log.jsonl").read_text().splitlines()])
    assert len(logs[0]) == 4
    # the only difference is the order of two float additions (the suite adds s*B(A x) after the base; peft the
    # same, but with its own dropout identity and dtype casts): agreement to float32 round-off
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)
    mq.eval(), mp.eval()
    with torch.no_grad():
        torch.testing.assert_close(mq(**batch()).logits, mp(**batch()).logits, atol=1e-4, rtol=1e-4)


def test_peft_lora_counts_match_the_suite_formula_and_dora_adds_the_magnitudes():
    spec = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    lora = methods.build("lora", rank=8, alpha=16)
    for o, i in [(160, 96), (96, 160), (576, 576), (1536, 576)]:
        n, flops = measure("16bit", spec, o, i)
        assert n == lora.trainable_params(o, i) == 8 * (o + i)
        assert flops == lora.adapter_flops_per_token(o, i) == 2 * 8 * (o + i)
    dora = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True,
                       "target_modules": "all-linear"})
    assert measure("16bit", dora, 160, 96)[0] == 8 * (160 + 96) + 160  # one magnitude per output row
    # per token DoRA adds its output rescaling on top of LoRA's matmuls; the weight norm is per forward, not per token
    assert 2 * 8 * (160 + 96) <= measure("16bit", dora, 160, 96)[1] < 2 * 8 * (160 + 96) + 8 * 160
    vera = methods.build("peft", peft={"peft_type": "VERA", "r": 16})
    assert vera.trainable_params(160, 96) == 16 + 160  # lambda_d (r) and lambda_b (out) per layer
    from qftbench.accounting import account

    acc = account("smollm2-135m", vera)
    assert acc["accounting_source"].startswith("measured") and account("smollm2-135m", "lora")[
        "accounting_source"] == "formula"
    # VeRA trains r + d_out per layer: q, o, down (out 576), k, v (out 192), gate, up (out 1536); 30 layers
    assert acc["trainable_params"] == 30 * (7 * 16 + 3 * 576 + 2 * 192 + 2 * 1536)


def test_a_plain_peft_adapter_is_evaluated_as_its_own_run(tmp_path):
    """A peft adapter trained elsewhere (here: made by plain peft) evaluated by the suite without training."""
    from methods.quant.bnb import to_linear4bit  # noqa: F401 (the nf4 base below is the suite's)

    model = make_tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(3)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "elsewhere"))
    pm.eval()
    with torch.no_grad():
        ref = pm(**batch()).logits
    m = methods.build("peft", base="16bit", adapter=str(tmp_path / "elsewhere"))
    ours = m.prepare(make_tiny_llama())
    assert methods.count_trainable(ours) == 0  # evaluated as it is
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, ref)


# ------------------------------------------------------------------------------------ bad input
def test_bad_peft_entries_fail_before_any_model_work():
    with pytest.raises(ConfigError, match=r"no field 'lora_alhpa'. Did you mean \"lora_alpha\"\?.*Its fields: .*use_dora"):
        methods.build("peft", peft={"peft_type": "LORA", "lora_alhpa": 8})
    with pytest.raises(ConfigError, match=r"peft_type='LORRA'.*Did you mean \"LORA\"\?"):
        methods.build("peft", peft={"peft_type": "LORRA"})
    with pytest.raises(ConfigError, match="prompt-learning"):
        methods.build("peft", peft={"peft_type": "PROMPT_TUNING"})
    with pytest.raises(ConfigError, match="needs peft_type"):
        methods.build("peft", peft={"r": 8})
    with pytest.raises(ConfigError, match="set `targets:` on the method entry"):
        methods.build("peft", peft={"peft_type": "LORA", "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="update_and_allocate"):
        methods.build("peft", peft={"peft_type": "ADALORA"})
    with pytest.raises(ConfigError, match="calibration data"):
        methods.build("peft", peft={"peft_type": "LORA", "init_lora_weights": "eva"})
    with pytest.raises(ConfigError, match="not both"):
        methods.build("peft", peft={"peft_type": "LORA"}, adapter="x")


def test_a_peft_type_that_cannot_wrap_the_nf4_base_says_so_with_what_works():
    # LoHa builds its delta from base_layer.weight, which on a Linear4bit is the packed 4-bit storage
    methods.build("peft", base="16bit", peft={"peft_type": "LOHA", "r": 4})
    with pytest.raises(ConfigError, match=r"cannot train LOHA on the nf4 base .*it can on the 16-bit base.*"
                                          r"Use base: 16bit, or a peft type that wraps Linear4bit \(LORA"):
        methods.build("peft", base="nf4", peft={"peft_type": "LOHA", "r": 4})
    # a config peft rejects on any base: peft's own reason, no base advice
    with pytest.raises(ConfigError, match=r"cannot train this VBLORA config .*vector_length.*Fix the config"):
        methods.build("peft", base="nf4", peft={"peft_type": "VBLORA", "vector_length": 3})


def test_an_adapter_of_another_base_model_is_a_clear_error(tmp_path):
    model = make_tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1)  # another architecture's widths
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    pm.save_pretrained(str(tmp_path / "other"))
    m = methods.build("peft", adapter=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="does not fit this model.*another base model"):
        m.prepare(make_tiny_llama())
    # and before any model is loaded: the sweep checks shapes from the model's config and the adapter's header
    from qftbench import sweep as S

    sweep = {"models": ["smollm2-135m"], "data": {"s": {"source": "synthetic"}},
             "methods": [{"name": "peft", "adapter": str(tmp_path / "other")}]}
    with pytest.raises(ConfigError, match=r"down_proj.lora_A.weight has in_features 128, the model.s model.layers.0.mlp.down_proj has 1536"):
        S.expand(sweep)


def test_dora_on_nf4_refuses_the_cpu_widths_where_bitsandbytes_dequantizes_wrongly():
    from methods.errors import ShapeError

    m = methods.build("peft", base="nf4", peft={"peft_type": "LORA", "r": 4, "use_dora": True})
    with pytest.raises(ShapeError, match="in_features=96, not a multiple of 64"):
        m.prepare(_tiny())  # widths 96 and 160


def test_loftq_without_scale_compensation_is_peft_loftq_formulas_on_a_dequantized_copy():
    """peft's LoftQ (peft.utils.loftq_utils.loftq_init) cannot run here: it moves every weight to "cuda" (or
    "xpu") unconditionally. So its formulas are compared on the same dequantized NF4 copy instead: peft's own
    SVD split (_low_rank_decomposition, plain torch) of the residual W - Q gives lora_A = R, lora_B = L, which
    must be the suite's loftq A, B with scale_compensation=False; and peft's alternation Q_t = quant(W - L·R)
    (without the scaling s) is the suite's when s = 1. (With s != 1 they differ by design: the suite subtracts
    s·B·A, the part the adapter actually adds; peft subtracts L·R. peft also quantizes without double
    quantization inside the loop, the suite with the NF4 + DQ format that stores the base.)"""
    from peft.utils.loftq_utils import _low_rank_decomposition

    from methods.loftq import loftq_decompose
    from methods.quant.scheme import QuantScheme

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)
    _, a, b, _ = loftq_decompose(w, scheme, rank=4, scaling=2.0, iters=1, scale_compensation=False)
    ref = _low_rank_decomposition(w - scheme.fake_quant(w), reduced_rank=4)
    assert torch.equal(a, ref["R"][:4]) and torch.equal(b, ref["L"])
    # two iterations at s = 1: peft's loop, step by step, with the same quantizer
    target, a2, b2, errors = loftq_decompose(w, scheme, rank=4, scaling=1.0, iters=2, scale_compensation=False)
    it = []
    res_target = w
    for _ in range(2):
        q = scheme.fake_quant(res_target)
        out = _low_rank_decomposition(w - q, reduced_rank=4)
        it.append((res_target, out["R"][:4], out["L"], float((w - (q + out["L"] @ out["R"][:4])).norm())))
        res_target = w - out["L"] @ out["R"][:4]
    assert [e for *_, e in it] == pytest.approx(errors[1:], rel=1e-6)
    best = min(it, key=lambda x: x[3])  # the suite keeps the best iterate (see loftq_decompose)
    torch.testing.assert_close(a2, best[1]), torch.testing.assert_close(b2, best[2])
    torch.testing.assert_close(target, best[0])


def test_peft_rows_are_named_by_method_and_base_and_meet_their_baselines():
    from methods.peft_method import label, table_name
    from qftbench import report as R

    dora = {"name": "peft", "base": "nf4", "peft": {"peft_type": "LORA", "use_dora": True}}
    assert label(dora) == "dora" and table_name(dora) == "peft-dora-nf4"
    assert table_name({"name": "peft", "peft": {"peft_type": "VERA"}}) == "peft-vera-16bit"
    assert label({"name": "peft", "peft": {"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"}}) == "pissa"
    assert label({"name": "peft", "adapter": "x"}) == "adapter"
    pairs = {(a, b) for a, b, _ in R._pairs(["lora", "qlora", "peft-dora-nf4", "peft-pissa-16bit"])}
    assert {("peft-dora-nf4", "qlora"), ("peft-dora-nf4", "lora"), ("peft-pissa-16bit", "lora")} <= pairs
    assert ("peft-pissa-16bit", "qlora") not in pairs


def test_loftq_variant_peft_is_peft_loftq_loop_for_any_iterations_and_scaling():
    """loftq variant='peft' against peft's loftq_init loop written out with peft's own SVD split and peft's
    in-loop quantizer (NF4 without double quantization: the suite's own NF4 codebook, equal to bitsandbytes'
    table), at s = 2 and three iterations, where the suite's own variant differs."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    from methods.loftq import loftq_decompose
    from methods.quant.scheme import QuantScheme

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    stored = QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)
    nf4 = QuantScheme(kind="nf", bits=4, blocksize=64)
    res = w.clone()
    for i in range(3):  # peft.utils.loftq_utils.loftq_init, num_bits=4, num_iter=3
        q = nf4.fake_quant(res)
        out = _low_rank_decomposition(w - q, reduced_rank=4)
        L, R = out["L"], out["R"]
        if i + 1 < 3:
            res = w - L @ R
    target, a, b, _ = loftq_decompose(w, stored, rank=4, scaling=2.0, iters=3, scale_compensation=False,
                                      variant="peft")
    torch.testing.assert_close(a, R), torch.testing.assert_close(b, L)
    torch.testing.assert_close(nf4.fake_quant(target), q)  # the base peft returns (dequantized Q_T)
    _, a_suite, _, _ = loftq_decompose(w, stored, rank=4, scaling=2.0, iters=3, scale_compensation=False)
    assert not torch.allclose(a_suite, a)  # the suite's loop is another algorithm at s != 1
    with pytest.raises(ConfigError, match="variant='peft' is peft's LoftQ on NF4 without scale compensation"):
        methods.build("loftq", variant="peft")
    m = methods.build("loftq", variant="peft", scale_compensation=False, rank=4, iters=2)
    assert m.base_key()["variant"] == "peft" and "variant" not in methods.build("loftq").base_key()
    # the stored base is peft's too: NF4 block 64 without double quantization (bitsandbytes' codes and absmax)
    from bitsandbytes.functional import quantize_4bit

    from methods.quant.bnb import _dequantize_nf4

    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    m3 = methods.build("loftq", variant="peft", scale_compensation=False, rank=4, alpha=8, iters=3)
    base = m3.quantize_base(None, [("l", lin)], None)["l"]
    target3, a3, b3, _ = loftq_decompose(w, m3.scheme(), rank=4, scaling=2.0, iters=3, scale_compensation=False,
                                         variant="peft")
    packed, qs = quantize_4bit(target3.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert not qs.nested
    torch.testing.assert_close(base.dequantize(), _dequantize_nf4(packed, qs), rtol=0, atol=1e-6)
    torch.testing.assert_close(m3._init["l"][0], a3)
    assert methods.build("loftq").scheme().kind == "bnb-nf4" and m3.scheme().kind == "nf"
