"""AES-128-CBC image encryption: byte-compatible with `openssl enc`, the crypt-aes hook, the runner."""

import os
import subprocess
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from imaging_elements.bundle import crypt
from imaging_elements.sdk.journal import Journal
from tests import base, hookcall, imagebuild

MiB = 1024 * 1024
HOOK = os.path.join(base.ROOT, "elements", "crypt-aes", "crypt.d", "50-crypt-aes")


def openssl_enc(*args, src, dst):
    subprocess.run(["openssl", "enc", *args, "-in", src, "-out", dst], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class CryptCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.key_file = self.path("disk.key")
        self.key, self.iv = crypt.write_key_file(self.key_file)
        self.hex = ["-K", self.key.hex(), "-iv", self.iv.hex()]

    def write(self, name, data):
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()


class TestOpensslCompatible(CryptCase):

    def test_both_directions_match_openssl(self):
        # Empty, exactly one block (a whole padding block follows), odd, several chunks.
        for size in (0, 16, 1000, 3 * MiB + 7):
            data = os.urandom(size)
            src = self.write("plain", data)
            crypt.encrypt_file(src, self.path("ours.enc"), self.key, self.iv)
            openssl_enc("-aes-128-cbc", *self.hex, src=src, dst=self.path("openssl.enc"))
            self.assertEqual(self.read("openssl.enc"), self.read("ours.enc"), size)
            self.assertEqual(size + 16 - size % 16, os.path.getsize(self.path("ours.enc")))
            crypt.decrypt_file(self.path("openssl.enc"), self.path("back"), self.key, self.iv)
            self.assertEqual(data, self.read("back"), size)

    def test_wrong_key_is_bad_padding_and_writes_nothing(self):
        src = self.write("plain", os.urandom(100000))
        crypt.encrypt_file(src, self.path("enc"), self.key, self.iv)
        # Under a wrong key the last block is noise, which passes as valid
        # padding about 1 time in 256 (then nothing can tell): take a wrong
        # key whose noise is not valid padding.
        last = self.read("enc")[-32:]
        for n in range(1, 256):
            wrong = bytes([self.key[0] ^ n]) + self.key[1:]
            decryptor = Cipher(algorithms.AES(wrong), modes.CBC(last[:16])).decryptor()
            pad = (decryptor.update(last[16:]) + decryptor.finalize())[-1]
            if not 1 <= pad <= 16:
                break
        error = self.assertRaises(crypt.CryptError, crypt.decrypt_file, self.path("enc"),
                                  self.path("out"), wrong, self.iv)
        self.assertEqual(f"{self.path('enc')}: bad padding after decryption: wrong key or IV, or corrupt data",
                         str(error))
        self.assertEqual(sorted(["disk.key", "plain", "enc"]), sorted(os.listdir(self.tmp)))

    def test_truncated_ciphertext(self):
        src = self.write("enc", os.urandom(1000))
        error = self.assertRaises(crypt.CryptError, crypt.decrypt_file, src, self.path("out"),
                                  self.key, self.iv)
        self.assertIn(f"{src}: the ciphertext is 1000 bytes, not a positive multiple of 16", str(error))
        self.assertFalse(os.path.exists(self.path("out")))


class TestKeyFile(CryptCase):

    def test_openssl_P_output_is_a_key_file(self):
        out = subprocess.run(["openssl", "enc", "-aes-128-cbc", "-P", "-pbkdf2", "-pass", "pass:x"],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        self.assertIn("salt=", out)
        path = self.path("openssl.key")
        with open(path, "w") as f:
            f.write(out)
        key, iv = crypt.read_key_file(path)
        values = dict(line.replace(" ", "").split("=") for line in out.splitlines())
        self.assertEqual((values["key"].lower(), values["iv"].lower()), (key.hex(), iv.hex()))

    def test_genkey_is_private_and_never_overwrites(self):
        self.assertEqual(0o600, os.stat(self.key_file).st_mode & 0o777)
        self.assertEqual((self.key, self.iv), crypt.read_key_file(self.key_file))
        result = subprocess.run([sys.executable, "-m", "imaging_elements.bundle.crypt", "genkey", self.key_file],
                                cwd=base.ROOT, stderr=subprocess.PIPE, text=True)
        self.assertEqual(1, result.returncode)
        self.assertIn("File exists", result.stderr)
        self.assertEqual((self.key, self.iv), crypt.read_key_file(self.key_file))

    def test_bad_key_files_name_the_file_and_field_not_the_value(self):
        path = self.path("bad.key")
        for text, message in (("key=" + "ab" * 16 + "\n", "the key file has no iv= line"),
                              ("key=secretsecret\niv=" + "00" * 16 + "\n", "key=: expected 32 hex digits"),
                              ("", "the key file has no key= and no iv= line")):
            with open(path, "w") as f:
                f.write(text)
            error = self.assertRaises(crypt.CryptError, crypt.read_key_file, path)
            self.assertEqual(f"{path}: {message}", str(error))
            self.assertNotIn("secretsecret", str(error))


class TestHook(CryptCase):
    """crypt-aes's hook, run directly with the documented environment."""

    def hook(self, verb="run", **env):
        """Run as a process runs it (tests/hookcall.py), its work directory self.path("work")."""
        if not hasattr(self, "state"):
            self.state = hookcall.state(self.path("work"), IMG_CRYPT_KEY_FILE=self.key_file)
        result = hookcall.completed(hookcall.hook(HOOK), dict(self.state, **env), verb)
        return result, result.status

    def test_accepts_one_side_none(self):
        for source, dest, code in (("none", "aes-128-cbc", 0), ("aes-128-cbc", "none", 0),
                                   ("none", "none", 1), ("aes-128-cbc", "aes-128-cbc", 1)):
            result, _ = self.hook("accepts", IMG_SOURCE_CRYPT=source, IMG_DEST_CRYPT=dest)
            self.assertEqual(code, result.returncode, (source, dest))

    def test_encrypt_then_decrypt(self):
        data = os.urandom(2 * MiB + 3)
        src = self.write("disk.raw", data)
        result, status = self.hook(IMG_IMAGE=src, IMG_SOURCE_CRYPT="none", IMG_DEST_CRYPT="aes-128-cbc",
                                   IMG_CONVERT_OUTPUT=self.path("disk.enc"))
        self.assertEqual(0, result.returncode, result.stderr)
        # IMG_CRYPT_KEY_FILE is secret-named: the runner shows its value as ***.
        self.assertIn({"describe": f"encrypted {src} with AES-128-CBC (key from ***)"}, status)
        openssl_enc("-d", "-aes-128-cbc", *self.hex, src=self.path("disk.enc"), dst=self.path("openssl.out"))
        self.assertEqual(data, self.read("openssl.out"))
        result, status = self.hook(IMG_IMAGE=self.path("disk.enc"), IMG_SOURCE_CRYPT="aes-128-cbc",
                                   IMG_DEST_CRYPT="none", IMG_CONVERT_OUTPUT=self.path("back.raw"))
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertEqual(data, self.read("back.raw"))
        self.assertEqual([], Journal(self.state["IMG_JOURNAL"]).unwind())
        self.assertNotIn(self.key.hex(), result.stdout + result.stderr)

    def test_failure_leaves_nothing(self):
        # Ciphertext whose plaintext ends in a zero byte: never valid padding.
        self.write("plain", os.urandom(4095) + b"\0")
        openssl_enc("-aes-128-cbc", "-nopad", *self.hex, src=self.path("plain"), dst=self.path("disk.enc"))
        src = self.path("disk.enc")
        os.mkdir(self.path("out"))
        result, status = self.hook(IMG_IMAGE=src, IMG_SOURCE_CRYPT="aes-128-cbc", IMG_DEST_CRYPT="none",
                                   IMG_CONVERT_OUTPUT=self.path("out", "disk.raw"))
        self.assertEqual(1, result.returncode)
        self.assertEqual({"fail": f"{src}: bad padding after decryption: wrong key or IV, or corrupt data"},
                         status[-1])
        self.assertEqual([], os.listdir(self.path("out")))

    def test_missing_key_file_parameter(self):
        result, status = self.hook(IMG_IMAGE=self.key_file, IMG_DEST_CRYPT="aes-128-cbc",
                                   IMG_CONVERT_OUTPUT=self.path("x"), IMG_CRYPT_KEY_FILE="")
        self.assertEqual(1, result.returncode)
        self.assertIn("needs IMG_CRYPT_KEY_FILE", status[-1]["fail"])


class TestProcess(CryptCase):
    """--output-crypt aes-128-cbc through euca-image-process, on a real ext4 image."""

    needs_root = True

    def test_output_crypt(self):
        image = imagebuild.make_fs(self.path("root.img"), imagebuild.linux_tree(self.path("tree")),
                                   size=16 * MiB, label="rootfs")
        self.run_bin("euca-image-process", "-i", image, "-o", self.path("root.enc"),
                     "--output-crypt", "aes-128-cbc", "-e", f"CRYPT_KEY_FILE={self.key_file}", "crypt-aes",
                     check=0)
        openssl_enc("-d", "-aes-128-cbc", *self.hex, src=self.path("root.enc"), dst=self.path("back.img"))
        with open(image, "rb") as f:
            self.assertEqual(f.read(), self.read("back.img"))
