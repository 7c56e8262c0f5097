"""Structured values from a fuzzer's bytes.

Every harness takes one `bytes` input, so that the same harness runs under
libFuzzer (atheris) and under the seeded pure-Python driver in run.py.  A
Provider reads that input front to back and turns it into the values a test
needs: integers in a range, a pick from a list, text, floats.  When the bytes
run out every read returns its smallest value, so any input, even b"", is a
valid program.

    p = Provider(data)
    n = p.int(1, 300)              # 1 <= n <= 300
    mode = p.choice(["a", "b"])
    text = p.text(64)
"""
import math
import struct

# Floats a parameter check has to survive: the ends of the double and float
# ranges, denormals, signed zeros, NaN and the infinities.
INTERESTING_FLOATS = [
    0.0, -0.0, 5e-324, 1e-310, 1e-300, 1.1754943508222875e-38, 1e-38, 1e-8, 1e-3,
    0.1, 0.5, 0.95, 0.99999999, 1.0, 1.0000001, 2.0, 10.0, 1e8, 3.4028234663852886e38,
    1e39, 1e300, 1.7976931348623157e308, -1.0, -1e-300, -1e300, math.nan, -math.nan,
    math.inf, -math.inf,
]

# Integers around every width a C or numpy field might have.
INTERESTING_INTS = [
    0, 1, -1, 2, -2, 3, 7, 8, 31, 32, 63, 64, 255, 256, 1023, 4096, 65535, 65536,
    2**31 - 1, 2**31, -2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
    -2**63, -2**63 - 1, 2**64 - 1, 2**64, 10**30, -10**30,
]


class Provider:
    """Reads typed values from a byte string; see the module docstring."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def raw(self, n: int) -> bytes:
        """Up to n bytes (fewer when the input runs out)."""
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, n_bytes: int) -> int:
        return int.from_bytes(self.raw(n_bytes).ljust(n_bytes, b"\0"), "little")

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        span = hi - lo
        if span <= 0:
            return lo
        n_bytes = max(1, (span.bit_length() + 7) // 8)
        return lo + self.uint(n_bytes) % (span + 1)

    def bool(self) -> bool:
        return bool(self.uint(1) & 1)

    def chance(self, numerator: int, denominator: int) -> bool:
        """True with probability about numerator / denominator."""
        return self.int(0, denominator - 1) < numerator

    def choice(self, options):
        options = list(options)
        return options[self.int(0, len(options) - 1)]

    def float(self) -> float:
        """A float: half the time an interesting one, else any double's bits."""
        if self.bool():
            return self.choice(INTERESTING_FLOATS)
        return struct.unpack("<d", self.raw(8).ljust(8, b"\0"))[0]

    def small_float(self, lo=-4.0, hi=4.0) -> float:
        """A finite float in [lo, hi], for logits and the like."""
        return lo + (hi - lo) * self.uint(2) / 65535.0

    def any_int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] most of the time, else an interesting one."""
        if self.chance(1, 4):
            return self.choice(INTERESTING_INTS)
        return self.int(lo, hi)

    def text(self, max_len: int, fragments=()) -> str:
        """A string of up to max_len pieces: given fragments, ASCII, spaces and
        digits, and code points from anywhere in Unicode (surrogates included)."""
        out = []
        for _ in range(self.int(0, max_len)):
            if self.remaining == 0:
                break
            kind = self.int(0, 9)
            if kind == 0 and fragments:
                out.append(self.choice(fragments))
            elif kind <= 3:
                out.append(chr(self.int(0x20, 0x7E)))
            elif kind == 4:
                out.append(self.choice([" ", "  ", "\n", "\t", "\r\n", "\u00a0",
                                        "\u3000", "\u2028", "\x00", "\x0b"]))
            elif kind == 5:
                out.append(self.choice("0123456789٣६") * self.int(1, 3))
            elif kind == 6:
                out.append(chr(self.int(0x80, 0x7FF)))
            elif kind == 7:
                out.append(chr(self.int(0x800, 0xFFFF)))          # surrogates too
            elif kind == 8:
                out.append(chr(self.int(0x10000, 0x10FFFF)))
            else:
                out.append(self.choice(["'s", "'ll", "'D", "é", "e\u0301", "😀",
                                        "\U0001F469\u200D\U0001F4BB", "ﬁ", "ǅ"]))
        return "".join(out)
