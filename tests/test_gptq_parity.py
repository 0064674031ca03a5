"""Parity of our GPTQ and GPTQ export with GPTQModel, run in the separate env of envs/gptqmodel-parity.sh.

* Layer level: GPTQModel's own ``GPTQ`` routine (``gptqmodel.quantization.gptq.GPTQ``) and ours get the same
  weight and the same calibration inputs (bits 4, group 32, act-order off, sym=False, damp 0.01, block 128).
  GPTQModel 7.x turns on "GAR" (``act_group_aware``, a group-local column reordering) by default when
  ``desc_act=False``; it is switched off here to get the classic GPTQ order.
  - With ``quantizer="gptq_reference", group_params="reference"`` ours reproduces GPTQModel exactly (same
    Hessian, same codes, same scales and integer zeros).
  - With the suite's defaults (float zeros, grid = [min, max] not extended to 0, group parameters from the fully
    updated weights) the codes differ where the float and the integer zero point round differently and the
    error feedback then diverges; the layer-output error must be within a few percent of GPTQModel's.
* Export: transformers (with optimum + gptqmodel, CPU "torch" kernels) loads our GPTQ checkpoint and
  reproduces the logits of the model with rounded zeros and fp16 scales.

Skipped with a message when the env is absent (create it with ``bash envs/gptqmodel-parity.sh``).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from methods.quant.gptq import HessianAccumulator, gptq_quantize_weight
from methods.quant.intk import int_dequantize

REPO = Path(__file__).resolve().parents[1]
GPTQ_PY = Path(os.environ.get("QFTBENCH_GPTQ_PYTHON", REPO / ".venv-gptq" / "bin" / "python"))
VOCAB = 128


def _env():
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def gptq_python():
    """The GPTQModel env; created with envs/gptqmodel-parity.sh when absent (QFTBENCH_GPTQ_PARITY=0 skips)."""
    if not GPTQ_PY.exists() and os.environ.get("QFTBENCH_GPTQ_PARITY", "1") != "0" \
            and "QFTBENCH_GPTQ_PYTHON" not in os.environ:
        try:
            r = subprocess.run(["bash", str(REPO / "envs" / "gptqmodel-parity.sh")], cwd=REPO, capture_output=True,
                               text=True, timeout=1200)
            if r.returncode != 0:
                pytest.skip(f"could not create the GPTQModel env (envs/gptqmodel-parity.sh): {r.stderr[-500:]}")
        except subprocess.TimeoutExpired:
            pytest.skip("creating the GPTQModel env took more than 20 minutes")
    if not GPTQ_PY.exists():
        pytest.skip(f"GPTQModel parity env not found at {GPTQ_PY}: create it with `bash envs/gptqmodel-parity.sh`")
    return str(GPTQ_PY)


# One subprocess for everything (importing gptqmodel takes 5-15 s): argv = work dir; reads layer_in.pt and the
# checkpoint dirs listed in ckpts.json, writes layer_out.pt and load_out.json.
RUNNER = r"""
import sys, json, torch, torch.nn as nn
from pathlib import Path
from gptqmodel.quantization.gptq import GPTQ
from gptqmodel.quantization.config import QuantizeConfig
from transformers import AutoModelForCausalLM
work = Path(sys.argv[1])
inp = torch.load(work / "layer_in.pt")
W, X = inp["W"], inp["X"]
out = {}
for bits in inp["bits"]:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    cfg = QuantizeConfig(bits=bits, group_size=inp["group_size"], desc_act=False, act_group_aware=False,
                         sym=False, damp_percent=inp["damp"], damp_auto_increment=0.0, offload_to_disk=False)
    g = GPTQ(lin, cfg)
    g.quantizer.configure(perchannel=True)
    g.add_batch(X.unsqueeze(0), None)
    H = g.finalize_hessian().clone()
    Q, scale, zero, g_idx = g.quantize(blocksize=inp["block_size"])[:4]
    out[bits] = {"Q": Q, "scale": scale, "zero": zero, "g_idx": g_idx, "H": H}
torch.save(out, work / "layer_out.pt")
res = {}
for d in json.loads((work / "ckpts.json").read_text()):
    m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=torch.float32)
    ref = torch.load(Path(d) / "ref.pt")
    with torch.no_grad():
        lg = m(ref["ids"]).logits.float()
    res[d] = {"rounded": float((lg - ref["rounded"]).abs().max()), "float": float((lg - ref["float"]).abs().max()),
              "module": type(m.model.layers[0].self_attn.q_proj).__name__}
(work / "load_out.json").write_text(json.dumps(res))
"""

LAYER_BITS, GROUP = (4, 3, 2), 32
CKPT_BITS = (2, 3, 4, 8)


def _layer_data(seed=0, d_out=64, d_in=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    x = torch.randn(n, d_in, generator=g) @ mix
    x[:, :4] *= 8.0
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return w, x


def _rel_out_err(x, w, wq):
    return float((x @ w.T - x @ wq.T).norm() / (x @ w.T).norm())


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def _export_checkpoints(work: Path) -> tuple[list[str], dict]:
    """GPTQ (float zeros) on a tiny Llama for each bit width, exported; ref.pt holds the logits of the model with
    float zeros and of the same model with rounded zeros + fp16 scales (what the checkpoint represents)."""
    import copy

    from methods.quant.export import export_gptq_checkpoint, export_zero_points, zero_rounding_loss
    from methods.quant.gptq import gptq_quantize_model
    from methods.quant.linear import QuantLinear
    from methods.quant.scheme import QuantScheme

    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    calib = [torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    dirs, reports = [], {}
    for bits in CKPT_BITS:
        model = _tiny_llama()
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
        gptq_quantize_model(model, targets, QuantScheme("int", bits, group_size=GROUP), calib)
        reports[bits] = zero_rounding_loss(model, ids)
        rounded = copy.deepcopy(model)
        for m in rounded.modules():
            if isinstance(m, QuantLinear):
                m.zeros.copy_(export_zero_points(m.zeros, bits)[0])
                m.scales.copy_(m.scales.half().float())
        d = work / f"int{bits}"
        export_gptq_checkpoint(model, d, bits, GROUP, dtype=torch.float32)
        with torch.no_grad():
            torch.save({"ids": ids, "float": model(ids).logits, "rounded": rounded(ids).logits}, d / "ref.pt")
        dirs.append(str(d))
    return dirs, reports


@pytest.fixture(scope="module")
def parity(gptq_python, tmp_path_factory):
    work = tmp_path_factory.mktemp("gptq_parity")
    w, x = _layer_data()
    torch.save({"W": w, "X": x, "bits": list(LAYER_BITS), "group_size": GROUP, "damp": 0.01, "block_size": 128},
               work / "layer_in.pt")
    dirs, reports = _export_checkpoints(work)
    (work / "ckpts.json").write_text(json.dumps(dirs))
    r = subprocess.run([gptq_python, "-c", RUNNER, str(work)], capture_output=True, text=True, env=_env(),
                       timeout=500)
    assert r.returncode == 0, f"GPTQModel subprocess failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return {"w": w, "x": x, "layer": torch.load(work / "layer_out.pt"),
            "load": json.loads((work / "load_out.json").read_text()), "dirs": dirs, "reports": reports}


def test_layer_parity_with_gptqmodel(parity):
    w, x, theirs = parity["w"], parity["x"], parity["layer"]
    acc = HessianAccumulator(w.shape[1])
    acc.add_batch(x)
    g = GROUP
    tile = (1, g)
    for bits in LAYER_BITS:
        t = theirs[bits]
        torch.testing.assert_close(acc.H, t["H"], rtol=1e-5, atol=1e-5)  # both 2/N_tokens * X^T X
        assert t["g_idx"].tolist() == [i // g for i in range(w.shape[1])]
        s_full, z_full = t["scale"].repeat_interleave(g, 1), t["zero"].repeat_interleave(g, 1)
        their_codes = torch.clamp(torch.round(t["Q"] / s_full) + z_full, 0, 2**bits - 1)
        err_theirs = _rel_out_err(x, w, t["Q"])

        # 1. the original quantizer + the original group-parameter timing: identical results
        c, s, z = gptq_quantize_weight(w, t["H"], bits, tile, damp=0.01, block_size=128,
                                       quantizer="gptq_reference", group_params="reference")
        same = float((c.float() == their_codes).float().mean())
        assert same >= 0.999, f"bits={bits}: only {same:.4f} of the codes equal GPTQModel's"
        torch.testing.assert_close(s, t["scale"], rtol=1e-6, atol=0)
        assert torch.equal(z, t["zero"])
        torch.testing.assert_close(int_dequantize(c, s, z, tile), t["Q"], rtol=0, atol=1e-6)

        # 2. the suite's default INTk GPTQ (float zeros, updated group parameters)
        c, s, z = gptq_quantize_weight(w, acc.H, bits, tile)
        err_ours = _rel_out_err(x, w, int_dequantize(c, s, z, tile))
        same_default = float((c.float() == their_codes).float().mean())
        within1 = float(((c.float() - their_codes).abs() <= 1).float().mean())
        print(f"bits={bits}: reference mode codes equal {same:.4f}; default mode rel. layer-output error ours "
              f"{err_ours:.4f} GPTQModel {err_theirs:.4f} (ratio {err_ours / err_theirs:.3f}), codes equal "
              f"{same_default:.3f}, within +-1 {within1:.3f}")
        # codes are not compared in the default mode: float vs integer zero points shift the rounding of about
        # half the entries and the error feedback then diverges; the layer error is what GPTQ optimises
        if bits == 4:
            assert err_ours <= 1.05 * err_theirs
        else:
            assert err_ours <= 1.15 * err_theirs


def test_transformers_loads_our_gptq_export(parity):
    for bits, d in zip(CKPT_BITS, parity["dirs"]):
        r = parity["load"][d]
        rep = parity["reports"][bits]
        print(f"int{bits}: transformers+optimum+gptqmodel ({r['module']}) vs our rounded-zero model: max |dlogit| "
              f"{r['rounded']:.2e}; vs float zeros {r['float']:.2e} (zero_rounding_loss: "
              f"{rep['max_abs_dlogit_export']:.2e}, ppl {rep['ppl_float_zeros']:.3f} -> {rep['ppl_export']:.3f})")
        assert r["rounded"] < 1e-2
        assert r["rounded"] < 0.2 * r["float"] or r["float"] < 1e-3
        # the export loss that zero_rounding_loss reports is the one the loader sees
        assert abs(r["float"] - rep["max_abs_dlogit_export"]) < 1e-2
