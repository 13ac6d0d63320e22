"""Models for the runner: the built-in tiny Llama (pretrained on the base mixture on first
use and cached), a real pretrained model by name or a GGUF file (`pretrained`: converted
into the cache on first use), or any local Hugging Face causal-LM directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..store.atomic import install_dir, remove_stale, sha256_file, staging_dir
from ..tasks import BASE, builtin_task
from .batches import EncodedSet, sample_batches
from .pretrained import KNOWN, is_pretrained_spec, pretrained_dir
from .quiet import quiet_transformers
from .text import CHAR_TOKENIZER_FILE, CharTokenizer, Codec, HFCodec
from .train import TrainConfig, train_loop

# Bumped whenever the suite, the tokenizer or the pretraining recipe changes, so a stale
# cached base is never reused.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class BuiltinSpec:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 64
    pretrain_steps: int = 3000
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SIZES = {
    "tiny": BuiltinSpec(hidden=64, layers=2, heads=2, intermediate=128, pretrain_steps=300),
    "small": BuiltinSpec(),
    "medium": BuiltinSpec(hidden=192, layers=6, heads=6, intermediate=512, pretrain_steps=2000),
}


def default_cache_dir() -> Path:
    env = os.environ.get("TRACE_FT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "trace-ft"


def builtin_config(spec: BuiltinSpec, vocab_size: int):
    from transformers import LlamaConfig

    tok = CharTokenizer()
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


def pretrain_builtin(spec: BuiltinSpec, progress: bool | str = True) -> tuple[nn.Module, CharTokenizer]:
    """A fresh tiny Llama trained on the base mixture (`tasks.BASE`), deterministically.
    `progress`: show a bar (a string is its label)."""
    from transformers import LlamaForCausalLM

    quiet_transformers()
    tok = CharTokenizer()
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(builtin_config(spec, tok.vocab_size))
    base = builtin_task(BASE, seed=spec.seed, n_train=40000)
    cfg = TrainConfig(steps=spec.pretrain_steps, batch_size=spec.pretrain_batch,
                      lr=spec.pretrain_lr, weight_decay=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = sample_batches([EncodedSet(base.train, tok)], cfg.batch_size, cfg.steps, spec.seed)
    desc = progress if isinstance(progress, str) else "pretraining the built-in base"
    train_loop(model, opt, batches, cfg, desc=desc, progress=bool(progress))
    return model.eval(), tok


def _atomic_save(model: nn.Module, tok: CharTokenizer, spec: BuiltinSpec, target: Path) -> None:
    with staging_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save(tmp)
        (tmp / "builtin_spec.json").write_text(json.dumps(asdict(spec), indent=1))
        try:
            install_dir(tmp, target)
        except FileExistsError:  # a concurrent first use saved it first
            if not (target / "model.safetensors").exists():
                raise


def builtin_model(size: str | BuiltinSpec = "small", cache_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[nn.Module, Codec, Path]:
    """The built-in model: loaded from the cache, or pretrained and cached on first use.
    Returns (model, codec, directory)."""
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown built-in size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size] if isinstance(size, str) else size
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"builtin-{spec.key()}"
    if not (target / "model.safetensors").exists():
        label = f"pretraining the built-in base (first use only; cached in {cache})"
        model, tok = pretrain_builtin(spec, progress=label if progress else False)
        _atomic_save(model, tok, spec, target)
    model, codec = load_model(target)
    return model, codec, target


def model_dir(model: str | Path, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The Hugging Face directory behind `--model` other than "builtin": a known name
    (`pretrained.KNOWN`, e.g. smollm2-135m) or a GGUF file, fetched and converted into the
    cache on first use, or a directory as given."""
    if is_pretrained_spec(model):
        return pretrained_dir(model, Path(cache_dir) if cache_dir is not None else default_cache_dir(), progress)
    return Path(model)


def open_model(model: str | Path, *, size: str = "small", cache_dir: str | Path | None = None,
               dtype: str = "float32", device: str | torch.device = "cpu",
               progress: bool = True, chat: bool | None = None) -> tuple[nn.Module, Codec, Path]:
    """"builtin" (the built-in model of `size`, from the cache, pretrained in fp32), a known
    pretrained model's name (e.g. "smollm2-135m"), a ``.gguf`` file or a local Hugging Face
    model directory, in `dtype` on `device`. `chat`: frame tasks in the tokenizer's chat
    template (None: where it has one). Returns (model, codec, directory)."""
    if str(model) == "builtin":
        net, codec, path = builtin_model(size, cache_dir, progress=progress)
        return net.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype), codec, path
    path = model_dir(model, cache_dir, progress)
    net, codec = load_model(path, dtype, device, chat=chat)
    return net, codec, path


def load_model(path: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", chat: bool | None = None) -> tuple[nn.Module, Codec]:
    """A local Hugging Face causal-LM directory (AutoModelForCausalLM + AutoTokenizer, or
    the built-in character tokenizer when the directory holds one). `chat`: see `HFCodec`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = f" (known models by name: {', '.join(KNOWN)}; or a .gguf file)" if not path.exists() else ""
        raise ValueError(f"--model {path}: not a Hugging Face model directory (no config.json){hint}")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if (path / CHAR_TOKENIZER_FILE).is_file():
        codec: Codec = CharTokenizer.load(path)
    else:
        codec = HFCodec(AutoTokenizer.from_pretrained(path), chat=chat)
    return model.eval(), codec


def model_shapes(model: str | Path, size: str = "small") -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model directory (or the built-in model of `size`),
    from its config alone: nothing is loaded or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    quiet_transformers()
    if str(model) == "builtin":
        if size not in SIZES:
            raise ValueError(f"unknown built-in size {size!r}; choose from {sorted(SIZES)}")
        config, cls = builtin_config(SIZES[size], CharTokenizer().vocab_size), LlamaForCausalLM
    else:
        path = model_dir(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {path}: not a Hugging Face model directory (no config.json)")
        config, cls = AutoConfig.from_pretrained(path), AutoModelForCausalLM
    with torch.device("meta"):
        net = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)
    return {n: tuple(p.shape) for n, p in net.named_parameters()}


def save_model(model: nn.Module, codec: Codec, path: str | Path, overwrite: bool = False) -> None:
    """``save_pretrained`` (safetensors) plus the tokenizer, so `load_model` reads it back.
    Written to a staging directory and renamed into place: a crash or a full disk leaves
    either no `path` or the complete model (or, with `overwrite`, the old one)."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    with staging_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(codec, CharTokenizer):
            codec.save(tmp)
        elif isinstance(codec, HFCodec):
            codec.tok.save_pretrained(tmp)
        install_dir(tmp, path, overwrite=overwrite)


def weights_sha256(path: str | Path) -> str | None:
    """One digest of a model directory's safetensors files (None if it has none): which
    weights a history entry was trained from and produced."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()
