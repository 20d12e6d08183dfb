"""Asset fetching, on a tiny real wheel (six 1.16.0, 11 kB) instead of the ~180 MB defaults."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saelib import assets
from saelib.assets import Asset, AssetError

SIX_PY_SHA256 = "4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3"


def six_asset(**changes) -> Asset:
    fields = {
        "name": "test-six",
        "package": "six",
        "version": "1.16.0",
        "member": "six.py",
        "sha256": SIX_PY_SHA256,
        "license": "MIT",
        "description": "six.py, a small file in a small wheel",
    }
    return Asset(**(fields | changes))


@pytest.fixture(scope="session")
def six_wheel(tmp_path_factory) -> Path:
    """The real wheel from PyPI; every test that needs the network depends on this fixture."""
    folder = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--quiet", "--dest", str(folder), "six==1.16.0",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("PyPI unreachable: `pip download six==1.16.0` timed out")
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        pytest.skip(f"PyPI unreachable: `pip download six==1.16.0` failed: {result.stderr[-300:]}")
    return wheels[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def register(monkeypatch):
    def add(asset: Asset) -> Asset:
        monkeypatch.setitem(assets.ASSETS, asset.name, asset)
        return asset

    return add


@pytest.fixture
def offline_download(monkeypatch, six_wheel):
    """Replace the pip download by a copy of the session's wheel; count the calls."""
    calls = []

    def copy_wheel(asset: Asset, into: Path) -> Path:
        calls.append(asset.name)
        return Path(shutil.copy(six_wheel, into))

    monkeypatch.setattr(assets, "_download_wheel", copy_wheel)
    return calls


def _files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_unknown_asset_name_raises_key_error(cache):
    with pytest.raises(KeyError, match="no-such-asset"):
        assets.fetch("no-such-asset")
    with pytest.raises(KeyError, match="no-such-asset"):
        assets.asset_path("no-such-asset")


def test_wrong_checksum_raises_and_writes_nothing(cache, register, six_wheel):
    register(six_asset(sha256="0" * 64))
    with pytest.raises(AssetError, match="expected 0000") as error:
        assets.fetch("test-six")
    assert SIX_PY_SHA256 in str(error.value)  # reports the actual checksum
    assert _files_under(cache) == []


def test_correct_checksum_fetches_once(cache, register, six_wheel, monkeypatch):
    register(six_asset())
    path = assets.fetch("test-six")
    assert path == assets.asset_path("test-six") == cache / "assets" / "test-six" / "six.py"
    assert assets.sha256_of(path) == SIX_PY_SHA256
    assert _files_under(cache) == [path]  # no wheel or temporary file left behind
    mtime = path.stat().st_mtime_ns

    def no_network(asset, into):
        raise AssertionError("a cached asset must not be downloaded again")

    monkeypatch.setattr(assets, "_download_wheel", no_network)
    assert assets.fetch("test-six") == path
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_cached_file_is_fetched_again(cache, register, offline_download):
    register(six_asset())
    target = assets.asset_path("test-six")
    target.parent.mkdir(parents=True)
    target.write_text("truncated")
    assert assets.fetch("test-six") == target
    assert assets.sha256_of(target) == SIX_PY_SHA256
    assert offline_download == ["test-six"]


def test_missing_member_raises(cache, register, offline_download):
    register(six_asset(member="six/not_there.py"))
    with pytest.raises(AssetError, match="six/not_there.py"):
        assets.fetch("test-six")
    assert _files_under(cache) == []


def test_nonexistent_version_raises(cache, register, six_wheel):
    register(six_asset(version="0.0.0.999"))
    with pytest.raises(AssetError, match="six==0.0.0.999") as error:
        assets.fetch("test-six")
    assert str(cache) in str(error.value)
    assert _files_under(cache) == []
