"""TLS for the listeners: server contexts built from certificate files, re-read on SIGHUP.

A listener keeps the ``ssl.SSLContext`` it was created with, so a reload loads the new chain into
that same live context (``load_cert_chain``): connections accepted afterwards present the new
certificate, established ones keep theirs. The new files are first loaded into a scratch context,
so a bad file (or a key that does not match) leaves the live context untouched.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from otad.errors import StartupError

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    name: str  # "MQTT", "HTTPS": for the log
    context: ssl.SSLContext
    certfile: Path
    keyfile: Path


def _new_context(certfile: Path, keyfile: Path, cafile: Path | None) -> ssl.SSLContext:
    # Not create_default_context(): for CLIENT_AUTH it trusts the system's CAs, and then any
    # publicly issued certificate whose CN happened to be a device name would log in as it.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        # Client certificates are required and verified against this CA only.
        context.load_verify_locations(cafile=cafile)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Certificates:
    """The server certificates of every TLS listener, for building their contexts and reloading them."""

    def __init__(self) -> None:
        self._loaded: list[_Loaded] = []

    def server_context(self, name: str, certfile: Path, keyfile: Path, cafile: Path | None = None) -> ssl.SSLContext:
        """A server context for ``name``'s listener; unreadable or mismatched files raise StartupError."""
        try:
            context = _new_context(certfile, keyfile, cafile)
        except (OSError, ssl.SSLError) as exc:
            files = f"{certfile}, {keyfile}" + (f", CA {cafile}" if cafile else "")
            raise StartupError(f"cannot load the {name} TLS certificate ({files}): {exc}") from None
        self._loaded.append(_Loaded(name, context, certfile, keyfile))
        return context

    def reload(self) -> int:
        """Re-read every certificate and key; returns how many were replaced. A failing one is
        logged and keeps serving its previous certificate."""
        replaced = 0
        for loaded in self._loaded:
            try:
                _new_context(loaded.certfile, loaded.keyfile, None)  # proves the pair before touching the live one
                loaded.context.load_cert_chain(loaded.certfile, loaded.keyfile)
            except (OSError, ssl.SSLError) as exc:
                log.error("reloading the %s TLS certificate %s failed, keeping the previous one: %s",
                          loaded.name, loaded.certfile, exc)
                continue
            replaced += 1
            log.info("reloaded the %s TLS certificate from %s", loaded.name, loaded.certfile)
        return replaced


def verified_common_name(peercert: dict | None) -> str | None:
    """The subject CN of a peer certificate as ``SSLObject.getpeercert()`` returns it (only
    verified certificates are returned there), or None."""
    if not peercert:
        return None
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else None  # several CNs: ambiguous, no identity
