"""Demo firmware images built from real binaries of the installed Python environment.

Each image is a deterministic tar (sorted entries, zero mtimes and owners) of installed packages,
the way a root filesystem image bundles libraries. Version 2 of a class upgrades the image the way
real releases do: most bytes stay, some packages are added, the os-release file changes. The
packages used are edgeswarm's own dependencies, so they exist wherever edgeswarm is installed.
"""

from __future__ import annotations

import importlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageRecipe:
    device_class: str
    packages: tuple[str, ...]


# Two device classes with different content: the kind of heterogeneity a real fleet has.
RECIPES: dict[str, dict[str, ImageRecipe]] = {
    "ipc-x86_64": {
        "1.0.0": ImageRecipe("ipc-x86_64", ("nacl", "paho", "bsdiff4", "rich")),
        "2.0.0": ImageRecipe("ipc-x86_64", ("nacl", "paho", "bsdiff4", "rich", "markdown_it", "typer")),
        "3.0.0": ImageRecipe("ipc-x86_64", ("nacl", "paho", "bsdiff4", "rich", "markdown_it", "typer", "mdurl")),
    },
    "gateway-armv7": {
        "1.0.0": ImageRecipe("gateway-armv7", ("pydantic_core", "packaging", "ipfshttpclient")),
        "2.0.0": ImageRecipe("gateway-armv7", ("pydantic_core", "packaging", "ipfshttpclient", "amqtt")),
        "3.0.0": ImageRecipe("gateway-armv7", ("pydantic_core", "packaging", "ipfshttpclient", "amqtt", "pydantic_settings")),
    },
}


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    return Path(module.__file__).parent


def build_image(device_class: str, version: str, out: Path) -> Path:
    recipe = RECIPES[device_class][version]
    files: list[tuple[str, Path]] = []
    for package in recipe.packages:
        base = _package_dir(package)
        for path in sorted(base.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append((f"usr/lib/{package}/{path.relative_to(base)}", path))
    os_release = f'NAME="edgeswarm demo"\nID=edgeswarm\nVERSION_ID="{version}"\nVARIANT_ID={device_class}\n'.encode()
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add_bytes(tar, "etc/os-release", os_release)
        for name, path in files:
            _add_bytes(tar, name, path.read_bytes())
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
