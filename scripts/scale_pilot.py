"""Scale pilot: at which width and token budget do SmolLM2 L8 SAEs get first-letter latents?

Trains plain TopK SAEs (``fcsae train``, criterion ``none``, seed 0) on one
activation cache at every (latents, tokens) point of ``--plan``, scores each
with ``fcsae eval`` (core metrics + the SAEBench-faithful absorption eval).
Each run (its SAE, ``train.json``, ``eval.json``, ``commands.txt``) goes to
``--runs``/DICT-TOKENS; the summary goes to ``--out``:

- ``pilot.json``: one row per point (EV, CE-loss score, dead fraction, L0,
  letters whose best single latent reaches k=1 sparse-probe F1 > 0.6,
  absorption with its bootstrap interval, wall times, epochs over the cache);
- ``pilot.md`` and ``pilot.png``: the table and the figure (letters with a
  latent and absorption vs training tokens, one line per width).

A finished point (its ``eval.json`` exists) is not run again, so an
interrupted pilot resumes where it stopped; ``fcsae train`` resumes a
half-trained run from its checkpoint.

    .venv/bin/python scripts/scale_pilot.py --plan 4096:1M,4096:3M,16384:1M --out docs/results/scale-pilot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from fcsae.io import write_json

FCSAE = os.path.relpath(Path(sys.executable).with_name("fcsae"))  # .venv/bin/fcsae: commands.txt reads as typed


def parse_count(text: str) -> int:
    """``'3M'`` -> 3,000,000, ``'500k'`` -> 500,000, ``'4096'`` -> 4096."""
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def parse_plan(text: str) -> list[tuple[int, int]]:
    """``'4096:1M,16384:3M'`` -> [(4096, 1_000_000), (16384, 3_000_000)]."""
    try:
        points = [tuple(parse_count(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) <= 0 for p in points):
        raise SystemExit(f"scale_pilot: --plan: expected comma-separated DICT:TOKENS such as 4096:1M,16384:3M, got {text!r}")
    return points


def largest_cache(model: str, layer: int) -> Path:
    """The largest complete activation cache of ``model`` at ``layer`` on the offline corpus (as ``fcsae train`` picks)."""
    from fcsae.activations import matching_caches
    from fcsae.config import HarvestConfig, LMConfig

    found = matching_caches(HarvestConfig(lm=LMConfig(model=model, layer=layer)))
    if not found:
        raise SystemExit(f"scale_pilot: no complete activation cache of {model} L{layer}; run `fcsae harvest` first")
    return found[0]


def run_point(runs: Path, cache: Path, dict_size: int, tokens: int, args) -> dict:
    """Train and evaluate one point (skipped when its eval.json exists); returns its row."""
    run = runs / f"{dict_size}-{tokens}"
    run.mkdir(parents=True, exist_ok=True)
    train = [FCSAE, "train", "--cache", str(cache), "--dict-size", str(dict_size), "--k", str(args.k),
             "--train-tokens", str(tokens), "--batch-size", str(args.batch_size), "--seed", "0",
             "--threads", str(args.threads), "--out", str(run), "--no-progress"]
    evaluate = [FCSAE, "eval", str(run / "sae"), "--absorption-words", str(args.words),
                "--core-tokens", str(args.core_tokens), "--out", str(run / "eval.json")]
    env = f"OMP_NUM_THREADS={args.threads} "
    (run / "commands.txt").write_text(env + " ".join(train) + "\n" + env + " ".join(evaluate) + "\n")
    times_file = run / "wall_seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    if not (run / "eval.json").is_file():
        for name, cmd in (("train", train), ("eval", evaluate)):
            if name == "train" and (run / "sae" / "cfg.json").is_file() and "train" in times:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
            t0 = time.time()
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            with open(run / f"{name}.log", "a") as log:
                subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
            times[name] = round(time.time() - t0, 1)
            times_file.write_text(json.dumps(times))
    return row_of(run, cache, dict_size, tokens, times)


def row_of(run: Path, cache: Path, dict_size: int, tokens: int, times: dict) -> dict:
    """The pilot row of one finished point, from its train.json and eval.json."""
    ev = json.loads((run / "eval.json").read_text())
    tr = json.loads((run / "train.json").read_text())
    core, ab = ev.get("core", {}), ev.get("absorption", {}).get("summary", {})
    n_cache = json.loads((cache / "manifest.json").read_text())["n_tokens"]
    return {
        "dict_size": dict_size, "train_tokens": tokens, "epochs": round(tokens / n_cache, 2),
        "explained_variance": core.get("explained_variance"), "ce_loss_score": core.get("ce_loss_score"),
        "l0": core.get("l0"), "dead_frac": core.get("frac_dead"), "train_fvu": tr["metrics"].get("fvu"),
        "letters_with_latent": ab.get("letters_with_latent"), "n_letters": ab.get("n_letters"),
        "meaningful": ab.get("meaningful"),
        "absorption": ab.get("mean_absorption_fraction"),
        "absorption_lo": ab.get("mean_absorption_fraction_lo"), "absorption_hi": ab.get("mean_absorption_fraction_hi"),
        "full_absorption": ab.get("mean_full_absorption"),
        "train_s": times.get("train"), "eval_s": times.get("eval"), "run": str(run),
    }


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write_table(rows: list[dict], path: Path, cache: Path, args) -> None:
    """pilot.md: one line per point."""
    lines = [f"Cache `{cache.name}` ({json.loads((cache / 'manifest.json').read_text())['n_tokens']:,} tokens); "
             f"TopK k={args.k}, batch {args.batch_size}, seed 0; eval: {args.words} words, {args.core_tokens} core tokens.",
             "", "| latents | train tokens | epochs | EV | CE score | L0 | dead | letters with a latent | absorption [95% interval] "
             "| full absorption | meaningful | train s | eval s |", "|" + "---|" * 13]
    for r in rows:
        interval = f"{fmt(r['absorption'])} [{fmt(r['absorption_lo'])}, {fmt(r['absorption_hi'])}]"
        lines.append(f"| {r['dict_size']:,} | {r['train_tokens']:,} | {r['epochs']} | {fmt(r['explained_variance'])} "
                     f"| {fmt(r['ce_loss_score'])} | {fmt(r['l0'], '.1f')} | {fmt(r['dead_frac'])} "
                     f"| {fmt(r['letters_with_latent'], '.0f')} of {fmt(r['n_letters'], '.0f')} | {interval} "
                     f"| {fmt(r['full_absorption'])} | {r['meaningful']} | {fmt(r['train_s'], '.0f')} | {fmt(r['eval_s'], '.0f')} |")
    path.write_text("\n".join(lines) + "\n")


def write_figure(rows: list[dict], path: Path) -> None:
    """pilot.png: letters with a latent, and absorption with its interval, vs training tokens, per width."""
    from fcsae.plotting import new_figure, save_png

    fig, (ax1, ax2) = new_figure(ncols=2, width=5.2, height=4.0)
    for i, d in enumerate(sorted({r["dict_size"] for r in rows})):
        pts = sorted((r for r in rows if r["dict_size"] == d), key=lambda r: r["train_tokens"])
        x = [r["train_tokens"] for r in pts]
        ax1.plot(x, [r["letters_with_latent"] for r in pts], marker="os^"[i % 3], label=f"{d:,} latents")
        y = [r["absorption"] for r in pts]
        err = [[r["absorption"] - r["absorption_lo"] for r in pts], [r["absorption_hi"] - r["absorption"] for r in pts]]
        ax2.errorbar(x, y, yerr=err, marker="os^"[i % 3], capsize=3, label=f"{d:,} latents")
    n_letters = max((r["n_letters"] or 0) for r in rows)
    ax1.axhline(n_letters / 2, color="grey", lw=0.8, ls="--", label=f"half of the {n_letters:.0f} scored letters")
    ax1.set(xscale="log", xlabel="training tokens", ylabel="letters with a latent (k=1 F1 > 0.6)", ylim=(-0.5, n_letters + 1),
            title="First-letter latents")
    ax2.set(xscale="log", xlabel="training tokens", ylabel="mean absorption fraction (95% bootstrap)", ylim=(0, None),
            title="SAEBench-faithful absorption")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ticks = sorted({r["train_tokens"] for r in rows})
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        # Label the budgets that were run (log-scale minor labels collide, e.g. 3e5 and 4e5).
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="4096:1M,4096:3M,4096:10M,16384:1M,16384:3M",
                    help="comma-separated DICT:TOKENS points, run in this order (default %(default)s)")
    ap.add_argument("--out", default="docs/results/scale-pilot", help="output directory (default %(default)s)")
    ap.add_argument("--runs", default=None, help="where the runs go (default $FCSAE_HOME/runs/scale-pilot)")
    ap.add_argument("--cache", default=None, help="activation cache (default: the largest complete smollm2-135m L8 cache)")
    ap.add_argument("--k", type=int, default=32, help="TopK k (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4096, help="training batch (default %(default)s)")
    ap.add_argument("--words", type=int, default=4000, help="absorption eval word budget (default %(default)s)")
    ap.add_argument("--core-tokens", type=int, default=4096, help="core eval held-out tokens (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="points run at once (default %(default)s; on 2 cores, --jobs 2 --threads 1 wastes less than "
                    "one 2-thread job: see docs/training.md on threads)")
    args = ap.parse_args()
    plan = parse_plan(args.plan)
    cache = Path(args.cache) if args.cache else largest_cache("smollm2-135m", 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fcsae.paths import fcsae_home

    runs = Path(args.runs) if args.runs else fcsae_home() / "runs" / "scale-pilot"
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_point, runs, cache, d, n, args) for d, n in plan]
        for fut in as_completed(futures):
            row = fut.result()
            rows = sorted([*rows, row], key=lambda r: (r["dict_size"], r["train_tokens"]))
            write_json(out / "pilot.json", rows)
            write_table(rows, out / "pilot.md", cache, args)
            write_figure(rows, out / "pilot.png")
            print(f"[{time.strftime('%H:%M:%S')}] {row['dict_size']}-{row['train_tokens']}: letters with a latent "
                  f"{row['letters_with_latent']}, absorption {fmt(row['absorption'])}", flush=True)
    print((out / "pilot.md").read_text())


if __name__ == "__main__":
    main()
