"""`trace-ft models`: every model known by name, its family, size, license, whether it has a
chat template, and whether it is in the cache (converted, its wheels fetched, or neither)."""

from __future__ import annotations

from pathlib import Path

from ..lm.model import default_cache_dir
from ..lm.pretrained import KNOWN, SOURCE_FILE


def cache_state(name: str, cache: Path) -> str:
    spec = KNOWN[name]
    if (cache / name / SOURCE_FILE).is_file():
        return f"converted ({cache / name})"
    have = sum((cache / "downloads" / w.filename).is_file() for w in spec.wheels)
    return f"{have} of {len(spec.wheels)} wheels fetched" if have else "not fetched"


def list_models(cache_dir: str | None = None) -> str:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lines = ["| name | family | parameters | license | chat template | cache |", "|---|---|---:|---|---|---|"]
    for name, spec in KNOWN.items():
        lines.append(f"| {name} | {spec.family} | {spec.params / 1e6:.1f}M | {spec.license} | "
                     f"{'yes' if spec.chat else 'no (plain framing)'} | {cache_state(name, cache)} |")
    lines += ["", "builtin: the built-in 0.45M-parameter Llama with a character tokenizer (pretrained here on "
              "first use). Any .gguf file or Hugging Face directory works too (--model PATH)."]
    return "\n".join(lines)


__all__ = ["list_models", "cache_state"]
