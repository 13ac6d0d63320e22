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


def fatbin_section(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name, _type, _flags, _addr, off, size, *_ in sections:
        end = data.index(b"\0", names_off + name)
        if data[names_off + name:end] == b".nv_fatbin":
            return data[off:off + size]
    raise ValueError(f"{path}: no .nv_fatbin section (no GPU code)")


def embedded_code(path: str | Path) -> list[str]:
    """E.g. ["sm_80", "sm_90", "ptx_90"], in the order stored."""
    blob = fatbin_section(path)
    out, off = [], 0
    while off + 16 <= len(blob):
        magic, _version, header, size = struct.unpack_from("<IHHQ", blob, off)
        if magic != FATBIN_MAGIC:
            break
        p, end = off + header, off + header + size
        while p < end:
            kind, _unk, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, p)
            arch, = struct.unpack_from("<I", blob, p + 28)
            out.append(f"{KIND.get(kind, 'kind%d' % kind)}_{arch}")
            p += entry_header + entry_size
        off = end
    return out


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(f, " ".join(embedded_code(f)))
