"""The fast path's speed work against brute-force references: fused sparse backward, AuxK restricted to the dead
columns, bf16-ranked encoder with fp32 values (every sparse activation: topk, batchtopk, matryoshka)."""

import pytest
import torch

from fcsae.config import SAEConfig, TrainerConfig
from fcsae.sae import SparseAutoencoder, _Layout, bf16_encoder_pays, dead_topk
from fcsae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

D, FN, B = 24, 96, 40
ACTIVATIONS = [("topk", {"k": 6}), ("batchtopk", {"k": 6.0}),
               ("matryoshka", {"k": 6.0, "matryoshka_groups": "16,48,96"})]


def _data(seed=0, n=B, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 1.7 + 0.3


def _trainers(activation, kw, dead_frac):
    """A fast and a dense trainer with equal weights and the same dead latents (AuxK on when any are dead)."""
    cfg = SAEConfig(d_in=D, dict_size=FN, activation=activation, **kw)
    tcfg = TrainerConfig(batch_size=B, total_tokens=B * 100, warmup_steps=0, b_dec_init="zeros", buffer_tokens=0,
                         auxk_k=16, auxk_coeff=0.5, dead_tokens=10,
                         bf16_encoder="off")  # fp32 ranking on every CPU: "auto" picks bf16 on AVX512-BF16/AMX ones
    out = []
    for fast in (True, False):
        t = Trainer(SparseAutoencoder(cfg, fast=fast, seed=3), tcfg)
        with torch.no_grad():
            t.sae.b_dec.copy_(torch.linspace(-0.5, 0.5, D))  # a non-zero b_dec: its gradient through the encoder counts
            t.sae.b_enc.copy_(torch.linspace(-0.2, 0.2, FN))
        if dead_frac:
            t.tokens_since_fired_F[::round(1 / dead_frac)] = 100  # >= dead_tokens: dead
        out.append(t)
    return out


@pytest.mark.parametrize("activation,kw", ACTIVATIONS)
@pytest.mark.parametrize("dead_frac", [0.0, 0.25, 1.0])
def test_fused_backward_matches_the_dense_reference(activation, kw, dead_frac):
    """Loss (AuxK included) and the gradients of all four parameters equal the dense autograd reference's."""
    fast, dense = _trainers(activation, kw, dead_frac)
    x = _data()
    grads, losses = [], []
    for t in (fast, dense):
        loss, parts, _ = t._losses(x, 0)
        loss.backward()
        losses.append(parts)
        grads.append({n: getattr(t.sae, n).grad.clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    assert ("auxk" in losses[0]) == (dead_frac > 0) == ("auxk" in losses[1])
    for key in losses[1]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=1e-5, atol=1e-6)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("n_dead,a", [(1, 1), (5, 3), (40, 16), (96, 16)])
def test_restricted_auxk_equals_full_width_auxk(n_dead, a):
    """Top-a over the dead columns only picks the same (value, latent) pairs as top-a with live columns at -inf."""
    pre = torch.randn(B, FN, generator=torch.Generator().manual_seed(n_dead))
    dead = torch.zeros(FN, dtype=torch.bool)
    dead[torch.randperm(FN, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    vals, idx = dead_topk(pre, dead, a)
    ref_vals, ref_idx = pre.masked_fill(~dead, float("-inf")).topk(a, dim=1)
    assert dead[idx].all()
    torch.testing.assert_close(vals.sort(1, descending=True).values, ref_vals, rtol=0, atol=0)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)


def test_layout_scatter_and_dots_match_brute_force():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 30, (12, 5), generator=g)  # duplicates within a row included
    w, y, M = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g), torch.randn(30, 7, generator=g)
    lay = _Layout(idx, 30)
    ref = torch.zeros(30, 7)
    for b in range(12):
        for n in range(5):
            ref[idx[b, n]] += w[b, n] * y[b]
    torch.testing.assert_close(lay.scatter(w, y), ref)
    torch.testing.assert_close(lay.dots(y, M), (y[:, None, :] * M[idx]).sum(-1))
    acc = torch.ones(30, 7)
    lay.scatter(w, y, out_RD=acc)
    torch.testing.assert_close(acc, ref + 1)


BF16_INDEX_AGREEMENT = 0.97
"""Kept (token, latent) pairs the bf16 ranking shares with fp32's (measured 0.99 at 576 x 16384, k 64)."""


@pytest.mark.parametrize("activation,kw", ACTIVATIONS)
def test_bf16_ranking_keeps_fp32_values_and_nearly_fp32_indices(activation, kw):
    """bf16 picks >= 97% of fp32's pairs; the values it returns are the fp32 pre-activations of its pairs (to 1e-5)."""
    d, F, n = 64, 512, 256
    k = {"k": 16} if activation == "topk" else {"k": 16.0}
    extra = {"matryoshka_groups": "128,512"} if activation == "matryoshka" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=d, dict_size=F, activation=activation, **k, **extra), seed=0)
    x = _data(1, n, d)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        ref, _ = sae.forward_aux(x)
        sae.encoder_bf16 = True
        got, _ = sae.forward_aux(x)
        pre32 = sae.pre_acts(x)
    real = got.acts_BK > 0
    torch.testing.assert_close(got.acts_BK[real], pre32.gather(1, got.idx_BK)[real], rtol=1e-5, atol=1e-5)

    def pairs(out):
        keep = out.acts_BK > 0
        return set(zip(torch.nonzero(keep)[:, 0].tolist(), out.idx_BK[keep].tolist()))

    p32, p16 = pairs(ref), pairs(got)
    assert len(p32 & p16) >= BF16_INDEX_AGREEMENT * len(p32)
    assert abs(len(p16) - len(p32)) <= 0.01 * len(p32) + 1


def test_bf16_backward_is_the_fp32_backward_of_its_pairs():
    """Loss and gradients of the bf16-ranked path equal plain fp32 autograd on the pairs it picked."""
    cfg = SAEConfig(d_in=D, dict_size=FN, k=6)
    sae, ref = SparseAutoencoder(cfg, seed=5), SparseAutoencoder(cfg, seed=5)
    with torch.no_grad():
        for s in (sae, ref):
            s.b_dec.copy_(torch.linspace(-0.5, 0.5, D))
    sae.encoder_bf16 = True
    x = _data(2)
    out, _ = sae.forward_aux(x)
    loss = (out.recon_BD - x).pow(2).sum()
    loss.backward()
    pre = ref.pre_acts(x)  # fp32, dense, autograd
    lat = torch.zeros_like(pre).scatter(1, out.idx_BK, torch.relu(pre.gather(1, out.idx_BK)))
    ref_loss = (ref.decode(lat) - x).pow(2).sum()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_flag_auto_follows_the_hardware(monkeypatch):
    cfg = SAEConfig(d_in=D, dict_size=FN, k=6)
    t = Trainer(SparseAutoencoder(cfg), TrainerConfig(batch_size=B, total_tokens=B * 10))
    assert t.sae.encoder_bf16 == bf16_encoder_pays("cpu")
    assert Trainer(SparseAutoencoder(cfg), TrainerConfig(batch_size=B, total_tokens=B * 10,
                                                          bf16_encoder="on")).sae.encoder_bf16
    assert not Trainer(SparseAutoencoder(cfg), TrainerConfig(batch_size=B, total_tokens=B * 10,
                                                              bf16_encoder="off")).sae.encoder_bf16
    from fcsae.errors import FcsaeInputError

    with pytest.raises(FcsaeInputError, match="bf16_encoder"):
        TrainerConfig(bf16_encoder="yes")


@pytest.mark.slow
def test_bf16_trains_to_the_fp32_explained_variance_on_real_activations(tmp_path):
    """SmolLM2 layer-8 residuals: fp32 and bf16-ranked TopK SAEs at equal steps reach the same EV within 0.01."""
    from fcsae.config import DEFAULT_LAYER, DEFAULT_MODEL
    from fcsae.corpus import iter_texts, pack
    from fcsae.lm import load_model, resid_at

    lm = load_model(DEFAULT_MODEL)
    tokens = pack(iter_texts("offline", split="train"), lm.tokenizer, 128, max_rows=64)
    x = resid_at(lm, tokens, DEFAULT_LAYER)[:, 1:].reshape(-1, lm.d_model).float()
    x = x * (lm.d_model ** 0.5 / x.norm(dim=1).mean())  # the cache's normalisation: E||x|| = sqrt(d_in)
    train, held = x[: len(x) - 1024], x[len(x) - 1024:]
    evs = {}
    for mode in ("off", "on"):
        cfg = TrainerConfig(batch_size=512, total_tokens=512 * 150, lr=1e-3, warmup_steps=10, bf16_encoder=mode,
                            log_every=10 ** 6, buffer_tokens=0)
        t = Trainer(SparseAutoencoder(SAEConfig(d_in=lm.d_model, dict_size=1024, k=32), seed=0), cfg)
        g = torch.Generator().manual_seed(0)
        for _ in range(150):
            t.train_step(train[torch.randint(len(train), (512,), generator=g)])
        t.sae.encoder_bf16 = False
        with torch.no_grad():
            recon = t.sae(held).recon_BD
        evs[mode] = float(1 - (held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    print("explained variance at 150 steps:", evs)
    assert evs["off"] > 0.5
    assert abs(evs["on"] - evs["off"]) < 0.01, evs


def test_layout_adam_updates_the_transposed_encoder_like_adam_without_a_copy(monkeypatch):
    """LayoutAdam on W_enc's [D, F] view of an [F, D] tensor: the fused kernel gets contiguous tensors only, and the
    parameters after three steps equal plain (unfused) Adam's."""
    from fcsae.trainer import LayoutAdam

    g = torch.Generator().manual_seed(0)
    base = torch.randn(FN, D, generator=g)
    p_fast, p_ref = torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(base.clone().t())
    b_fast, b_ref = torch.nn.Parameter(torch.randn(FN, generator=g)), None
    b_ref = torch.nn.Parameter(b_fast.detach().clone())
    fast = LayoutAdam([p_fast, b_fast], lr=1e-2, fused=True)
    ref = torch.optim.Adam([p_ref, b_ref], lr=1e-2, foreach=False)
    seen = []
    real = torch._fused_adam_

    def spy(params, grads, exp_avgs, exp_avg_sqs, *args, **kw):
        seen.extend(t.is_contiguous() for t in (*params, *grads, *exp_avgs, *exp_avg_sqs))
        return real(params, grads, exp_avgs, exp_avg_sqs, *args, **kw)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    for _ in range(3):
        gW = torch.randn(FN, D, generator=g).t()  # the backward's layout: a view like the parameter
        gb = torch.randn(FN, generator=g)
        p_fast.grad, p_ref.grad = gW.clone().t().contiguous().t(), gW.contiguous()
        b_fast.grad, b_ref.grad = gb.clone(), gb.clone()
        fast.step()
        ref.step()
    assert seen and all(seen)
    assert not p_fast.is_contiguous() and p_fast.t().is_contiguous()  # the parameter keeps its layout
    torch.testing.assert_close(p_fast, p_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b_fast, b_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.state[p_fast]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("activation,kw", ACTIVATIONS)
@pytest.mark.parametrize("dead_frac", [0.0, 0.25])
def test_recycled_gradient_buffers_are_reused_and_change_nothing(activation, kw, dead_frac, monkeypatch):
    """After the first step W_enc's gradient (and W_dec's, for topk/batchtopk without AuxK, whose second decode adds a
    second W_dec gradient autograd sums) lands in the same memory every step, and four steps give bit-identical weights to a
    trainer that allocates fresh gradients (recycling off)."""
    fast, _ = _trainers(activation, kw, dead_frac)
    plain, _ = _trainers(activation, kw, dead_frac)
    monkeypatch.setattr(plain.sae, "recycle_grads", lambda: None)
    ptrs = []
    orig = fast.optimizer.step

    def step_and_note(*a, **k):
        ptrs.append((fast.sae.W_enc.grad.data_ptr(), fast.sae.W_dec.grad.data_ptr()))
        return orig(*a, **k)

    monkeypatch.setattr(fast.optimizer, "step", step_and_note)
    for seed in range(4):
        x = _data(seed)
        if dead_frac == 0:  # keep every latent alive (dead_tokens is 10, a batch 40): no AuxK at any step
            fast.tokens_since_fired_F.zero_()
            plain.tokens_since_fired_F.zero_()
        fast.train_step(x)
        plain.train_step(x)
    assert len({p[0] for p in ptrs[1:]}) == 1, ptrs  # steps 2-4 wrote into the buffer step 1 handed back
    if dead_frac == 0 and activation != "matryoshka":  # matryoshka decodes its prefixes in one plain embedding_bag
        assert len({p[1] for p in ptrs[1:]}) == 1, ptrs
    assert fast.sae.W_enc.grad is None and fast.sae.W_dec.grad is None  # nothing can read a buffer being reused
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(fast.sae, name), getattr(plain.sae, name)), name
