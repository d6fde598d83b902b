"""AES-128-CBC with PKCS#7 padding, streaming, as `openssl enc -aes-128-cbc -K -iv` does it.

An encrypted image is the bare ciphertext: no header, no salt.  It decrypts
with `openssl enc -d -aes-128-cbc -K KEY -iv IV`, and the EC2 bundle format
(imaging_elements.bundle.bundle) uses the same cipher for its parts.

The key file (IMG_CRYPT_KEY_FILE for the crypt-aes element) is text with one
`name=value` a line: `key=` 32 hex digits and `iv=` 32 hex digits; blank
lines, `#` comments and other names (such as the `salt=` line) are ignored, so
the output of `openssl enc -aes-128-cbc -P ...` is a valid key file.
`python3 -m imaging_elements.bundle.crypt genkey FILE` writes a random one (mode 0600).
"""

import os
import re
import secrets
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
CHUNK = 1024 * 1024


class CryptError(Exception):
    pass


class Encryptor:
    """AES-128-CBC encryption of a stream, written into one reused buffer."""

    def __init__(self, key, iv):
        self._cipher = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._buffer = bytearray(CHUNK + BLOCK)
        self._length = 0

    def update(self, data):
        """Ciphertext for `data`; a view of an internal buffer, valid until the next call."""
        if len(data) + BLOCK > len(self._buffer):
            self._buffer = bytearray(len(data) + BLOCK)
        return memoryview(self._buffer)[:self.update_into(data, self._buffer)]

    def update_into(self, data, out):
        """Writes the ciphertext for `data` into `out` (len(data) + BLOCK bytes at least); returns its length."""
        self._length += len(data)
        return self._cipher.update_into(data, out)

    def finalize(self):
        """The last block, with PKCS#7 padding (1 to 16 bytes, each the pad length)."""
        pad = BLOCK - self._length % BLOCK
        return self._cipher.update(bytes([pad]) * pad) + self._cipher.finalize()


class Decryptor:
    """AES-128-CBC decryption of a stream of known total length, into one reused buffer.

    Knowing where the ciphertext ends lets the padding be removed from the
    chunk that holds the last block, without holding any data back.
    """

    def __init__(self, key, iv, total):
        if total <= 0 or total % BLOCK:
            raise CryptError(f"the ciphertext is {total} bytes, not a positive multiple of "
                             f"{BLOCK}: it is truncated or not AES-CBC")
        self._cipher = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        self._buffer = bytearray(CHUNK + BLOCK)
        self._left = total

    def update(self, data):
        """Plaintext for `data`; a view of an internal buffer, valid until the next call."""
        if len(data) > self._left:
            raise CryptError("more ciphertext than expected")
        if len(data) + BLOCK > len(self._buffer):
            self._buffer = bytearray(len(data) + BLOCK)
        self._left -= len(data)
        plain = memoryview(self._buffer)[:self._cipher.update_into(data, self._buffer)]
        if self._left == 0:
            self._cipher.finalize()
            pad = plain[-1] if plain else 0
            if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
                raise CryptError("bad padding after decryption: wrong key or IV, or corrupt data")
            plain = plain[:-pad]
        return plain

    def finalize(self):
        if self._left:
            raise CryptError(f"the ciphertext ended {self._left} bytes early")


def parse_hex(text, what, length=BLOCK):
    """`length` bytes from exactly 2*length hex digits; the error names `what`."""
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{%d}" % (2 * length), text):
        raise CryptError(f"{what}: expected {2 * length} hex digits")
    return bytes.fromhex(text)


def read_key_file(path):
    """(key, iv) from a key file; see the module docstring for the format."""
    try:
        with open(path) as f:
            text = f.read(65536)
    except OSError as exc:
        raise CryptError(f"{path}: cannot read the key file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CryptError(f"{path}: the key file is not text") from exc
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        values[name.strip().lower()] = value
    missing = [name for name in ("key", "iv") if name not in values]
    if missing:
        raise CryptError(f"{path}: the key file has no {' and no '.join(m + '=' for m in missing)} line")
    # The error names the file and the field, never the value.
    return (parse_hex(values["key"], f"{path}: key="), parse_hex(values["iv"], f"{path}: iv="))


def write_key_file(path, key=None, iv=None):
    """Write a key file (random key and IV unless given); refuses to overwrite."""
    key = key or secrets.token_bytes(BLOCK)
    iv = iv or secrets.token_bytes(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# AES-128-CBC key for imaging-elements crypt-aes\nkey={key.hex()}\niv={iv.hex()}\n")
    return key, iv


def temp_path(path):
    """A fresh name beside `path`, for writing before the final rename."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")


def _transform(src, dst, make, progress, on_temp):
    """Stream `src` through the cipher that make(size) returns into `dst`, atomically.

    on_temp(path) is called with the temporary file's name before it exists,
    so that a hook can journal it.
    """
    try:
        source = open(src, "rb")
    except OSError as exc:
        raise CryptError(f"{src}: cannot open: {exc.strerror}") from exc
    with source:
        total = os.fstat(source.fileno()).st_size
        tmp = temp_path(dst)
        if on_temp:
            on_temp(tmp)
        try:
            cipher = make(total)
            with open(tmp, "xb") as out:
                buffer = bytearray(CHUNK)
                done = 0
                while True:
                    n = source.readinto(buffer)
                    if not n:
                        break
                    out.write(cipher.update(memoryview(buffer)[:n]))
                    done += n
                    if progress and (done % (64 * CHUNK) == 0 or done == total):
                        progress(done, total)
                out.write(cipher.finalize() or b"")
            os.replace(tmp, dst)
        except CryptError as exc:
            raise CryptError(f"{src}: {exc}") from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def encrypt_file(src, dst, key, iv, progress=None, on_temp=None):
    """Encrypt `src` into `dst` (written to a temporary name, renamed at the end)."""
    _transform(src, dst, lambda total: Encryptor(key, iv), progress, on_temp)


def decrypt_file(src, dst, key, iv, progress=None, on_temp=None):
    """Decrypt `src` into `dst`; a wrong key shows as bad padding (CryptError)."""
    _transform(src, dst, lambda total: Decryptor(key, iv, total), progress, on_temp)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "genkey":
        print("usage: python3 -m imaging_elements.bundle.crypt genkey FILE", file=sys.stderr)
        return 2
    try:
        write_key_file(argv[1])
    except OSError as exc:
        print(f"{argv[1]}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
