"""The run directory's key file (0600): the secret clients authenticate with, and the key of the client-IP
hash. Created by `cardq init` (or the first supervisor); never logged."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cardq.errors import Error, FileError

KEY_FILE = "cardq.key"


def ensure_run_dir(run_dir: Path) -> Path:
    """The run directory (0700) and its key file, made if missing; FileError (one line) when they cannot be."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise FileError(run_dir, "create the run directory (actors.run_dir)", e) from None
    key = run_dir / KEY_FILE
    if not key.exists():
        try:
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                key.unlink(missing_ok=True)  # never leave an empty or half-written key behind
            raise FileError(key, "write the key file", e) from None
    return key


def restore(run_dir: Path, secret: bytes) -> bool:
    """Put the run directory and its key file (the same secret: clients hold it) back if they are gone; returns
    whether anything was missing."""
    key = run_dir / KEY_FILE
    if key.exists():
        return False
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = run_dir / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, key)
    return True


def load_secret(run_dir: Path) -> bytes:
    key = run_dir / KEY_FILE
    try:
        st = key.stat()
        data = key.read_bytes().strip()
    except FileNotFoundError:
        raise Error(f"{key}: no key file; run `cardq init` (or start `cardq supervise`) first") from None
    except OSError as e:
        raise FileError(key, "read the key file", e) from None
    if st.st_mode & 0o077:
        raise Error(f"{key}: key file is readable by others (mode {st.st_mode & 0o777:o}); expected 0600")
    if len(data) < 32:
        raise Error(f"{key}: key file is too short; expected 64 hex characters")
    return data


def authkey(secret: bytes) -> bytes:
    return hashlib.sha256(b"cardq-auth:" + secret).digest()


def ip_hasher(secret: bytes):
    """client IP -> 16 hex characters of HMAC-SHA256 under a key derived from the secret (never the raw IP)."""
    key = hashlib.sha256(b"cardq-ip:" + secret).digest()

    def hash_ip(ip: str) -> str:
        return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:16]

    return hash_ip
