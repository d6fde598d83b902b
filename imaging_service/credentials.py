"""Access keys: one account per key set, secrets encrypted at rest.

SigV4 needs the secret on the server, so it is kept, encrypted with Fernet
(AES-128-CBC + HMAC-SHA256) under a key file made at first start, mode 0600,
that only the service user reads.  A database dump alone gives no secret.
"""

import os
import secrets
import string
import time
from typing import NamedTuple

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import bindparam, select

from imaging_service.models import Account, Credential, utcnow

SECRET_SECONDS = 60  # how long a decrypted secret is kept in memory
MAX_KEPT = 10000
ACCESS_ALPHABET = string.ascii_uppercase + string.digits


class CredentialError(Exception):
    pass


class AccountRef(NamedTuple):
    """The account of a live key, as lookup() gives it."""
    id: str
    name: str | None
    is_operator: bool


def load_or_make_key(path):
    """The Fernet key in `path`, made (0600, written atomically) when absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise CredentialError(f"key file {path} is readable by others (mode {mode:o}): chmod 600 it")
    with open(path, "rb") as f:
        key = f.read().strip()
    if not key:
        raise CredentialError(f"key file {path} is empty")
    return key


class Credentials:
    def __init__(self, db, key_file):
        self.db = db
        self.key_file = key_file
        self._fernet = Fernet(load_or_make_key(key_file))
        self._secrets = {}  # access key: (stored token, decrypted secret, keep until)
        self._read = db.prepared(
            select(Credential.secret_encrypted, Credential.revoked_at, Account.id, Account.name,
                   Account.is_operator).join(Account, Credential.account_id == Account.id)
            .where(Credential.access_key == bindparam("access_key")))

    def create(self, account_id=None, name=None, operator=False):
        """A new key pair, in a new account unless account_id names an existing one.
        Returns (access_key, secret_key, account_id)."""
        access = "AKIA" + "".join(secrets.choice(ACCESS_ALPHABET) for _ in range(16))
        secret = secrets.token_urlsafe(30)[:40]
        with self.db.session(write=True) as s:
            if account_id is None:
                account_id = self._new_account_id(s)
                s.add(Account(id=account_id, name=name, is_operator=operator, created_at=utcnow()))
            elif s.get(Account, account_id) is None:
                raise CredentialError(f"no account {account_id}")
            s.add(Credential(access_key=access, account_id=account_id, created_at=utcnow(),
                             secret_encrypted=self._fernet.encrypt(secret.encode()).decode()))
        return access, secret, account_id

    @staticmethod
    def _new_account_id(s):
        while True:
            candidate = str(secrets.randbelow(9 * 10 ** 11) + 10 ** 11)
            if s.get(Account, candidate) is None:
                return candidate

    def list(self):
        """[(access_key, account_id, account name, operator, created_at, revoked_at)]"""
        with self.db.session() as s:
            rows = s.execute(select(Credential, Account).join(Account, Credential.account_id == Account.id)
                             .order_by(Credential.created_at))
            return [(c.access_key, a.id, a.name, a.is_operator, c.created_at, c.revoked_at) for c, a in rows]

    def revoke(self, access_key):
        with self.db.session(write=True) as s:
            cred = s.get(Credential, access_key)
            if cred is None:
                raise CredentialError(f"no access key {access_key}")
            if cred.revoked_at is None:
                cred.revoked_at = utcnow()
        self._secrets.pop(access_key, None)

    def lookup(self, access_key):
        """(secret, AccountRef) of a live access key, or None.

        Every call reads the key's row (one primary-key read, compiled once): a revocation,
        also by the `credentials revoke` command in another process, is seen by the very
        next request.  Only the decrypted secret is kept (SECRET_SECONDS, and only while the
        stored token is the same), so that Fernet does not run for every request."""
        row = next(iter(self._read(access_key=access_key)), None)
        if row is None or row[1] is not None:
            self._secrets.pop(access_key, None)
            return None
        token, _revoked, account_id, name, is_operator = row
        now = time.monotonic()
        kept = self._secrets.get(access_key)
        if kept is None or kept[0] != token or kept[2] < now:
            try:
                secret = self._fernet.decrypt(token.encode()).decode()
            except InvalidToken:
                raise CredentialError(f"the secret of {access_key} does not decrypt with {self.key_file}") from None
            if len(self._secrets) >= MAX_KEPT:
                self._secrets = {k: v for k, v in self._secrets.items() if v[2] >= now}
            kept = self._secrets[access_key] = (token, secret, now + SECRET_SECONDS)
        return kept[1], AccountRef(account_id, name, bool(is_operator))

    def identities(self):
        """[(access_key, secret_key, account_id, is_operator)] of the live keys (for the
        embedded object store's identity file)."""
        out = []
        with self.db.session() as s:
            rows = s.execute(select(Credential, Account).join(Account, Credential.account_id == Account.id)
                             .where(Credential.revoked_at.is_(None)))
            for cred, account in rows:
                secret = self._fernet.decrypt(cred.secret_encrypted.encode()).decode()
                out.append((cred.access_key, secret, account.id, account.is_operator))
        return out
