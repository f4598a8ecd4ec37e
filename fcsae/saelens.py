"""Export an fcsae SAE in SAELens 6's own directory format, so SAELens and SAEBench use it unchanged.

fcsae trains on normalised activations ``x * norm_scale`` with unit-norm
decoder rows. A SAELens user feeds raw activations, so the export folds the
scale into the weights, keeping the decoder rows unit-norm in the raw space:

    b_enc' = b_enc / s,  b_dec' = b_dec / s,  W_enc' = W_enc,  W_dec' = W_dec

Then ``relu/topk((x - b_dec') W_enc' + b_enc')`` = fcsae's codes of ``x * s``
divided by ``s`` (the same latents fire, in the same order), and
``codes' W_dec' + b_dec'`` is fcsae's reconstruction mapped back to raw
units. Unit decoder rows are what SAEBench's absorption projection
``code * cos(W_dec_i, probe)`` assumes; SAELens's own ``fold_activation_norm_
scaling_factor`` scales W_enc and W_dec instead, which keeps the codes but
makes that projection off by ``s``. ``metadata.fcsae_norm_scale`` records s.

Files: ``sae_weights.safetensors`` (W_enc [D, F], b_enc [F], W_dec [F, D],
b_dec [D], and ``threshold`` [F] for batchtopk/matryoshka) and ``cfg.json`` with SAELens 6's keys (``architecture`` ``topk``
or ``standard``, ``normalize_activations: none``, ``metadata`` with the model,
hook, context size and BOS handling). Written to temporary names and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json

SAELENS_VERSION = "6.54.12"
"""The SAELens release whose format this writes (checked by benchmarks/saebench_agreement.py)."""
ARCHITECTURES = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
"""fcsae activation -> SAELens architecture (batchtopk/matryoshka infer with their threshold: JumpReLU)."""


def saelens_tensors(sae, norm_scale: float) -> dict[str, torch.Tensor]:
    """The four weights in raw-activation space (see the module docstring)."""
    s = float(norm_scale)
    out = {"W_enc": sae.W_enc.detach().float().cpu().contiguous(),
           "b_enc": (sae.b_enc.detach().float().cpu() / s).contiguous(),
           "W_dec": sae.W_dec.detach().float().cpu().contiguous(),
           "b_dec": (sae.b_dec.detach().float().cpu() / s).contiguous()}
    if getattr(sae, "batch", False):  # inference threshold on pre-activations, which scale by 1/s too
        out["threshold"] = torch.full_like(out["b_enc"], float(sae.threshold.clamp_min(0)) / s)
    return out


def saelens_cfg(sae, model_name: str, layer: int, norm_scale: float, context_size: int | None,
                bos_token_id: int | None = None) -> dict[str, Any]:
    """``cfg.json`` in SAELens 6's layout (``TopKSAEConfig`` / ``StandardSAEConfig`` ``to_dict``)."""
    activation = sae.cfg.activation
    if activation not in ARCHITECTURES:
        raise FcsaeInputError(f"sae.activation: SAELens export supports {', '.join(ARCHITECTURES)}, got {activation!r}")
    cfg: dict[str, Any] = {
        "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.dict_size), "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "architecture": ARCHITECTURES[activation],
        "metadata": {
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": model_name, "hook_name": f"blocks.{int(layer)}.hook_resid_post", "hook_layer": int(layer),
            "context_size": context_size,
            # fcsae contexts start with BOS and its activations are left out of training and evals
            "prepend_bos": True, "exclude_special_tokens": [bos_token_id] if bos_token_id is not None else True,
            "fcsae_norm_scale": float(norm_scale),
            "fcsae_note": "weights in raw-activation units: codes = fcsae codes / fcsae_norm_scale; unit decoder rows",
        },
    }
    if activation == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    return cfg


def export_saelens(sae, out_dir: str | os.PathLike, model_name: str, layer: int, norm_scale: float,
                   context_size: int | None = None, bos_token_id: int | None = None) -> Path:
    """Write ``sae`` as a SAELens 6 directory under ``out_dir`` (each file atomically); returns the directory."""
    if not (norm_scale and float(norm_scale) > 0):
        raise FcsaeInputError(f"norm_scale: must be > 0, got {norm_scale!r}")
    cfg = saelens_cfg(sae, model_name, layer, norm_scale, context_size, bos_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "sae_weights.safetensors") as tmp:
        save_file(saelens_tensors(sae, norm_scale), str(tmp), metadata={"format": "pt"})
    write_json(out / "cfg.json", cfg)
    return out
