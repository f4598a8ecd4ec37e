"""Shared helpers for the eval tests: tiny stand-in SAEs and a small held-out text file."""

from __future__ import annotations

import random

import torch
from torch import nn

from fcsae.lm import TINY_WORDS


class DenseSAE(nn.Module):
    """A linear "SAE" with explicit weights: latents = relu?(x @ W_enc + b_enc), recon = latents @ W_dec + b_dec."""

    def __init__(self, W_enc_DF: torch.Tensor, W_dec_FD: torch.Tensor, relu: bool = False):
        super().__init__()
        self.W_enc = nn.Parameter(W_enc_DF.float().clone())
        self.W_dec = nn.Parameter(W_dec_FD.float().clone())
        self.b_enc = nn.Parameter(torch.zeros(W_enc_DF.shape[1]))
        self.b_dec = nn.Parameter(torch.zeros(W_dec_FD.shape[1]))
        self.relu = relu

    def encode(self, x_BD):
        pre = x_BD @ self.W_enc + self.b_enc
        return torch.relu(pre) if self.relu else pre

    def decode(self, latents_BF):
        return latents_BF @ self.W_dec + self.b_dec


def identity_sae(d: int) -> DenseSAE:
    """Reconstructs its input exactly (latents = the input itself)."""
    return DenseSAE(torch.eye(d), torch.eye(d))


def zero_sae(d: int) -> DenseSAE:
    """Always reconstructs 0."""
    return DenseSAE(torch.zeros(d, d), torch.zeros(d, d))


def write_text_corpus(path, n_paragraphs: int = 3000, seed: int = 0) -> str:
    """A local text file of random TINY_WORDS sentences, paragraphs separated by blank lines."""
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(20, 40))) + "." for _ in range(n_paragraphs)]
    path.write_text("\n\n".join(paras) + "\n")
    return str(path)
