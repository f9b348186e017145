"""The signing keys of signed commands (docs/signing.md): ECDSA P-256 keys as PEM files in one
directory, the only module that touches ``cryptography`` (the service signs through its ``Signer``
port, ``otad.service.signing``).

The directory (``signing.key_dir``, else ``<data_dir>/keys``) holds::

    <kid>.pem           a private key still valid for devices (PKCS#8 PEM, mode 0600)
    signing             the kid of the one that signs new messages (written by `otad key create`)
    retired/<kid>.pem   the public key of a retired key, kept for the record (its private key is deleted)

No database: several nodes can share the directory over one mount, and a key made by ``otad key
create`` next to a running daemon is picked up by it: the daemon's ``KeyRing.watch`` re-reads
``signing`` every ``signing.key_recheck`` seconds in a thread (a shared mount may be slow or hang,
so never on the event loop), and ``KeyRing.signing_key`` answers from memory. A key id is the first
16 hex digits of the SHA-256 of its public key's DER SubjectPublicKeyInfo, so anyone holding the
public key can work it out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from otad.errors import InvalidInput, NotFound, StartupError

log = logging.getLogger(__name__)

_KID = re.compile(r"[0-9a-f]{16}")
_SIGNING = "signing"
_RETIRED = "retired"


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The kid of ``public_key``: SHA-256 of its DER SubjectPublicKeyInfo, first 8 bytes in hex."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class KeyInfo:
    """One key as `otad key list` shows it."""

    kid: str
    status: str  # "signing", "valid" (devices still accept it) or "retired"
    created_at: datetime  # the key file's modification time
    public_key: ec.EllipticCurvePublicKey

    def public_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def point_hex(self) -> str:
        """The uncompressed point 04 || X || Y (65 bytes), as hex."""
        return self.public_key.public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint).hex()


class FileKey:
    """A loaded private key: what the service's ``Signer`` port hands out."""

    def __init__(self, kid: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.kid = kid
        self._private_key = private_key

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``message``: the DER signature."""
        return self._private_key.sign(message, ec.ECDSA(hashes.SHA256()))


class KeyRing:
    """The key directory: create, list, retire, and the current signing key."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._loaded: tuple[tuple[int, int, int], FileKey] | None = None  # (stat of `signing`, its key)
        self._refused: tuple[int, int, int] | None = None  # a `signing` that could not be read, warned about

    # --- the daemon's side: the Signer port ---

    def signing_key(self) -> FileKey:
        """The key that signs now, from memory: no file is touched once a key is loaded (``load``
        at start, then ``reload``/``watch``), so signing never waits on the key directory's disk.
        StartupError when there is none."""
        if self._loaded is not None:
            return self._loaded[1]
        return self.load()  # the first use only: the composition root loads it at start

    async def reload(self) -> FileKey:
        """Read the key directory again, in a thread (a shared mount can be slow or hang), and sign
        with the key `otad key create` made since, if any."""
        return await asyncio.to_thread(self.load)

    async def watch(self, interval: float) -> None:
        """Forever: ``reload`` every ``interval`` seconds; a failure is logged, the loaded key kept."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:
                log.exception("re-reading the signing keys in %s failed; still signing with the loaded one",
                              self.directory)

    def load(self) -> FileKey:
        """The signing key as the directory says now: one stat of ``signing``, the PEM read only
        when it changed. Blocking file I/O: on the event loop only at start (else ``reload``).
        StartupError when there is none and none was loaded before."""
        try:
            stat = (self.directory / _SIGNING).stat()
            marker = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            marker = None
        if self._loaded is not None and (marker is None or marker == self._loaded[0]):
            return self._loaded[1]  # a marker gone after start: keep signing with the key loaded
        if marker is None:
            raise StartupError(f"signing.enabled is true but {self.directory} holds no signing key: "
                               f"run `otad key create` (with the same --data-dir or --signing-key-dir)")
        try:
            key = self._load_signing()
        except StartupError:
            if self._loaded is None:
                raise
            if marker != self._refused:  # tried again at every re-read, said once
                self._refused = marker
                log.warning("the signing key in %s changed but cannot be read; still signing with %s",
                            self.directory, self._loaded[1].kid)
            return self._loaded[1]
        if self._loaded is not None and self._loaded[1].kid != key.kid:
            log.info("signing with key %s (was %s)", key.kid, self._loaded[1].kid)
        self._loaded = (marker, key)
        return key

    def _load_signing(self) -> FileKey:
        kid = self.current_kid()
        if kid is None:
            raise StartupError(f"{self.directory / _SIGNING} does not name a key: run `otad key create`")
        return FileKey(kid, self._private_key(kid))

    # --- the admin commands ---

    def create(self) -> KeyInfo:
        """A new key, which signs from now on; the earlier ones stay valid until retired."""
        self._prepare()
        private_key = ec.generate_private_key(ec.SECP256R1())
        kid = key_id(private_key.public_key())
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        self._write(self.directory / f"{kid}.pem", pem)
        self._write(self.directory / _SIGNING, f"{kid}\n".encode())  # last: a half-made key never signs
        return self.info(kid)

    def list(self) -> list[KeyInfo]:
        """Every key, oldest first: the valid ones (one of them signing), then the retired."""
        valid = [self.info(kid) for kid in self._kids(self.directory)]
        retired = [self.info(kid) for kid in self._kids(self.directory / _RETIRED)]
        return sorted(valid, key=lambda k: k.created_at) + sorted(retired, key=lambda k: k.created_at)

    def info(self, kid: str | None = None) -> KeyInfo:
        """The key ``kid`` (the signing key when None); NotFound when there is no such key."""
        if kid is None:
            kid = self.current_kid()
            if kid is None:
                raise NotFound(f"no signing key in {self.directory}: run `otad key create`")
        if not _KID.fullmatch(kid):
            raise InvalidInput(f"'{kid}' is not a key id (16 hex digits, as `otad key list` shows)")
        path = self.directory / f"{kid}.pem"
        if path.exists():
            public_key = self._private_key(kid).public_key()
            status = "signing" if kid == self.current_kid() else "valid"
        else:
            path = self.directory / _RETIRED / f"{kid}.pem"
            if not path.exists():
                raise NotFound(f"no key {kid} in {self.directory}")
            public_key = self._load(path, lambda data: serialization.load_pem_public_key(data))
            status = "retired"
        created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        return KeyInfo(kid, status, created, public_key)

    def retire(self, kid: str) -> KeyInfo:
        """Stop listing ``kid`` as valid and delete its private key (its public key is kept under
        retired/). The signing key cannot be retired: create its successor first."""
        key = self.info(kid)
        if key.status == "retired":
            raise InvalidInput(f"key {kid} is already retired")
        if key.status == "signing":
            raise InvalidInput(f"key {kid} is the signing key: run `otad key create` first, "
                               "then retire it once devices hold the new public key")
        (self.directory / _RETIRED).mkdir(mode=0o700, exist_ok=True)
        self._write(self.directory / _RETIRED / f"{kid}.pem", key.public_pem().encode(), mode=0o644)
        (self.directory / f"{kid}.pem").unlink()
        return self.info(kid)

    # --- files ---

    def current_kid(self) -> str | None:
        try:
            kid = (self.directory / _SIGNING).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StartupError(f"cannot read {self.directory / _SIGNING}: {exc.strerror or exc}") from None
        return kid if _KID.fullmatch(kid) and (self.directory / f"{kid}.pem").exists() else None

    def _private_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        key = self._load(self.directory / f"{kid}.pem",
                         lambda data: serialization.load_pem_private_key(data, password=None))
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise StartupError(f"{self.directory / kid}.pem is not an ECDSA P-256 key")
        return key

    @staticmethod
    def _load(path: Path, parse):
        try:
            return parse(path.read_bytes())
        except OSError as exc:
            raise StartupError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise StartupError(f"{path} is not a PEM key: {exc}") from None

    @staticmethod
    def _kids(directory: Path) -> list[str]:
        try:
            return [path.stem for path in directory.glob("*.pem") if _KID.fullmatch(path.stem)]
        except OSError:
            return []

    def _prepare(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create key directory {self.directory}: {exc.strerror or exc}") from None

    @staticmethod
    def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
        """Written whole or not at all (a temporary file renamed over it), readable by the owner only."""
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.write(handle, data)
                os.fsync(handle)
            finally:
                os.close(handle)
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise StartupError(f"cannot write {path}: {exc.strerror or exc}") from None


def c_source(key: KeyInfo) -> str:
    """The public key as C for firmware: the PEM as a NUL-terminated string (what
    mbedtls_pk_parse_public_key takes, with sizeof() as its length), the kid, and the raw point."""
    name = f"otad_key_{key.kid}"
    pem_lines = "\n".join(f'    "{line}\\n"' for line in key.public_pem().splitlines())
    point = bytes.fromhex(key.point_hex())
    point_lines = ",\n".join("    " + ", ".join(f"0x{byte:02x}" for byte in point[start:start + 13])
                             for start in range(0, len(point), 13))
    return (f"/* otad signing key {key.kid} (ECDSA P-256, SHA-256; docs/signing.md) */\n"
            f'static const char {name}_kid[] = "{key.kid}";\n'
            f"/* mbedtls_pk_parse_public_key(&pk, (const unsigned char *){name}_pem, sizeof({name}_pem)) */\n"
            f"static const char {name}_pem[] =\n{pem_lines};\n"
            f"/* the uncompressed point 04 || X || Y, for mbedtls_ecp_point_read_binary or micro-ecc */\n"
            f"static const unsigned char {name}_point[65] = {{\n{point_lines}\n}};\n")
