"""List the GPU code embedded in a CUDA extension: real machine code (sm_XX) and PTX.

Reads the ELF section .nv_fatbin of a shared object and walks its fatbin entries, so the
check needs neither a GPU nor cuobjdump.

    python tools/cuda_archs.py trace_kernels/_cuda*.so
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND = {1: "ptx", 2: "sm"}


def _sections(data: bytes, path) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a 64-bit little-endian ELF file's sections."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, off, size, *_ in sections:
        end = data.index(b"\0", names_off + name)
        out[data[names_off + name:end].decode()] = (off, size)
    return out


def fatbin_section(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    found = _sections(data, path).get(".nv_fatbin")
    if found is None:
        raise ValueError(f"{path}: no .nv_fatbin section (no GPU code)")
    off, size = found
    return data[off:off + size]


def needed_libraries(path: str | Path) -> list[str]:
    """The shared libraries the ELF file names as DT_NEEDED (what the loader must find)."""
    data = Path(path).read_bytes()
    sec = _sections(data, path)
    (dyn, dyn_size), (strs, _) = sec[".dynamic"], sec[".dynstr"]
    out = []
    for off in range(dyn, dyn + dyn_size, 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            out.append(data[strs + val:data.index(b"\0", strs + val)].decode())
    return out


def fatbin_entries(path: str | Path) -> list[dict]:
    """Each embedded code object: kind ("sm" machine code or "ptx"), arch (e.g. 90) and,
    for PTX, the PTX ISA version (major, minor), in the order stored."""
    blob = fatbin_section(path)
    out, off = [], 0
    while off + 16 <= len(blob):
        magic, _version, header, size = struct.unpack_from("<IHHQ", blob, off)
        if magic != FATBIN_MAGIC:
            break
        p, end = off + header, off + header + size
        while p < end:
            kind, _unk, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, p)
            minor, major, arch = struct.unpack_from("<HHI", blob, p + 24)
            entry = {"kind": KIND.get(kind, f"kind{kind}"), "arch": arch}
            if entry["kind"] == "ptx":
                entry["ptx_version"] = (major, minor)
            out.append(entry)
            p += entry_header + entry_size
        off = end
    return out


def embedded_code(path: str | Path) -> list[str]:
    """E.g. ["sm_80", "sm_90", "ptx_90"], in the order stored."""
    return [f"{e['kind']}_{e['arch']}" for e in fatbin_entries(path)]


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(f, " ".join(embedded_code(f)))
