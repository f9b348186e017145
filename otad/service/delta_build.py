"""Building one delta patch with detools, the format Espressif's ``esp_delta_ota`` applies.

Run as ``python -m otad.service.delta_build FROM TO PATCH``: the CPU-heavy part happens in a process
of its own, which the daemon can kill (detools' C code holds the GIL, so a thread would stall the
event loop; and a build cut short by a shutdown must not run on). It prints one JSON line
``{"size", "md5", "sha256"}`` of the patch it wrote, after applying it to FROM and checking the
result is TO byte for byte: a patch that does not rebuild the image is never stored.

Also here: reading the version and ELF hash from an ESP-IDF application image's app descriptor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile

# What esp_delta_ota expects (it embeds detools' C library): a sequential bsdiff patch, heatshrink
# compressed with the window and lookahead detools' C code is built with statically (8 and 7
# bits; a patch with other values fails at its first byte with DETOOLS_HEATSHRINK_HEADER).
COMPRESSION = "heatshrink"
PATCH_TYPE = "sequential"
HEATSHRINK_WINDOW_SZ2 = 8
HEATSHRINK_LOOKAHEAD_SZ2 = 7

# ESP-IDF application image: a 24-byte image header (magic 0xE9), an 8-byte segment header, then
# the first segment starts with esp_app_desc_t (magic 0xABCD5432): version at 16 (32 bytes),
# app_elf_sha256 at 144 (32 bytes).
APP_HEAD = 256
_IMAGE_MAGIC = 0xE9
_DESC_AT = 32
_DESC_MAGIC = 0xABCD5432
_VERSION_AT, _VERSION_LEN = _DESC_AT + 16, 32
_ELF_AT, _ELF_LEN = _DESC_AT + 144, 32


def app_descriptor(head: bytes) -> tuple[str | None, str | None]:
    """(version, ELF sha256 hex) from the first 256 bytes of an ESP-IDF app image; (None, None)
    for anything else."""
    if len(head) < _ELF_AT + _ELF_LEN or head[0] != _IMAGE_MAGIC:
        return None, None
    if struct.unpack_from("<I", head, _DESC_AT)[0] != _DESC_MAGIC:
        return None, None
    raw = head[_VERSION_AT:_VERSION_AT + _VERSION_LEN].split(b"\0", 1)[0]
    try:
        version = raw.decode("ascii")
    except UnicodeDecodeError:
        version = ""
    printable = version if version.isprintable() else ""
    return printable or None, head[_ELF_AT:_ELF_AT + _ELF_LEN].hex()


def _digests(path: str) -> tuple[int, str, str]:
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return size, md5.hexdigest(), sha256.hexdigest()


def build(from_path: str, to_path: str, patch_path: str, compression: str = COMPRESSION) -> dict:
    """Write the patch from ``from_path`` to ``to_path`` at ``patch_path``, check that it rebuilds
    ``to_path``, and return its size and hashes."""
    import detools  # only the builder process loads it

    with open(from_path, "rb") as ffrom, open(to_path, "rb") as fto, open(patch_path, "wb") as fpatch:
        detools.create_patch(ffrom, fto, fpatch, compression=compression, patch_type=PATCH_TYPE,
                             heatshrink_window_sz2=HEATSHRINK_WINDOW_SZ2,
                             heatshrink_lookahead_sz2=HEATSHRINK_LOOKAHEAD_SZ2)
    fd, rebuilt = tempfile.mkstemp(dir=os.path.dirname(patch_path) or None, suffix=".rebuilt")
    os.close(fd)
    try:
        with open(from_path, "rb") as ffrom, open(patch_path, "rb") as fpatch, open(rebuilt, "wb") as fto:
            detools.apply_patch(ffrom, fpatch, fto)
        if _digests(rebuilt)[2] != _digests(to_path)[2]:
            raise RuntimeError("the patch does not rebuild the image")
    finally:
        os.unlink(rebuilt)
    size, md5, sha256 = _digests(patch_path)
    return {"size": size, "md5": md5, "sha256": sha256}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m otad.service.delta_build FROM TO PATCH", file=sys.stderr)
        return 2
    try:
        result = build(*argv)
    except Exception as exc:  # the parent reports it; one line, no traceback
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
