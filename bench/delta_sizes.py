"""Delta patch sizes (issue 14): what otad's delta patches save on firmware-like images.

For each pair of images (two builds of a real binary found on this machine, and a synthetic
ESP32-like app image with a small code change, an inserted function and a changed string table)
it builds the patch the way otad does (otad.service.delta_build: detools, sequential, bsdiff) with
heatshrink (what esp_delta_ota applies) and, for comparison, lzma, zstd and no compression, and
prints the full size, the patch size, the ratio and the build time (median of --runs). The
reference beside it: the new image compressed whole with the same compressor (what a device that
can decompress but not patch would download).

    .venv/bin/python -m bench.delta_sizes [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
import random
import statistics
import struct
import tempfile
import time
from pathlib import Path

import detools
import heatshrink2

from otad.service import delta_build

_PYENV = Path.home() / ".pyenv" / "versions"
REAL_PAIRS = [  # (label, old, new): the same extension module from neighbouring Python releases
    ("_ssl.so, CPython 3.8.18 -> 3.9.18", _PYENV / "3.8.18/lib/python3.8/lib-dynload/_ssl.cpython-38-x86_64-linux-gnu.so",
     _PYENV / "3.9.18/lib/python3.9/lib-dynload/_ssl.cpython-39-x86_64-linux-gnu.so"),
    ("_ssl.so, CPython 3.12.1 -> 3.13.0", _PYENV / "3.12.1/lib/python3.12/lib-dynload/_ssl.cpython-312-x86_64-linux-gnu.so",
     _PYENV / "3.13.0/lib/python3.13/lib-dynload/_ssl.cpython-313-x86_64-linux-gnu.so"),
    ("_sqlite3.so, CPython 3.9.18 -> 3.10.13",
     _PYENV / "3.9.18/lib/python3.9/lib-dynload/_sqlite3.cpython-39-x86_64-linux-gnu.so",
     _PYENV / "3.10.13/lib/python3.10/lib-dynload/_sqlite3.cpython-310-x86_64-linux-gnu.so"),
]


def esp_like_pair(size: int = 1_500_000, seed: int = 14) -> tuple[bytes, bytes]:
    """An ESP32-like app image (image header, app descriptor, code of xtensa-looking words with
    call targets, a string table) and its next version: 60 patched words, a 2 KB function inserted
    a third of the way in (everything after it moves, and calls into it shift by 2 KB), a changed
    version string and string table."""
    rng = random.Random(seed)
    functions = [0x400D_0000 + rng.randrange(0, size, 4) for _ in range(2000)]
    words = []
    for _ in range(size // 8):
        kind = rng.random()
        if kind < 0.35:
            words.append(rng.choice(functions))  # a literal pool entry: a call target
        elif kind < 0.55:
            words.append(0)
        else:
            words.append(rng.getrandbits(24) | 0x0600_0000)  # opcode-looking
    strings = b"".join(f"E (%d) wifi: error {i}: %s\0".encode() for i in range(4000))

    def image(version: str, code_words: list[int], table: bytes) -> bytes:
        desc = struct.pack("<IIII", 0xABCD5432, 0, 0, 0) + version.encode().ljust(32, b"\0") + b"\0" * 208
        code = struct.pack(f"<{len(code_words)}I", *code_words)
        return bytes([0xE9, 4, 2, 0x20]) + b"\0" * 20 + struct.pack("<II", 0x3F400020, len(desc)) + desc + code + table

    old = image("1.9.2", words, strings)
    cut = len(words) // 3
    shifted = [w + 2048 if 0x400D_0000 + cut * 4 < w < 0x400D_0000 + size else w
               for w in words]
    for _ in range(60):
        shifted[rng.randrange(len(shifted))] ^= 0x100
    shifted[cut:cut] = [rng.getrandbits(32) for _ in range(512)]
    new_strings = strings.replace(b"wifi: error 12", b"wifi: fault 12").replace(b"error 3", b"err 3")
    return old, image("1.9.3", shifted, new_strings)


def whole(data: bytes, compression: str) -> int:
    if compression == "heatshrink":
        return len(heatshrink2.compress(data, window_sz2=delta_build.HEATSHRINK_WINDOW_SZ2,
                                        lookahead_sz2=delta_build.HEATSHRINK_LOOKAHEAD_SZ2))
    if compression == "lzma":
        return len(lzma.compress(data))
    if compression == "zstd":
        import zstandard
        return len(zstandard.ZstdCompressor(level=19).compress(data))
    return len(data)


def measure(old: bytes, new: bytes, compression: str, runs: int) -> tuple[int, float]:
    """(patch size, median seconds) of delta_build.build, which also checks the patch."""
    with tempfile.TemporaryDirectory() as work:
        paths = [os.path.join(work, name) for name in ("from", "to", "patch")]
        Path(paths[0]).write_bytes(old)
        Path(paths[1]).write_bytes(new)
        times, size = [], 0
        for _ in range(runs):
            start = time.perf_counter()
            size = delta_build.build(*paths, compression=compression)["size"]
            times.append(time.perf_counter() - start)
    return size, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    pairs = [(label, old.read_bytes(), new.read_bytes()) for label, old, new in REAL_PAIRS
             if old.is_file() and new.is_file()]
    pairs.append(("ESP32-like app image 1.9.2 -> 1.9.3 (synthetic)", *esp_like_pair()))
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}; {os.cpu_count()} CPUs; detools "
          f"{detools.__version__}; median of {args.runs}")
    print(f"{'pair':48} {'compression':11} {'new image':>10} {'patch':>9} {'patch/new':>9} "
          f"{'whole/new':>9} {'build s':>8}")
    for label, old, new in pairs:
        for compression in ("heatshrink", "lzma", "zstd", "none"):
            size, seconds = measure(old, new, compression, args.runs)
            print(f"{label:48} {compression:11} {len(new):>10} {size:>9} {size / len(new):>9.1%} "
                  f"{whole(new, compression) / len(new):>9.1%} {seconds:>8.2f}")
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
