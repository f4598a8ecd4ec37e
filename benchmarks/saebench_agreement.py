"""fcsae's absorption eval vs SAEBench 0.6.0's own code on the same SAEs, model, layer and words.

For each SAE (an fcsae SAE directory) it

1. exports the SAE in SAELens's format (``fcsae.saelens``) and hands SAEBench
   that directory (``SAE.load_from_disk``), checking that SAELens encodes raw
   activations to fcsae's codes (same active latents, codes / norm_scale);
2. runs fcsae's eval (``absorption_probe: saebench``, and ``standardized`` for
   the probe convention's effect) at ``--words`` words;
3. runs SAEBench (``benchmarks/saebench_worker.py`` in a throwaway venv with
   sae-bench 0.6.0 + transformer-lens 3.x + sae-lens, built on first use
   under ``--venv``): *end to end* (its own split, prompts and probe, over
   ``--seeds`` seeds) and *same probe* (fcsae's probe, split and cached
   activations replayed into SAEBench's functions: only the scoring differs).

Prints both comparisons and ends with one headline line

    saebench_agreement: ratio=X.XX (...)

= fcsae / SAEBench mean absorption fraction, end to end, on the first SAE.
Without ``--sae`` it trains a small default SAE (TopK 2,048, k 32, 240k
tokens, the quickstart's shape) so it runs unattended. ``--fixture PATH``
instead writes the small same-probe fixture that ``tests/evals/
test_saebench_fixture.py`` checks (a tiny random model, no SmolLM2).

    .venv/bin/python benchmarks/saebench_agreement.py [--sae DIR ...] [--words 2000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("saebench_worker.py")
VENV = "/tmp/venvs/saebench-0.6.0"
PINS = ["torch==2.13.0", "transformer-lens>=3,<4", "sae-lens==6.54.12", "numpy>=2,<2.4", "datasets>=3,<4",
        "beartype", "einops", "jaxtyping", "pandas", "pydantic", "scikit-learn", "seaborn", "plotly", "tabulate",
        "tqdm", "matplotlib"]
"""The throwaway venv. sae-bench itself goes in with --no-deps: it pins numpy < 2 (pyarrow, which datasets needs,
wants numpy 2) and asks for torchvision/openai/sae-probes, which its absorption eval never imports."""


def ensure_venv(venv: str) -> str:
    """The venv's python, building the venv on first use (minutes)."""
    py = Path(venv) / "bin" / "python"
    done = Path(venv) / ".fcsae-ready"
    if done.is_file():
        return str(py)
    print(f"building the sae-bench venv under {venv} (first use; several minutes)", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    pip = [str(Path(venv) / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + PINS, check=True)
    subprocess.run(pip + ["--no-deps", "sae-bench==0.6.0"], check=True)
    done.write_text("ok\n")
    return str(py)


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_worker(py: str, job: dict, work: Path, timeout: int, tag: str = "fixture") -> dict:
    """Run one SAEBench job in the venv; its JSON result (reused when ``work`` already holds it: resumable)."""
    job_path = work / f"job-{tag}-{job['mode']}-{job['seed']}.json"
    job["out"] = str(job_path.with_suffix(".out.json"))
    if Path(job["out"]).is_file():
        out = json.loads(Path(job["out"]).read_text())
        # a worker started by hand (the same job file) records its stage times but not the driver's wall time
        out.setdefault("seconds", round(sum(out.get(k, 0) for k in ("probe_seconds", "k_sparse_seconds",
                                                                     "absorption_seconds")), 1))
        out.setdefault("load", "n/a")
        print(f"  reusing {job['out']}", flush=True)
        return out
    job_path.write_text(json.dumps(job))
    load0 = _load()
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 1)), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    t = time.perf_counter()
    proc = subprocess.run([py, str(WORKER), str(job_path)], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"SAEBench worker ({job['mode']}) failed:\n{proc.stderr[-3000:]}")
    out = json.loads(Path(job["out"]).read_text())
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["load"] = f"{load0} -> {_load()}"
    Path(job["out"]).write_text(json.dumps(out, indent=2))
    print(f"  SAEBench {job['mode']} seed {job['seed']}: mean absorption {out['mean_absorption_fraction']:.4f}, "
          f"{out['seconds']:.0f} s (load {out['load']})", flush=True)
    return out


def replay_tensors(sae, data, norm_scale: float, n_check: int = 256) -> dict[str, torch.Tensor]:
    """fcsae's probe, split, activations, and reference codes for the SAELens check."""
    from fcsae.evals.absorption import encode_sparse

    x = data.acts_test_ND[:n_check].float().clone()
    margin_N, tol_N = selection_margin(sae, x, norm_scale)
    return {"acts_train": data.acts_train_ND.float(), "acts_test": data.acts_test_ND.float(),
            "labels_train": data.labels_train_N, "labels_test": data.labels_test_N,
            "probe_W": data.probe_W_LD.float(), "probe_b": data.probe_b_L.float(),
            "codes_check_x": x, "codes_check_z": encode_sparse(sae, x, norm_scale).to_dense(),
            "codes_check_margin": margin_N, "codes_check_tie_tol": tol_N}


def selection_margin(sae, x_ND: torch.Tensor, norm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (raw units): how far its selection is from flipping (TopK: the k-th minus the (k+1)-th
    pre-activation; threshold SAEs: the pre-activation nearest the threshold), and the fp32 rounding that
    two encoder formulas can differ by (1e-6 x ||x|| x the largest encoder norm). A token whose margin is
    below that may keep another latent in SAELens's arithmetic: a tie, not a wrong export (measured on
    the study's 4,096-latent SAE: 1 token of 256, margin 5e-6, fp64 agreeing with fcsae)."""
    with torch.no_grad():
        pre_NF = sae.pre_acts(x_ND * norm_scale) / norm_scale
        if getattr(sae, "batch", False):
            margin_N = (pre_NF - float(sae.threshold.clamp_min(0)) / norm_scale).abs().min(1).values
        else:
            top_NK = pre_NF.topk(sae.cfg.k + 1, dim=1).values
            margin_N = top_NK[:, -2] - top_NK[:, -1]
        tol_N = 1e-6 * x_ND.norm(dim=1) * float(sae.W_enc.norm(dim=0).max()) + 1e-6
    return margin_N, tol_N


def default_sae() -> str:
    """A quickstart-shaped SAE (trained once into $FCSAE_HOME/runs when absent)."""
    from fcsae import activations
    from fcsae.config import HarvestConfig, LMConfig, SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
    from fcsae.paths import cache_dir
    from fcsae.trainer import train_from_cache

    out = cache_dir("runs") / "saebench-agreement-topk2048"
    if (out / "sae" / "cfg.json").is_file() or (out / "cfg.json").is_file():
        return str(out / "sae") if (out / "sae").is_dir() else str(out)
    cache = activations.harvest(HarvestConfig(lm=LMConfig(model="smollm2-135m", layer=8), tokens=120_000))
    c = activations.ActivationCache(cache)
    res = train_from_cache(cache, SAEConfig(d_in=c.d_in, dict_size=2048, k=32),
                           TrainerConfig(total_tokens=240_000, batch_size=1024), SplitConfig(), TrackerConfig(), out)
    return str(res.out_dir / "sae") if (res.out_dir / "sae").is_dir() else str(res.out_dir)


def _fcsae_side(sae, lm_cfg, cfg, norm_scale: float, lm, path: Path):
    """fcsae's eval with both probe conventions (kept in the work dir, so a resumed run does not redo it)."""
    from dataclasses import replace

    from fcsae.evals.absorption import evaluate_absorption

    if path.is_file():
        d = json.loads(path.read_text())
        return d["ours"], d["std"], d["seconds"], d["load"]
    t, load0 = time.perf_counter(), _load()
    ours = evaluate_absorption(sae, lm_cfg, cfg, norm_scale, lm=lm, progress=False).summary
    t_ours, load_ours = round(time.perf_counter() - t, 1), f"{load0} -> {_load()}"
    std = evaluate_absorption(sae, lm_cfg, replace(cfg, absorption_probe="standardized"), norm_scale, lm=lm,
                              progress=False).summary
    path.write_text(json.dumps({"ours": ours, "std": std, "seconds": t_ours, "load": load_ours}, default=float))
    return ours, std, t_ours, load_ours


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def compare_one(sae_dir: str, args, py: str, work: Path, lm) -> dict:
    """Both comparisons for one SAE; prints them and returns the numbers."""
    from fcsae.config import EvalConfig, LMConfig
    from fcsae.evals import probe as probe_mod
    from fcsae.evals.absorption import prepare_absorption_cache
    from fcsae.evals.report import resolve_target
    from fcsae.saelens import export_saelens
    from fcsae.sae import SparseAutoencoder
    from safetensors.torch import save_file

    target = resolve_target(sae_dir, norm_scale=args.norm_scale)
    sae = SparseAutoencoder.load(sae_dir)
    lm_cfg = LMConfig(model=target.model, layer=target.layer)
    tag = Path(sae_dir).resolve().parent.name if Path(sae_dir).name == "sae" else Path(sae_dir).name
    sl_dir = export_saelens(sae, work / f"saelens-{tag}", target.model, target.layer, target.norm_scale,
                            target.context_len, lm.tokenizer.bos_token_id)
    cfg = EvalConfig(absorption_words=args.words, seed=0)
    ours, std, t_ours, load_ours = _fcsae_side(sae, lm_cfg, cfg, target.norm_scale, lm, work / f"fcsae-{tag}.json")
    print(f"fcsae ({tag}, {args.words} words): mean absorption fraction {_fmt(ours['mean_absorption_fraction'])}, "
          f"standardized probe {_fmt(std['mean_absorption_fraction'])}, {int(ours['n_letters'])} letters, "
          f"{t_ours:.0f} s (load {load_ours})", flush=True)
    data = prepare_absorption_cache(lm_cfg, cfg, lm=lm, progress=False)
    save_file({k: v.contiguous() for k, v in replay_tensors(sae, data, target.norm_scale).items()},
              str(work / f"data-{tag}.safetensors"))
    from fcsae.paths import cache_dir

    base = {"sae_dir": str(sl_dir), "model_dir": str(cache_dir("models") / target.model), "model_name": target.model,
            "layer": target.layer, "data": str(work / f"data-{tag}.safetensors"), "threads": args.threads,
            "words_test": data.words_test, "words_train": data.words_train,
            "words": probe_mod.sample_vocab(lm.tokenizer, cfg).words}
    same = run_worker(py, {**base, "mode": "replay", "seed": 0}, work, args.timeout, tag)
    # SAEBench's probe depends on the model, layer, words and seed only; like main.py it is trained once and reused
    words_key = hashlib.sha256("\n".join(base["words"]).encode()).hexdigest()[:12]
    e2e = [run_worker(py, {**base, "mode": "e2e", "seed": s,
                           "probes_dir": str(work / f"probes-{target.model}-L{target.layer}-{words_key}-s{s}")},
                      work, args.timeout, tag) for s in range(args.seeds)]
    sb = [r["mean_absorption_fraction"] for r in e2e] or [float("nan")]  # --seeds 0: the same-probe comparison only
    sb_mean = sum(sb) / len(sb)
    fa = ours["mean_absorption_fraction"]
    res = {"sae": sae_dir, "tag": tag, "words": len(base["words"]), "fcsae": ours, "fcsae_standardized": std,
           "fcsae_seconds": round(t_ours, 1), "fcsae_load": load_ours, "saebench_same_probe": same,
           "saebench_e2e": e2e, "saebench_e2e_min": min(sb), "saebench_e2e_max": max(sb),
           "ratio_e2e": fa / sb_mean if sb_mean else float("nan"), "diff_e2e": fa - sb_mean,
           "ratio_same": ours["mean_absorption_fraction"] / same["mean_absorption_fraction"]
           if same["mean_absorption_fraction"] else float("nan")}
    print(f"\n== {tag}: {target.model} layer {target.layer}, {sae.cfg.activation} {sae.cfg.dict_size} latents "
          f"(k {sae.cfg.k}), {res['words']} words")
    print(f"SAELens export: {same['sae_class']}, same active latents {same.get('saelens_same_active_latents')} "
          f"({same.get('saelens_tokens_differing', '?')} of {same.get('saelens_tokens_checked', '?')} tokens differ, "
          f"at fp32 ties only: {same.get('saelens_differing_at_ties_only')}), "
          f"codes max |diff| {same.get('saelens_codes_max_abs_diff', float('nan')):.2e}")
    print(f"same probe  : fcsae {_fmt(ours['mean_absorption_fraction'])}  SAEBench {_fmt(same['mean_absorption_fraction'])}"
          f"  ratio {res['ratio_same']:.3f}  (letters {int(ours['n_letters'])} vs {same['n_letters']})")
    res["agrees"] = bool(abs(res["ratio_e2e"] - 1) <= 0.10 or abs(res["diff_e2e"]) <= 0.02
                         or (len(sb) > 1 and min(sb) <= fa <= max(sb)))
    if not e2e:
        print(f"end to end  : not run (--seeds 0); standardized probe {_fmt(std['mean_absorption_fraction'])}; "
              f"time: fcsae {t_ours:.0f} s (load {load_ours}), SAEBench same-probe {same['seconds']:.0f} s", flush=True)
        return res
    print(f"end to end  : fcsae {_fmt(fa)}  SAEBench {', '.join(map(_fmt, sb))} "
          f"(mean {_fmt(sb_mean)}, spread {_fmt(min(sb))}-{_fmt(max(sb))} over {len(sb)} seeds)  "
          f"ratio {res['ratio_e2e']:.3f}  diff {res['diff_e2e']:+.4f}  "
          f"{'agrees' if res['agrees'] else 'DISAGREES'} (10% relative, 0.02 absolute or inside the spread)")
    print(f"letters passing the probe: fcsae {int(ours['n_letters'])}; SAEBench end to end "
          f"{', '.join(str(r['n_letters']) for r in e2e)}" + (" (SAEBench refuses < 20)" if any(r["refused"] for r in e2e) else ""))
    print(f"full absorption: fcsae {_fmt(ours['mean_full_absorption'])}  SAEBench "
          f"{', '.join(_fmt(r['mean_full_absorption']) for r in e2e)}; split features fcsae "
          f"{ours['mean_num_split_features']:.2f} SAEBench " + ", ".join(f"{r['mean_num_split_features']:.2f}" for r in e2e))
    print(f"standardized probe (old fcsae convention): {_fmt(std['mean_absorption_fraction'])}; "
          f"letters with a latent {ours['letters_with_latent']}/{int(ours['n_letters_scored'])}, "
          f"meaningful {ours['meaningful']}, interval {_fmt(ours['mean_absorption_fraction_lo'])}-"
          f"{_fmt(ours['mean_absorption_fraction_hi'])}")
    print(f"time: fcsae {t_ours:.0f} s (load {load_ours}); SAEBench same-probe {same['seconds']:.0f} s, end to end "
          f"{', '.join(str(r['seconds']) for r in e2e)} s (probe reused: "
          f"{', '.join(str(r.get('probe_reused')) for r in e2e)}; load {'; '.join(r['load'] for r in e2e)})", flush=True)
    return res


FIXTURE_CFG = {"absorption_words": 0, "icl_examples": 3, "icl_prefixes": 4, "seed": 0, "batch_size": 4}
"""Eval settings of the test fixture (a tiny random llama, its ~440-word tokenizer, a random TopK SAE)."""


def write_fixture(path: Path, py: str, work: Path, timeout: int) -> int:
    """The same-probe fixture: fcsae's inputs (activations, probe, SAE) and SAEBench's scores of them.

    The SAE is a random TopK SAE (64 latents, k 8) whose first 26 latents are turned to the probe directions.

    SAEBench keeps every letter here (``min_probe_f1`` -1): a random model's
    probe passes few, and the fixture checks the scoring code, not the model.
    """
    from safetensors.torch import save_file

    from fcsae.config import EvalConfig, LMConfig, SAEConfig
    from fcsae.evals.absorption import prepare_absorption_cache
    from fcsae.lm import make_tiny_model
    from fcsae.saelens import export_saelens
    from fcsae.sae import SparseAutoencoder

    path = path.resolve()
    os.environ["FCSAE_HOME"] = str(work / "home")
    lm = make_tiny_model("llama", d_model=32, n_layers=2)
    lm.tokenizer.save_pretrained(str(work / "tiny"))
    lm_cfg, cfg = LMConfig(model="tiny", layer=1), EvalConfig(**FIXTURE_CFG)
    data = prepare_absorption_cache(lm_cfg, cfg, lm=lm, progress=False)
    norm_scale = float(32 ** 0.5 / data.acts_train_ND.norm(dim=1).mean())
    sae = SparseAutoencoder(SAEConfig(d_in=32, dict_size=64, k=8), seed=0)
    with torch.no_grad():  # 26 latents along the letters' probe directions, so each letter has a clear best latent
        rows = data.probe_W_LD / data.probe_W_LD.norm(dim=1, keepdim=True)
        sae.W_dec[:26] = rows
        sae.W_enc[:, :26] = rows.T
    sl_dir = export_saelens(sae, work / "saelens", "tiny", 1, norm_scale, None, lm.tokenizer.bos_token_id)
    tensors = {**replay_tensors(sae, data, norm_scale),
               **{f"sae.{k}": getattr(sae, k).detach().contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    job = {"mode": "replay", "seed": 0, "sae_dir": str(sl_dir), "model_dir": str(work / "tiny"), "model_name": "tiny",
           "layer": 1, "data": str(path.with_suffix(".safetensors")), "words_test": data.words_test,
           "words_train": data.words_train, "min_probe_f1": -1.0}
    out = run_worker(py, job, work, timeout)
    out.pop("seconds", None), out.pop("load", None)
    meta = {"produced_by": "benchmarks/saebench_agreement.py --fixture " + str(path), "eval": FIXTURE_CFG,
            "norm_scale": norm_scale, "sae": {"d_in": 32, "dict_size": 64, "k": 8, "seed": 0},
            "words_test": data.words_test, "words_train": data.words_train, "saebench": out}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=float) + "\n")
    print(f"fixture: {path.with_suffix('.json')} (+ .safetensors); SAEBench same-probe mean absorption "
          f"{out['mean_absorption_fraction']:.4f} over {out['n_letters_scored']} letters")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", action="append", default=None, help="fcsae SAE directory (repeatable; default: train one)")
    p.add_argument("--norm-scale", type=float, default=None, help="norm_scale when the SAE directory does not record it")
    p.add_argument("--words", type=int, default=2000, help="word budget, the same on both sides (default 2000)")
    p.add_argument("--seeds", type=int, default=3, help="SAEBench end-to-end seeds 0..S-1 (default 3; 0 = the same-probe comparison only)")
    p.add_argument("--venv", default=VENV, help=f"throwaway sae-bench venv (default {VENV})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=7200, help="seconds per SAEBench run")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--work", default=None, help="work directory (default: a fresh temp dir); SAEBench results "
                   "already in it are reused, so an interrupted run resumes")
    p.add_argument("--fixture", default=None, help="write the test fixture to this path instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    py = ensure_venv(args.venv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="saebench_agreement_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.fixture:
        return write_fixture(Path(args.fixture), py, work, args.timeout)
    from fcsae.lm import load_model

    saes = args.sae or [default_sae()]
    from fcsae.evals.report import resolve_target

    lm = load_model(resolve_target(saes[0], norm_scale=args.norm_scale).model)
    results = [compare_one(s, args, py, work, lm) for s in saes]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    first = results[0]
    if not first["saebench_e2e"]:
        print(f"saebench_agreement: same-probe ratio={first['ratio_same']:.2f} (--seeds 0: no end-to-end run)")
        return 0
    others = "; ".join(f"{r['tag']} {r['ratio_e2e']:.2f}" for r in results[1:])
    print(f"saebench_agreement: ratio={first['ratio_e2e']:.2f} (fcsae/SAEBench mean absorption fraction end to end, "
          f"{first['tag']}, |diff| {abs(first['diff_e2e']):.3f}, SAEBench spread {first['saebench_e2e_min']:.3f}-"
          f"{first['saebench_e2e_max']:.3f}{'; ' + others if others else ''}; "
          f"target 0.90-1.10, |diff| <= 0.02 or inside the spread: {'met' if first['agrees'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
