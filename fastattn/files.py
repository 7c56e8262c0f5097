"""Reading the small files a model folder holds (JSON, text, templates) and the
text files a user names, without trusting them.

A path in a model folder may name a FIFO or a device.  open() on a FIFO waits
for a writer and a read of /dev/zero never ends, so every file is opened
without blocking, checked with fstat on the open descriptor (no window
between the check and the open), and read up to a size limit.
"""
import json
import os
import stat

from .errors import ModelFileError

# Caps on what one file may hold.  The largest tokenizer.json files in use are
# tens of megabytes; anything far beyond that is not a model's metadata.
JSON_LIMIT = 1 << 30
TEXT_LIMIT = 1 << 30


def open_regular(path, error=ModelFileError, pipes=False):
    """path opened for binary reading; `error` unless it is a regular file
    (or, with pipes=True, a FIFO or pipe, which is read like one)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: cannot read: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (pipes and stat.S_ISFIFO(mode))):
            if stat.S_ISDIR(mode):
                raise error(f"{path}: is a directory")
            raise error(f"{path}: not a regular file" + (" or a pipe" if pipes else ""))
        if stat.S_ISFIFO(mode):
            # opened without blocking, a pipe with no writer yet reads as
            # empty; open it again and wait for the writer, as cat does
            fd, first = -1, fd
            os.close(first)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise error(f"{path}: cannot read: {e.strerror or e}") from None
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise error(f"{path}: changed while being opened")
        else:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def read_bytes(path, limit, error=ModelFileError, pipes=False):
    """The file's bytes; `error` if it holds more than limit."""
    with open_regular(path, error, pipes) as f:
        size = os.fstat(f.fileno()).st_size
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode) and size > limit:
            raise error(f"{path}: {size} bytes, larger than {limit} bytes, more than a "
                        f"file of this kind may hold")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read: {e.strerror or e}") from None
        except MemoryError:
            raise error(f"{path}: too large to read into memory") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit} bytes, more than a file of this "
                    f"kind may hold")
    return data


def read_text(path, limit=TEXT_LIMIT, error=ModelFileError, pipes=False):
    """The file as UTF-8 text; `error` naming the first bad byte if it is not."""
    data = read_bytes(path, limit, error, pipes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None


def read_json(path, limit=JSON_LIMIT):
    """The file's JSON value; ModelFileError if it is not valid JSON."""
    data = read_bytes(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{os.fspath(path)}: not valid JSON: {e}") from None
    except RecursionError:
        raise ModelFileError(f"{os.fspath(path)}: not valid JSON: nested too deeply") \
            from None


def read_json_object(path, limit=JSON_LIMIT):
    """read_json, and the value must be an object (a dict)."""
    value = read_json(path, limit)
    if not isinstance(value, dict):
        raise ModelFileError(f"{os.fspath(path)}: holds a JSON {type(value).__name__}, "
                             f"not an object")
    return value
