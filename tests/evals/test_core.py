"""Core eval: hand-computed metrics, identity/zero SAEs through the spliced model, the baseline cache, bad input."""

import json
import math

import pytest
import torch

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError
from fcsae.evals import core, store
from fcsae.evals.core import ReconAccumulator, downstream_scores, kl_exact, kl_topk
from tests._evals_utils import DenseSAE, identity_sae, write_text_corpus, zero_sae


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ pure metrics


X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
RECON = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
LAT = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, -0.5, 2.0, 0.0]])
# By hand: residuals (0,0) and (-1,-1) -> sum 2; mean x = (0.5, 1); sum ||x - mean||^2 = 1.25 + 1.25 = 2.5.
HAND = {
    "explained_variance": 1 - 2 / 2.5,
    "mse": 2 / 4,
    "cossim": (1 + 6 / (2 * math.sqrt(10))) / 2,
    "l2_ratio": (1 + math.sqrt(10) / 2) / 2,
    "relative_reconstruction_bias": ((1 + 10) / 2) / ((1 + 6) / 2),
    "l0": (1 + 2) / 2,
    "l1": (1 + 2.5) / 2,
    "frac_dead": 1 / 4,
    "frac_dense": 3 / 4,
    "n_tokens": 2,
}


def test_reconstruction_metrics_match_hand_computed_values():
    acc = ReconAccumulator(2, 4)
    acc.update(X, RECON, LAT)
    got = acc.result()
    for k, v in HAND.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_reconstruction_metrics_do_not_depend_on_batching():
    acc = ReconAccumulator(2, 4)
    acc.update(X[:1], RECON[:1], LAT[:1])
    acc.update(X[1:], RECON[1:], LAT[1:])
    for k, v in HAND.items():
        assert acc.result()[k] == pytest.approx(v, abs=1e-9), k


def test_downstream_scores_hand_computed():
    s = downstream_scores(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0, kl_sae=0.5, kl_zero=2.0)
    assert s["ce_loss_score"] == pytest.approx(0.75)
    assert s["kl_div_score"] == pytest.approx(0.75)
    assert math.isnan(downstream_scores(1.0, 1.0, 1.0, 0.0, 0.0)["ce_loss_score"])


def test_topk_kl_is_exact_with_full_vocab_and_a_lower_bound_otherwise():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.2, 0.3, 0.5]])
    logp, logq = p.log(), q.log()
    exact = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.5)
    assert float(kl_exact(logp, logq)) == pytest.approx(exact, rel=1e-6)
    full = kl_topk(torch.tensor([[0, 1, 2]]), logp, logq)
    assert float(full) == pytest.approx(exact, abs=2e-5)  # float32 log-probs: the rest bucket is ~1e-7, not 0
    # k=1: token 0 plus a rest bucket (p 0.5, q 0.8), computed by hand
    coarse = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    one = kl_topk(torch.tensor([[0]]), logp[:, :1], logq)
    assert float(one) == pytest.approx(coarse, rel=1e-5)
    assert float(one) <= exact


# ------------------------------------------------------------------ through a tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fcsae.lm import make_tiny_model

    home = tmp_path_factory.mktemp("fcsae_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("FCSAE_HOME", str(home))
    text = write_text_corpus(home / "corpus.txt")
    lm = make_tiny_model("llama", d_model=32, n_layers=2)
    cfg = EvalConfig(corpus=text, core_tokens=300, context_len=32, kl_topk=8, batch_size=4)
    yield lm, LMConfig(model="tiny", layer=0), cfg
    mp.undo()


def test_identity_sae_scores_one(setup):
    lm, lmc, cfg = setup
    m = core.evaluate_core(identity_sae(32), lmc, cfg, norm_scale=3.7, lm=lm, progress=False)
    assert m["n_tokens"] >= cfg.core_tokens
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_sae"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_zero_ablation"] != m["ce_loss_clean"]


def test_zero_sae_scores_zero(setup):
    lm, lmc, cfg = setup
    m = core.evaluate_core(zero_sae(32), lmc, cfg, norm_scale=1.0, lm=lm, progress=False)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["l0"] == 0 and m["frac_dead"] == 1.0


def test_half_sae_undoes_normalisation(setup):
    """An SAE returning half its input: with the scale undone the spliced model sees x/2, not x*s/2."""
    lm, lmc, cfg = setup
    half = DenseSAE(torch.eye(32), 0.5 * torch.eye(32))
    a = core.evaluate_core(half, lmc, cfg, norm_scale=1.0, lm=lm, progress=False)
    b = core.evaluate_core(half, lmc, cfg, norm_scale=5.0, lm=lm, progress=False)
    assert a["ce_loss_sae"] == pytest.approx(b["ce_loss_sae"], abs=1e-5)
    assert a["l2_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert 0 < a["ce_loss_score"] < 1


def test_exact_kl_mode_agrees_for_identity(setup):
    lm, lmc, cfg = setup
    exact_cfg = EvalConfig(**{**cfg.__dict__, "kl_topk": 0})
    m = core.evaluate_core(identity_sae(32), lmc, exact_cfg, norm_scale=1.0, lm=lm, progress=False)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_zero_ablation"] == pytest.approx(m["kl_div_zero_ablation_exact"])


def test_baseline_is_cached_and_a_corrupt_entry_is_recomputed(setup, monkeypatch):
    lm, lmc, cfg = setup
    first = core.prepare_core_cache(lmc, cfg, lm=lm, progress=False)
    material = core._material(lm, lmc, cfg)
    calls = []
    real = core._compute_baseline
    monkeypatch.setattr(core, "_compute_baseline", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = core.prepare_core_cache(lmc, cfg, lm=lm, progress=False)
    assert calls == [] and torch.equal(again.ce_clean_NS, first.ce_clean_NS)
    # flip bytes inside the tensor file: the checksum catches it and the entry is rebuilt
    f = store.entry_dir(core.KIND, material) / store.TENSORS
    blob = bytearray(f.read_bytes())
    blob[-8:] = b"\x00" * 8 if blob[-8:] != b"\x00" * 8 else b"\x01" * 8
    f.write_bytes(bytes(blob))
    rebuilt = core.prepare_core_cache(lmc, cfg, lm=lm, progress=False)
    assert calls == [1] and torch.equal(rebuilt.ce_clean_NS, first.ce_clean_NS)
    # a missing meta.json (an interrupted write) is a miss too
    (store.entry_dir(core.KIND, material) / store.META).unlink()
    core.prepare_core_cache(lmc, cfg, lm=lm, progress=False)
    assert calls == [1, 1]
    meta = json.loads((store.entry_dir(core.KIND, material) / store.META).read_text())
    assert meta["material"]["layer"] == 0


def test_sae_width_mismatch_is_refused(setup):
    lm, lmc, cfg = setup
    with pytest.raises(FcsaeInputError, match="d_in=16 does not match"):
        core.evaluate_core(identity_sae(16), lmc, cfg, norm_scale=1.0, lm=lm, progress=False)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_norm_scale_is_refused(setup, scale):
    lm, lmc, cfg = setup
    with pytest.raises(FcsaeInputError, match="norm_scale"):
        core.evaluate_core(identity_sae(32), lmc, cfg, norm_scale=scale, lm=lm, progress=False)


@pytest.mark.parametrize("field,value", [("context_len", 1), ("kl_topk", -1), ("batch_size", 0), ("icl_prefixes", -2),
                                         ("absorption_train_fraction", 1.0), ("absorption_words", 10),
                                         ("absorption_probe", "sklearn"), ("absorption_bootstrap", -1)])
def test_eval_config_refuses_bad_values(field, value):
    with pytest.raises(FcsaeInputError, match=field):
        EvalConfig(**{field: value})


# ------------------------------------------------------------------ fcsae eval


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    from fcsae.config import SAEConfig
    from fcsae.lm import save_model
    from fcsae.sae import SparseAutoencoder

    lm, _, cfg = setup
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_model(lm, root / "model")
    SparseAutoencoder(SAEConfig(d_in=32, dict_size=64, k=4)).save(root / "sae32")
    SparseAutoencoder(SAEConfig(d_in=16, dict_size=64, k=4)).save(root / "sae16")
    return root, str(model_dir), cfg.corpus


def _cli(*argv):
    from fcsae.cli import main

    return main([str(a) for a in argv])


def test_cli_eval_writes_json_and_prints_a_summary(saved, capsys):
    root, model_dir, text = saved
    out = root / "out.json"
    rc = _cli("eval", root / "sae32", "--model", model_dir, "--layer", 0, "--norm-scale", 2.0, "--corpus", text,
              "--core-tokens", 200, "--skip-absorption", "--out", out)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["layer"] == 0 and report["norm_scale"] == 2.0
    assert 0 <= report["core"]["l0"] <= 4 and "ce_loss_score" in report["core"]
    assert "explained_variance" in capsys.readouterr().out


@pytest.mark.parametrize("case,argv,message", [
    ("width", ["sae16", "--layer", "0", "--norm-scale", "1"], "d_in=16 does not match"),
    ("unknown", ["sae32"], "cannot tell the SAE's model, layer, norm_scale"),
    ("no-sae", ["nothing", "--layer", "0", "--norm-scale", "1"], "no such file"),
    ("words", ["sae32", "--layer", "0", "--norm-scale", "1", "--skip-core", "--absorption-words", "5000"],
     "single-token alphabetic words"),
    # a random tiny model's probe passes few letters: SAEBench's refusal, before the core eval runs
    ("refused", ["sae32", "--layer", "0", "--norm-scale", "1"], "SAEBench needs 20 and refuses"),
])
def test_cli_eval_bad_input_exits_2_and_writes_nothing(saved, capsys, case, argv, message):
    root, model_dir, text = saved
    argv = [root / argv[0], *argv[1:]]
    if case != "unknown":
        argv += ["--model", model_dir]
    out = root / f"{case}.json"
    assert _cli("eval", *argv, "--corpus", text, "--core-tokens", 200, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ spliced forward from block L+1


@pytest.mark.parametrize("arch,layer", [("llama", 0), ("llama", 1), ("gpt_neox", 1), ("llama", 2)])
@pytest.mark.parametrize("kl_topk", [8, 0])
def test_forward_from_cached_activations_equals_the_full_forward(tmp_path, monkeypatch, arch, layer, kl_topk):
    """Starting after layer L on the cached activations gives the full spliced forward's metrics (layer 2: last block,
    the full forward is used)."""
    from fcsae.config import SAEConfig
    from fcsae.lm import make_tiny_model
    from fcsae.sae import SparseAutoencoder

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path))
    lm = make_tiny_model(arch, d_model=32, n_layers=3)
    cfg = EvalConfig(corpus=write_text_corpus(tmp_path / "c.txt", n_paragraphs=300), core_tokens=200, context_len=32,
                     kl_topk=kl_topk, batch_size=4)
    sae = SparseAutoencoder(SAEConfig(d_in=32, dict_size=64, k=4), seed=1)
    calls = []
    blocks = [lm.model.blocks[i] for i in range(layer + 1)]
    for b in blocks:
        b.original_component.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    lmc = LMConfig(model="tiny", layer=layer)
    core.prepare_core_cache(lmc, cfg, lm=lm, progress=False)
    calls.clear()
    fast = core.evaluate_core(sae, lmc, cfg, norm_scale=2.0, lm=lm, progress=False)
    n_fast = len(calls)
    ref = core.evaluate_core(sae, lmc, cfg, norm_scale=2.0, lm=lm, progress=False, from_cache=False)
    for key, val in ref.items():
        assert fast[key] == pytest.approx(val, rel=1e-5, abs=1e-6), key
    assert fast["ce_loss_sae"] != pytest.approx(fast["ce_loss_clean"])  # the splice changed the predictions
    # blocks 0..L did not run in the cached path (they run in the reference); the last layer falls back
    assert (n_fast == 0) == (layer < 2) and len(calls) > n_fast
