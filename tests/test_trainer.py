"""Trainer: schedules, losses, dead detection, decoder norms, resume == uninterrupted, NaN, train_from_cache, CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from fcsae import cli
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import SparseAutoencoder
from fcsae.trainer import Trainer, TrainingDiverged, train_from_cache

D, FN, K, B = 16, 64, 4, 64
BASIS = torch.randn(48, D, generator=torch.Generator().manual_seed(123))


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed: int, i: int) -> torch.Tensor:
    """Batch i of a planted sparse-dictionary stream (deterministic)."""
    g = torch.Generator().manual_seed(seed * 100_003 + i)
    coef = (torch.rand(B, 48, generator=g) < 0.06).float() * (torch.rand(B, 48, generator=g) + 0.5)
    return coef @ BASIS + 0.5


def stream(seed=0, start=0):
    i = start
    while True:
        yield batch(seed, i)
        i += 1


def tcfg(**kw):
    base = dict(lr=3e-3, batch_size=B, total_tokens=B * 40, warmup_steps=4, log_every=5, dead_tokens=B * 6,
                l1_coeff=0.3, l1_warmup_steps=5, buffer_tokens=256)
    return TrainerConfig(**{**base, **kw})


class Recorder:
    def __init__(self):
        self.metrics, self.events, self.checkpoints = [], [], []

    def on_metrics(self, step, m):
        self.metrics.append((step, m))

    def on_event(self, ev):
        self.events.append(ev)

    def on_checkpoint(self, step):
        self.checkpoints.append(step)


def test_lr_schedule_warmup_flat_decay():
    t = Trainer(SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K)),
                TrainerConfig(lr=1.0, batch_size=1, total_tokens=100, warmup_steps=10, decay_start=0.8))
    lrs = [t.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_fit_learns_and_reports(activation):
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, activation=activation, k=K))
    t = Trainer(sae, tcfg())
    rec = Recorder()
    t.fit(stream(), callbacks=[rec])
    assert t.step == 40 and [s for s, _ in rec.metrics] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rec.checkpoints == [40]  # checkpoint_every=0: only at the end
    first, last = rec.metrics[0][1], rec.metrics[-1][1]
    assert {"loss", "mse", "fvu", "l0", "dead_frac", "lr"} <= set(last)
    assert last["fvu"] < first["fvu"] and last["fvu"] < 0.5
    if activation == "topk":
        assert last["l0"] <= K
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(FN))  # unit-norm constraint kept
    else:
        assert "l1" in last
    # b_dec was initialised from the first batch (the data has mean ~0.5 per dim)
    assert sae.b_dec.mean() > 0.2


def test_dead_detection():
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K))
    with torch.no_grad():
        sae.b_enc[:3] = -1e4  # latents 0..2 can never win the top-k
    t = Trainer(sae, tcfg(total_tokens=B * 20, dead_tokens=B * 5, auxk_coeff=0.0, lr=1e-4))
    data = stream()
    for step in range(4):
        t.train_step(next(data))
        assert not t.dead_mask_F[:3].any()  # fewer than dead_tokens = 5 * B tokens seen
    t.train_step(next(data))
    assert t.dead_mask_F[:3].all()
    assert t.tokens_since_fired_F[0] == 5 * B
    assert t.dead_mask_F.sum() < FN  # most latents fire
    fired_recently = t.tokens_since_fired_F < B
    assert fired_recently.sum() >= K


def _run(tmp_path: Path, total_steps: int, split: SplitConfig, tracker: TrackerConfig, activation="topk",
         stop_at=None):
    """Train with checkpoints every 5 steps; if ``stop_at`` is set, stop there, reload and finish."""
    cfg = tcfg(total_tokens=B * total_steps, checkpoint_every=5, resample_every=6, resample_until=0.9,
               dead_tokens=B * 4)
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, activation=activation, k=K), seed=cfg.seed)
    with torch.no_grad():
        sae.b_enc[:6] = -100.0  # some latents start dead, so that resampling happens
    t = Trainer(sae, cfg, split, tracker)
    ckpt = tmp_path / "ckpt"

    class Saver:
        def on_checkpoint(self, step):
            t.save_checkpoint(ckpt)

    if stop_at is None:
        t.fit(stream(), [Saver()])
        return t
    t.fit((batch(0, i) for i in range(stop_at)), [Saver()])
    assert t.step == stop_at
    resumed = Trainer.load_checkpoint(ckpt)
    assert resumed.step == stop_at

    class Saver2:
        def on_checkpoint(self, step):
            resumed.save_checkpoint(ckpt)

    resumed.fit(stream(start=resumed.step), [Saver2()])
    return resumed


@pytest.mark.parametrize("activation, criterion", [("topk", "dead"), ("relu", "dead"), ("topk", "fc")])
def test_resume_reproduces_uninterrupted(tmp_path, activation, criterion):
    if criterion == "fc":
        pytest.importorskip("fcsae.split")
    split = SplitConfig(criterion=criterion, min_inputs=2, rule="top_fraction", top_fraction=0.05)
    tracker = TrackerConfig(enabled=True) if criterion == "dead" else TrackerConfig()
    full = _run(tmp_path / "a", 30, split, tracker, activation)
    assert full.events, "the run should include resampling events so that their state is exercised"
    resumed = _run(tmp_path / "b", 30, split, tracker, activation, stop_at=10)
    assert resumed.step == full.step == 30
    assert resumed.events == full.events
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(resumed.sae, name), getattr(full.sae, name), atol=1e-5, rtol=1e-4)
    for key, val in full.tracker.state_dict().items():
        torch.testing.assert_close(resumed.tracker.state_dict()[key], val, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(resumed.tokens_since_fired_F, full.tokens_since_fired_F)


def test_nan_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    t = Trainer(SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K)), tcfg(checkpoint_every=3))
    ckpt = tmp_path / "ckpt"

    class Saver:
        def on_checkpoint(self, step):
            t.save_checkpoint(ckpt)

    def data():
        for i in range(4):
            yield batch(0, i)
        bad = batch(0, 4)
        bad[2, 1] = float("nan")
        yield bad

    with pytest.raises(TrainingDiverged, match="step 4"):
        t.fit(data(), [Saver()])
    good = Trainer.load_checkpoint(ckpt)
    assert good.step == 3 and torch.isfinite(good.sae.W_dec).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_load_checkpoint_refuses_garbage(tmp_path):
    with pytest.raises(FcsaeInputError, match="not a checkpoint"):
        Trainer.load_checkpoint(tmp_path)
    t = Trainer(SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K)), tcfg())
    t.save_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "state.safetensors").write_bytes(b"xx")
    with pytest.raises(FcsaeInputError, match="corrupt"):
        Trainer.load_checkpoint(tmp_path / "c")


# ------------------------------------------------------------ train_from_cache with a stand-in cache
class FakeCache:
    """Stands in for ``fcsae.activations.ActivationCache``: the same deterministic stream as above."""

    def __init__(self, path):
        self.path = Path(path)
        meta = json.loads((self.path / "fake.json").read_text())
        self.d_in, self.n_tokens, self.norm_scale = meta["d_in"], 10_000, 0.5
        self.manifest = meta

    def batches(self, batch_size, seed=0, start_batch=0):
        assert batch_size == B
        return stream(seed, start_batch)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    import fcsae.activations as activations

    monkeypatch.setattr(activations, "ActivationCache", FakeCache)
    path = tmp_path / "cache"
    path.mkdir()
    (path / "fake.json").write_text(json.dumps({"d_in": D}))
    return path


def test_train_from_cache_writes_outputs_and_resumes(tmp_path, fake_cache):
    sae_cfg = SAEConfig(d_in=D, dict_size=FN, k=K)
    cfg = tcfg(total_tokens=B * 12, checkpoint_every=4, resample_every=3, dead_tokens=B * 2)
    split = SplitConfig(criterion="dead")
    res = train_from_cache(fake_cache, sae_cfg, cfg, split, TrackerConfig(), tmp_path / "run", progress=False)
    out = tmp_path / "run"
    loaded = SparseAutoencoder.load(out / "sae", expect=sae_cfg)
    torch.testing.assert_close(loaded.W_dec, res.sae.W_dec)
    lines = (out / "events.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [ev.to_dict() for ev in res.events]
    info = json.loads((out / "train.json").read_text())
    assert info["norm_scale"] == 0.5 and info["step"] == 12 and math.isfinite(info["metrics"]["fvu"])
    # a second call finds the finished checkpoint and does not train again
    again = train_from_cache(fake_cache, sae_cfg, cfg, split, TrackerConfig(), out, progress=False)
    torch.testing.assert_close(again.sae.W_dec, res.sae.W_dec)
    with pytest.raises(FcsaeInputError, match="different trainer config"):
        train_from_cache(fake_cache, sae_cfg, tcfg(total_tokens=B * 13), split, TrackerConfig(), out, progress=False)
    with pytest.raises(FcsaeInputError, match="d_in"):
        train_from_cache(fake_cache, SAEConfig(d_in=D + 1, dict_size=FN, k=K), cfg, split, TrackerConfig(),
                         tmp_path / "other", progress=False)


# ------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("flags, message", [
    (["--k", "100", "--dict-size", "64"], "k: must be"),
    (["--dict-size", "0"], "dict_size"),
    (["--lr", "0"], "lr: must be > 0"),
    (["--lr", "-1"], "lr: must be > 0"),
    (["--activation", "gelu"], "activation: must be one of"),
    (["--threads", "-1"], "threads: must be an integer >= 0"),
])
def test_cli_bad_input_exit_2(fake_cache, tmp_path, capsys, flags, message):
    rc = cli.main(["train", "--cache", str(fake_cache), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_d_in_mismatch_and_bad_yaml(fake_cache, tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"sae:\n  d_in: {D + 3}\n  dict_size: 32\n")
    assert cli.main(["train", "--cache", str(fake_cache), "--config", str(conf), "--out", str(tmp_path / "o")]) == 2
    assert "d_in" in capsys.readouterr().err
    conf.write_text("trainer:\n  lr: [1\n")
    assert cli.main(["train", "--cache", str(fake_cache), "--config", str(conf)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    conf.write_text("optimizer:\n  lr: 1\n")
    assert cli.main(["train", "--cache", str(fake_cache), "--config", str(conf)]) == 2
    assert "unknown section" in capsys.readouterr().err
    conf.write_text("trainer:\n  learning_rate: 1\n")
    assert cli.main(["train", "--cache", str(fake_cache), "--config", str(conf)]) == 2
    assert "trainer.learning_rate: unknown key" in capsys.readouterr().err


def test_cli_missing_cache_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--cache", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_trains(fake_cache, tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("sae:\n  activation: relu\ntrainer:\n  warmup_steps: 2\n  log_every: 2\n")
    out = tmp_path / "o"
    rc = cli.main(["train", "--cache", str(fake_cache), "--config", str(conf), "--dict-size", "32",
                   "--train-tokens", str(B * 6), "--batch-size", str(B), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["out"] == str(out)
    sae = SparseAutoencoder.load(out / "sae")
    assert sae.cfg == SAEConfig(d_in=D, dict_size=32, activation="relu")


def test_input_buffer_keeps_the_most_recent_rows():
    t = Trainer(SparseAutoencoder(SAEConfig(d_in=2, dict_size=4, k=1)), tcfg(buffer_tokens=5))
    rows = torch.arange(26, dtype=torch.float32).reshape(13, 2)
    t._push_buffer(rows[:3])
    assert t.buffer_fill == 3 and torch.equal(t.buffer_ND[:3], rows[:3])
    t._push_buffer(rows[3:7])  # wraps around
    assert t.buffer_fill == 5
    assert sorted(t.buffer_ND[:, 0].tolist()) == rows[2:7, 0].tolist()
    t._push_buffer(rows[7:13])  # more than the capacity at once
    assert sorted(t.buffer_ND[:, 0].tolist()) == rows[8:13, 0].tolist()


def test_cli_divergence_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import fcsae.activations as activations

    class NanCache(FakeCache):
        def batches(self, batch_size, seed=0, start_batch=0):
            for i, x in enumerate(stream(seed, start_batch)):
                yield x * float("inf") if i == 2 else x

    monkeypatch.setattr(activations, "ActivationCache", NanCache)
    path = tmp_path / "cache"
    path.mkdir()
    (path / "fake.json").write_text(json.dumps({"d_in": D}))
    rc = cli.main(["train", "--cache", str(path), "--dict-size", "32", "--train-tokens", str(B * 6),
                   "--batch-size", str(B), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "at step 2" in err[-1]
    assert not (tmp_path / "o" / "sae").exists()


def test_cli_end_to_end_on_a_real_tiny_cache(tmp_path, monkeypatch, capsys):
    """--model/--layer: harvest a tiny random model's activations, train, interrupt-free resume is a no-op."""
    from fcsae.activations import ActivationCache
    from fcsae.lm import make_tiny_model, save_model
    from tests._data_utils import tiny_texts, write_text_file

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_tiny_model("gpt_neox", d_model=32, n_layers=2), tmp_path / "tiny-model")
    text = write_text_file(tmp_path / "tiny.txt", tiny_texts(80))
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--layer", "1", "--corpus", str(text), "--context-len", "16",
            "--harvest-tokens", "512", "--dict-size", "64", "--k", "4", "--train-tokens", "1024", "--batch-size", "64",
            "--out", str(out)]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 16 and 0 <= summary["fvu"] < 1.5
    info = json.loads((out / "train.json").read_text())
    cache = ActivationCache(info["cache"])
    assert cache.d_in == 32 and info["norm_scale"] == cache.norm_scale
    sae = SparseAutoencoder.load(out / "sae", expect=SAEConfig(d_in=32, dict_size=64, k=4))
    assert cli.main(args) == 0  # resumes from the finished checkpoint: nothing to train, same SAE
    torch.testing.assert_close(SparseAutoencoder.load(out / "sae").W_dec, sae.W_dec)
    # Without --harvest-tokens the cache just harvested is reused (no new harvest), whatever its size.
    caches_before = sorted((tmp_path / "home" / "activations").iterdir())
    reuse = [a for a in args if a not in ("--harvest-tokens", "512")]
    reuse[reuse.index("--out") + 1] = str(tmp_path / "run2")
    assert cli.main([*reuse, "--criterion", "fc", "--no-progress"]) == 0
    assert sorted((tmp_path / "home" / "activations").iterdir()) == caches_before
    assert json.loads((tmp_path / "run2" / "train.json").read_text())["cache"] == info["cache"]


def test_cli_train_refuses_the_ambiguous_tokens_flag(fake_cache, tmp_path, capsys):
    assert cli.main(["train", "--cache", str(fake_cache), "--tokens", "100", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--train-tokens" in err and "--harvest-tokens" in err and not (tmp_path / "o").exists()
    assert cli.main(["train", "--cache", str(fake_cache), "--criterion", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "criterion: must be one of" in capsys.readouterr().err


def test_cli_help_quotes_the_config_defaults(capsys):
    from fcsae.config import SAEConfig, SplitConfig, TrainerConfig

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"sae.dict_size (default {SAEConfig(d_in=1).dict_size})" in text
    assert f"trainer.total_tokens (default {TrainerConfig().total_tokens})" in text
    assert f"split.criterion (default {SplitConfig().criterion};" in text
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fcsae ")


def test_remove_checkpoint_frees_the_resume_state_and_keeps_the_sae(fake_cache, tmp_path):
    from fcsae.trainer import remove_checkpoint

    out = tmp_path / "run"
    train_from_cache(fake_cache, SAEConfig(d_in=D, dict_size=FN, k=K), tcfg(total_tokens=B * 4), SplitConfig(),
                     TrackerConfig(), out, progress=False)
    assert (out / "checkpoint").is_dir()
    assert remove_checkpoint(out) > 0
    assert not (out / "checkpoint").exists() and (out / "sae").is_dir() and (out / "events.jsonl").exists()
    assert remove_checkpoint(out) == 0
