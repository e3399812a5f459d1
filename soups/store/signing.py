"""Signed, not tagged (docs/design.md#14): the owner's ed25519 key, the canonical manifest of a LoggedModel and its
signature, and the one check of it against the keys this user trusts.

A tag is writable by whoever can write to the tracking server, so a sha256 kept in a tag proves nothing against
that writer. Every checkpoint, init and soup LoggedModel (a registered soup is its own) therefore carries
`ich.signature`, an ed25519 signature over its manifest, and `ich.signed_by`, the signing key's id. The manifest
(`manifest`, pure) is sorted-key compact JSON of: a version, the model id, the sha256 of EVERY file of the model's
folder (relative posix paths) and the tags that give it meaning (every `ich.*` tag but UNSIGNED_TAGS: kind, sweep,
trial, epoch, the weights' sha256, fingerprints, architecture, recipe, ...; class names, image size and
preprocessing are in checkpoint.json, a signed file). So a rewritten file, a re-pinned tag, a replayed signature
(another model id) or an added file all fail `verify`.

Keys, all under this user's control:
    $ICH_SIGNING_KEY, else $ICH_HOME/keys/signing_key   the private key (PEM, 0600, folder 0700), made on first use
                                                         by whoever signs (a sweep, `ich soup`, `ich key show`);
                                                         a cluster ships it to every node (cluster.yaml file_mounts)
    $ICH_HOME/trusted_keys                               public keys trusted besides the own one, one per line
    --trust-key KEY|FILE                                 one more for this command (ich soup/report/predict/serve)
A public key is written as its raw 32 bytes in base64; its id is the first 16 hex digits of their sha256.
Verifying never makes a key: with none to trust the check refuses in one line saying how to make or import one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ich.errors import IchError
from ich.home import ich_home
from soups.store.tags import TAG_GC, TAG_GC_BYTES, TAG_GC_TIME, TAG_SIGNATURE, TAG_SIGNED_BY, TAG_SUPERSEDED_BY

MANIFEST_VERSION = 1
KEY_ENV = "ICH_SIGNING_KEY"
TRUSTED_FILE = "trusted_keys"
# A signature covers every `ich.*` tag of the model (kind, sweep, trial, epoch, the weights' sha256, fingerprints,
# architecture, recipe and its parameters, ...: soups/store/tags.py) but these, which the project sets after READY: the
# signature itself, a superseded record's pointer, `ich gc`'s marks. An `ich.*` tag added later breaks the check.
UNSIGNED_TAGS = frozenset({TAG_SIGNATURE, TAG_SIGNED_BY, TAG_SUPERSEDED_BY, TAG_GC, TAG_GC_BYTES, TAG_GC_TIME})
SIGNED_PREFIX = "ich."
HOW_TO_GET_A_KEY = ("make this machine's key with `ich key show` (the key that signs this ICH_HOME's sweeps), or "
                    "trust the sweep owner's public key with `ich key trust KEY` or --trust-key KEY")


class SignatureError(IchError):
    """A model whose signature does not verify against the trusted keys: one line naming the model and why. A soup
    skips such an ingredient (soups/pull.py, naming it); `ich predict`/`ich serve` refuse the model (exit 2)."""


class SigningKeyError(IchError):
    """No key to sign or to verify with, or a key file that cannot be used: one line saying how to fix it."""


# ---------------------------------------------------------------------------------------------- keys

def key_path() -> Path:
    """Where this process's signing key lives: $ICH_SIGNING_KEY, else $ICH_HOME/keys/signing_key."""
    given = os.environ.get(KEY_ENV, "").strip()
    return Path(given).expanduser().resolve() if given else ich_home() / "keys" / "signing_key"


def trusted_file() -> Path:
    return ich_home() / TRUSTED_FILE


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(public: Ed25519PublicKey) -> str:
    """The public key as a trusted_keys line: base64 of its raw bytes, then its id as a comment."""
    return f"{base64.b64encode(_raw(public)).decode('ascii')} ich-key-{key_id(public)}"


def parse_public(text: str, where: str) -> Ed25519PublicKey:
    """A public key from its base64 text (the first word of a trusted_keys line)."""
    word = text.strip().split()[0] if text.strip() else ""
    try:
        raw = base64.b64decode(word, validate=True)
        if len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"{where}: {word[:60]!r} is not an ed25519 public key (base64 of 32 bytes, as "
                              "`ich key show` prints it)") from None


def _read_private(path: Path) -> Ed25519PrivateKey:
    st = os.stat(path, follow_symlinks=False)  # FileNotFoundError: the caller makes the key or says how
    if not stat.S_ISREG(st.st_mode):
        raise SigningKeyError(f"{path}: the signing key is not a regular file")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SigningKeyError(f"{path}: the signing key must be this user's and private (mode "
                              f"{stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}); chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise SigningKeyError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an ed25519 key")
    return key


def own_key(path: Path | str | None = None, *, create: bool = True) -> Ed25519PrivateKey:
    """This user's signing key, made on first use (create=False: a missing key is a SigningKeyError). Several
    processes may race to make it: each writes its own temporary file (O_EXCL, 0600) and links it to the key's
    name; the loser of the link reads the winner's key."""
    path = Path(path) if path is not None else key_path()
    try:
        return _read_private(path)
    except FileNotFoundError:
        if not create:
            raise SigningKeyError(f"no signing key at {path}; {HOW_TO_GET_A_KEY} (a cluster ships it to every "
                                  "node: cluster.yaml file_mounts)") from None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_private(path)


def trusted_lines(text: str, where: str) -> list[Ed25519PublicKey]:
    """The public keys of a trusted_keys text: one per line, blank lines and # comments skipped."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            keys.append(parse_public(line, f"{where} line {n}"))
    return keys


def public_of(given: str, what: str = "--trust-key") -> Ed25519PublicKey:
    """--trust-key's value: a base64 public key, or a file holding one (the first key line of it)."""
    path = Path(given).expanduser()
    if path.is_file():
        keys = trusted_lines(path.read_text(encoding="utf-8", errors="replace"), str(path))
        if not keys:
            raise SigningKeyError(f"{what} {given}: the file holds no public key")
        return keys[0]
    return parse_public(given, f"{what} {given[:60]}")


_given: dict[str, Ed25519PublicKey] = {}  # --trust-key values of this command
_only: dict[str, Ed25519PublicKey] | None = None  # a Ray task: exactly the driver's trusted keys


def trust(keys: Iterable[str]) -> None:
    """Trust these public keys (--trust-key values: base64 or a file) for the rest of this process."""
    for given in keys or ():
        public = public_of(given)
        _given[key_id(public)] = public


def use_only(keys: Iterable[str] | None) -> None:
    """In a Ray task: trust exactly the driver's keys (public_texts of trusted_keys()); None: back to this
    process's own (the key file, trusted_keys, --trust-key)."""
    global _only
    _only = None if keys is None else {key_id(k): k for k in (parse_public(t, "trusted key") for t in keys)}


def trusted_keys() -> dict[str, Ed25519PublicKey]:
    """id -> public key of every key this process trusts: its own key's public half (never made here), the lines of
    $ICH_HOME/trusted_keys and --trust-key; in a Ray task, the driver's."""
    if _only is not None:
        return dict(_only)
    keys: dict[str, Ed25519PublicKey] = {}
    try:
        public = own_key(create=False).public_key()
        keys[key_id(public)] = public
    except SigningKeyError as e:
        if key_path().exists():  # a key that is there but unusable is said, not skipped
            raise SigningKeyError(str(e)) from None
    if (file := trusted_file()).is_file():
        for public in trusted_lines(file.read_text(encoding="utf-8", errors="replace"), str(file)):
            keys[key_id(public)] = public
    keys.update(_given)
    return keys


def trusted_texts() -> list[str]:
    """The trusted public keys as text, for a Ray task (use_only): public, so they may travel as arguments."""
    return [public_text(k) for k in trusted_keys().values()]


def add_trusted(given: str) -> tuple[str, bool]:
    """`ich key trust`: append the key to $ICH_HOME/trusted_keys (0600); (its id, whether it was new)."""
    public = public_of(given, "ich key trust")
    kid, file = key_id(public), trusted_file()
    known = trusted_lines(file.read_text(encoding="utf-8", errors="replace"), str(file)) if file.is_file() else []
    if any(key_id(k) == kid for k in known):
        return kid, False
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(public_text(public) + "\n")
    return kid, True


# ---------------------------------------------------------------------------------------------- the manifest

def signed_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if k.startswith(SIGNED_PREFIX) and k not in UNSIGNED_TAGS}


def manifest(model_id: str, tags: Mapping[str, str], files: Mapping[str, str]) -> bytes:
    """The bytes a signature covers (pure): sorted-key compact JSON of the version, the model id, the sha256 of
    every file (relative posix path -> hex) and the signed tags."""
    doc = {"version": MANIFEST_VERSION, "model_id": str(model_id), "files": dict(files), "tags": signed_tags(tags)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_hashes(folder: str | os.PathLike, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file under folder by relative posix path; `known` gives hashes the caller computed from
    the same bytes (a pull's one read of the weights), so no file is read twice. A symlink or a special file is
    a SignatureError (a model folder holds neither)."""
    folder, known = Path(folder), dict(known or {})
    hashes = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise SignatureError(f"{folder}: {rel} is a symlink or not a regular file; refusing")
            if path.is_file():
                hashes[rel] = known[rel] if rel in known else _sha256_file(path)
    return hashes


def sign(model_id: str, tags: Mapping[str, str], folder: str | os.PathLike, *,
         key: Ed25519PrivateKey | None = None, key_file: Path | str | None = None) -> dict[str, str]:
    """The signature tags of a model whose files are `folder` (what was uploaded) and whose tags are `tags`."""
    key = key or own_key(key_file, create=key_file is None)
    signature = key.sign(manifest(model_id, tags, folder_hashes(folder)))
    return {TAG_SIGNATURE: base64.b64encode(signature).decode("ascii"), TAG_SIGNED_BY: key_id(key.public_key())}


def verify(model_id: str, tags: Mapping[str, str], folder: str | os.PathLike, *, label: str | None = None,
           trusted: Mapping[str, Ed25519PublicKey] | None = None, known: Mapping[str, str] | None = None) -> str:
    """Check a downloaded model (its id, its LoggedModel's tags, its local folder) against the trusted keys;
    returns the signing key's id. SignatureError in one line naming the model and the reason; SigningKeyError
    when nothing is trusted at all."""
    label = label or f"model {model_id}"
    trusted = trusted_keys() if trusted is None else trusted
    if not trusted:
        raise SigningKeyError(f"{label}: no trusted signing key ({key_path()} does not exist and "
                              f"{trusted_file()} lists none); {HOW_TO_GET_A_KEY}")
    signature, signer = tags.get(TAG_SIGNATURE), tags.get(TAG_SIGNED_BY, "")
    if not signature:
        raise SignatureError(f"{label}: not signed (no {TAG_SIGNATURE} tag); refusing")
    public = trusted.get(signer)
    if public is None:
        raise SignatureError(f"{label}: signed by an untrusted key {str(signer)[:40]!r}; refusing (trust it with "
                             "`ich key trust KEY` or --trust-key KEY if it is the sweep owner's)")
    try:
        public.verify(base64.b64decode(signature, validate=True),
                      manifest(model_id, tags, folder_hashes(folder, known)))
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{label}: signature does not match its files or tags (signed by {signer}); "
                             "altered after signing, refusing") from None
    return signer
