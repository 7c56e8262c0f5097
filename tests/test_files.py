"""fastattn/files.py: the small files a model folder holds and the text files a
user names are read without trusting what kind of file they are."""
import os
import threading

import pytest

from fastattn.errors import FastAttnError, ModelFileError
from fastattn.files import read_bytes, read_json, read_text


def test_regular_files_and_their_caps(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo")
    assert read_text(path) == "héllo"
    assert read_bytes(path, 6) == "héllo".encode()
    # a regular file past the cap is refused by its size, before any read:
    # a sparse gigabyte costs nothing here
    sparse = tmp_path / "big.json"
    with open(sparse, "wb") as f:
        f.truncate((1 << 30) + 1)
    with pytest.raises(ModelFileError, match=r"big.json: 1073741825 bytes, larger than "
                                             r"1073741824 bytes"):
        read_json(sparse)
    with pytest.raises(ModelFileError, match="not UTF-8 text"):
        path.write_bytes(b"ok \xff")
        read_text(path)
    with pytest.raises(ModelFileError, match="nested too deeply"):
        path.write_text("[" * 100000 + "]" * 100000)
        read_json(path)


def test_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        read_text(tmp_path)
    with pytest.raises(FastAttnError, match="not a regular file or a pipe"):
        read_text("/dev/zero", 100, error=FastAttnError, pipes=True)
    with pytest.raises(ModelFileError, match="cannot read: no such file"):
        read_text(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # model files: a FIFO is refused at once (no writer is waited for)
    with pytest.raises(ModelFileError, match="fifo: not a regular file$"):
        read_json(fifo)


def test_a_pipe_is_read_when_allowed_and_its_writer_may_come_late(tmp_path):
    """Like cat: the read waits for a writer that opens the pipe later, and
    stops at the cap for one that never stops."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_later(data, delay):
        def run():
            threading.Event().wait(delay)
            with open(fifo, "wb") as f:
                try:
                    f.write(data)
                except BrokenPipeError:      # the reader stopped at its cap
                    pass
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    writer = write_later(b"the prompt", 0.3)
    assert read_text(fifo, 100, error=FastAttnError, pipes=True) == "the prompt"
    writer.join(10)

    writer = write_later(b"x" * 5000, 0.0)
    with pytest.raises(FastAttnError, match="larger than 1000 bytes"):
        read_text(fifo, 1000, error=FastAttnError, pipes=True)
    writer.join(10)
    assert not writer.is_alive()
