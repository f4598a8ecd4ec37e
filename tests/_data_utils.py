"""Helpers shared by the corpus and activation-cache tests: tiny texts and files, an isolated $FCSAE_HOME."""

from __future__ import annotations

import random
from pathlib import Path

from fcsae.lm import TINY_WORDS


def tiny_texts(n: int = 60, words: int = 40, seed: int = 0) -> list[str]:
    """``n`` deterministic pseudo-sentences made of the tiny tokenizer's single-token words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def write_text_file(path: Path, texts: list[str]) -> Path:
    """One paragraph per text, separated by blank lines (how ``corpus`` reads .txt files)."""
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path
