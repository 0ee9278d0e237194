"""CURVE key files and checks: writing key pairs, loading and validating keys, and when CURVE is required.

No sockets here: the transports apply the keys (``broker/transport.py``, ``worker/transport.py``); this module
turns paths and text into checked Z85 keys and refuses, with the fix, whatever would not work. Keys are the
ZeroMQ certificate files of ``zmq.auth``: ``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from fedctl.errors import ConfigError

log = logging.getLogger(__name__)
Z85_KEY_CHARS = 40
"""A CURVE key (32 bytes) in Z85 text."""
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RELOAD_EVERY_S = 1.0
"""An unknown worker key rereads the allowed-keys directory at most this often (keys added while serving)."""
WARN_AGAIN_S = 60.0
"""A refused key that keeps reconnecting is logged at WARNING at most this often."""
PLAINTEXT_FIX = ("create keys with `fedctl keygen` and pass --secret-key and --allowed-keys (see README, "
                 "'Secure setup across machines'), or pass --insecure to accept plaintext explicitly")


@dataclass(frozen=True)
class KeyPair:
    """One party's CURVE keys, Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)


def is_z85_key(text: str | bytes) -> bool:
    """True when ``text`` is a 40-character Z85 string that decodes to a 32-byte key."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if not _Z85.fullmatch(raw):
        return False
    try:
        return len(z85.decode(raw.encode("ascii"))) == 32
    except (ValueError, KeyError, OverflowError, struct.error):
        return False


def check_z85_key(text: str | bytes, what: str) -> bytes:
    """``text`` as a Z85 key (bytes); ConfigError naming ``what`` when it is not one."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    raw = raw.strip()
    if not is_z85_key(raw):
        shown = raw if len(raw) <= 60 else raw[:57] + "..."
        raise ConfigError(f"{what} {shown!r} is not a CURVE public key ({Z85_KEY_CHARS} Z85 characters)",
                          "pass the key printed by `fedctl keygen`, or the path of its NAME.key file")
    return raw.encode("ascii")


def check_key_name(name: str) -> str:
    """A key name usable as a file name: letters, digits, '.', '_' and '-', at most 64 characters."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r} is not a usable key name",
                          "use letters, digits, '.', '_' or '-' (e.g. --name broker or --name hospital-3)")
    return name


def key_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """The public and secret key files of ``name`` in ``out_dir``."""
    return out_dir / f"{name}.key", out_dir / f"{name}.key_secret"


def generate_key_pair(out_dir: Path, name: str, force: bool = False) -> tuple[Path, Path, bytes]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) in ``out_dir``; returns both paths and the
    public key. The files are made in a private temporary directory and moved in, so the secret key is never
    readable by others, not even for a moment; existing keys are replaced only with ``force``.
    """
    check_key_name(name)
    public_path, secret_path = key_paths(out_dir, name)
    existing = [p for p in (public_path, secret_path) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists",
                          "pass --force to replace the key pair (every peer holding the old public key then needs "
                          "the new one), or choose another --name or --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=".keygen-", dir=out_dir))
        try:
            made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            made_secret.chmod(0o600)
            made_public.chmod(0o644)
            os.replace(made_secret, secret_path)
            os.replace(made_public, public_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ConfigError(f"cannot write keys to {out_dir}: {exc.strerror or exc}",
                          "pass an --out directory you can write to") from None
    return public_path, secret_path, load_public_key_file(public_path, "the new key")


def _read_certificate(path: Path, option: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such key file",
                          "create a key pair with `fedctl keygen --out DIR --name NAME` and pass its path")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{option} {path}: cannot read a key from it ({reason})",
                          "pass a NAME.key / NAME.key_secret file written by `fedctl keygen`") from None
    return public, secret


def load_public_key_file(path: Path, option: str) -> bytes:
    """The Z85 public key in a ``NAME.key`` (or ``NAME.key_secret``) file."""
    public, _ = _read_certificate(path, option)
    return check_z85_key(public, f"{option} {path}: the public key")


def load_key_pair(path: Path, option: str = "--secret-key") -> KeyPair:
    """The key pair of a ``NAME.key_secret`` file, checked: both keys Z85, the public one derived from the secret."""
    public, secret = _read_certificate(path, option)
    if secret is None:
        raise ConfigError(f"{option} {path} holds only a public key",
                          f"pass the secret file written next to it ({path.name}_secret if made by fedctl keygen)")
    public = check_z85_key(public, f"{option} {path}: the public key")
    secret = check_z85_key(secret, f"{option} {path}: the secret key")
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{option} {path}: its public and secret keys do not belong together",
                          "the file is damaged or edited; create a new pair with `fedctl keygen`")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("%s (a secret key) is readable by other users; restrict it with: chmod 600 %s", path, path)
    return KeyPair(public, secret)


def resolve_public_key(value: str, option: str = "--server-key") -> bytes:
    """``value`` as a Z85 public key: the key itself (40 characters) or the path of a file holding it."""
    text = value.strip()
    if is_z85_key(text) and not Path(text).exists():
        return text.encode("ascii")
    path = Path(text).expanduser()
    if path.is_file():
        return load_public_key_file(path, option)
    raise ConfigError(f"{option} {value!r} is neither a {Z85_KEY_CHARS}-character Z85 public key nor a key file",
                      "pass the broker's public key as printed by `fedctl keygen` or `fedctl serve`, "
                      "or the path of its NAME.key file")


def load_allowed_keys(directory: Path, option: str = "--allowed-keys", require_some: bool = True) -> set[bytes]:
    """The Z85 public keys of the ``*.key`` files in ``directory``; at least one unless not ``require_some``."""
    if not directory.is_dir():
        raise ConfigError(f"{option} {directory}: no such directory",
                          "create it and copy each worker's NAME.key (from `fedctl keygen`) into it")
    keys = {load_public_key_file(path, option) for path in sorted(directory.glob("*.key"))}
    if not keys and require_some:
        raise ConfigError(f"{option} {directory} holds no worker public keys (*.key files)",
                          "copy each worker's NAME.key (from `fedctl keygen` on that worker) into it")
    return keys


class AllowedKeys:
    """The worker public keys a CURVE broker admits: the ``*.key`` files of one directory.

    Each check rereads the directory when the last read is :data:`RELOAD_EVERY_S` old (checks come once per
    connection handshake, so this is cheap): a key file copied in while the broker runs admits that worker on its
    next connection attempt, and a removed one refuses its next connection (connected workers stay connected).
    """

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._now = clock
        self.keys = load_allowed_keys(directory)
        self._loaded_at = self._now()

    def allows(self, key: bytes) -> bool:
        """True when the Z85 ``key`` is one of the allowed keys (rereading the directory if it is due)."""
        if self._now() - self._loaded_at >= RELOAD_EVERY_S:
            self._loaded_at = self._now()
            try:
                self.keys = load_allowed_keys(self.directory, require_some=False)  # all removed: admit nobody
            except ConfigError as err:  # a missing directory or a damaged file: keep the keys already loaded
                log.warning("could not reread the allowed worker keys: %s", err)
        return key in self.keys


def is_local_bind(endpoint: str) -> bool:
    """True for endpoints no other machine can reach: ipc, inproc and loopback tcp (127.x, ::1, localhost).

    ``tcp://*``, ``0.0.0.0``, ``::``, interface names, host names and every other address count as reachable.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    return is_loopback(endpoint[len("tcp://"):].rpartition(":")[0].strip("[]"))


def is_loopback(host: str) -> bool:
    """True for a host no other machine reaches: localhost, 127.x, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_security(bind: str, secret_key: Path | None, allowed_keys: Path | None, insecure: bool) -> None:
    """Apply the default policy of ``fedctl serve``: ConfigError when the options would not run as intended.

    CURVE needs both ``--secret-key`` and ``--allowed-keys``. It is required on endpoints other machines can reach
    (:func:`is_local_bind` false) unless ``--insecure`` accepts plaintext explicitly; local endpoints stay
    plaintext unless keys are given.
    """
    curve = secret_key is not None or allowed_keys is not None
    if curve and (secret_key is None or allowed_keys is None):
        missing = "--allowed-keys DIR" if allowed_keys is None else "--secret-key PATH"
        raise ConfigError(f"CURVE needs both --secret-key and --allowed-keys; {missing} is missing",
                          "pass the broker's NAME.key_secret and the directory of the workers' NAME.key files")
    if curve and insecure:
        raise ConfigError("--insecure contradicts --secret-key/--allowed-keys",
                          "drop --insecure to use CURVE, or drop the keys to serve plaintext")
    if not curve and not insecure and not is_local_bind(bind):
        raise ConfigError(f"refusing to serve {bind} unencrypted and unauthenticated: other machines can reach it",
                          PLAINTEXT_FIX)


def check_join_security(server_key: str | None, secret_key: Path | None) -> tuple[bytes, KeyPair] | None:
    """The broker's public key and this worker's key pair for CURVE, or None for plaintext (neither given)."""
    if server_key is None and secret_key is None:
        return None
    if server_key is None or secret_key is None:
        missing = "--server-key" if server_key is None else "--secret-key"
        raise ConfigError(f"CURVE needs both --server-key and --secret-key; {missing} is missing",
                          "pass the broker's public key (--server-key) and this worker's NAME.key_secret "
                          "(--secret-key), both from `fedctl keygen`")
    return resolve_public_key(server_key), load_key_pair(secret_key)
