"""The queue page in a real browser: Debian's chromium and chromedriver driven by Selenium,
headless, against `imaging-service serve` with its embedded store and workers.  Imports are
submitted with the `imaging` command.  Screenshots go to $IMG_TEST_ARTIFACTS (or a
directory printed in the test's output)."""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from tests.service import fixtures as sf
from tests.service.test_pipeline import PipelineTest

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
STEP_HOOK = "#!/bin/bash\n# a validator that takes a few seconds: progress can be watched\nsleep 8\n"


def artifacts_dir(name):
    root = os.environ.get("IMG_TEST_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "imaging-test-artifacts")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


class WebTest(PipelineTest):

    def setUp(self):
        super().setUp()
        for path in (CHROMEDRIVER, CHROMIUM):
            if not os.access(path, os.X_OK):
                self.skipTest(f"{path} is missing (Debian packages chromium, chromium-driver)")
        self.shots = artifacts_dir("test_web")
        print(f"screenshots: {self.shots}", file=sys.stderr)

    def browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tempfile.mkdtemp(prefix="chromium-", dir=self.tmp)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}", "--window-size=1280,900"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
        self.addCleanup(shutil.rmtree, profile, True)
        self.addCleanup(driver.quit)
        driver.implicitly_wait(0)
        return driver

    def shot(self, driver, name):
        # The whole page, not only the window.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, max(900, min(height + 40, 4000)))
        driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))

    def until(self, what, predicate, timeout=60, driver=None):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                page = driver.page_source[-3000:] if driver is not None else ""
                raise AssertionError(f"timed out waiting for {what}\n{page}\n{self.service.log()[-3000:]}")
            time.sleep(0.2)

    def user_keys(self):
        """A new account's (access, secret, account, bucket); the bucket made with its keys
        (which also waits until the embedded store knows them)."""
        from imaging_service.objectstore import ObjectStore, ObjectStoreError
        access, secret, account = self.service.credential()
        store = ObjectStore(f"http://127.0.0.1:{self.s3_port}", "us-east-1", access, secret)
        bucket = f"{account}-web"  # the embedded store: an account's buckets start with its id
        self.until("the store to know the keys", lambda: _ok(store.ensure_bucket, bucket, ObjectStoreError),
                   timeout=30)
        return access, secret, account, bucket

    def sign_in(self, driver, access, secret):
        from selenium.webdriver.common.by import By
        driver.get(self.service.url + "/queue")
        self.assertIn("/login", driver.current_url)
        if not os.path.exists(os.path.join(self.shots, "0-sign-in.png")):
            self.shot(driver, "0-sign-in")
        driver.find_element(By.ID, "access_key").send_keys(access)
        driver.find_element(By.ID, "secret_key").send_keys(secret)
        driver.find_element(By.ID, "sign-in").click()
        # The path, not the URL's end: the sign-in page's own URL ends with ?next=/queue.
        self.until("the queue", lambda: urllib.parse.urlsplit(driver.current_url).path == "/queue",
                   driver=driver)

    def imaging(self, access, secret, *args):
        env = dict(os.environ, AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret,
                   AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_EC2=self.service.url,
                   AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{self.s3_port}", TMPDIR=self.tmp)
        env.pop("AWS_PROFILE", None)
        result = subprocess.run([sys.executable, "-m", "imaging_service.clients.imaging", *args],
                                check=False, capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(0, result.returncode, f"imaging {args}:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def test_queue_page(self):
        from selenium.webdriver.common.by import By
        hook = self.path("elements", "test-step", "validate.d", "10-step")
        os.makedirs(os.path.dirname(hook))
        with open(hook, "w") as f:
            f.write(STEP_HOOK)
        os.chmod(hook, 0o755)
        self.start("--workers", "1", "--cache", "false", "--elements-path", self.path("elements"),
                   "--elements-linux", "mounters validate-linux test-step convert-qemu")
        access, secret, account, bucket = self.user_keys()
        other_access, other_secret, other_account, other_bucket = self.user_keys()
        other_ec2 = self.service.client(other_access, other_secret)
        _, vmdk = self.vmdk()

        driver = self.browser()
        self.sign_in(driver, access, secret)
        self.assertIn("Nothing is running", driver.page_source)
        cookie = driver.get_cookie("imaging_session")
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual("Strict", cookie["sameSite"])

        # The other account's task (it fails: its object does not exist).
        other_id = other_ec2.import_image(
            DiskContainers=[{"Format": "VMDK", "UserBucket": {"S3Bucket": other_bucket, "S3Key": "none.vmdk"}}],
            Platform="Linux")["ImportTaskId"]

        first = json.loads(self.imaging(access, secret, "import", vmdk, "--bucket", bucket, "--no-wait", "--json",
                                        "--platform", "Linux", "-d", "first"))["id"]
        second = json.loads(self.imaging(access, secret, "import", vmdk, "--bucket", bucket, "--key", "second.vmdk",
                                         "--no-wait", "--json", "--platform", "Linux"))["id"]

        # The queue shows both (the page reloads itself when new tasks appear), not the other's.
        self.until("both tasks on the queue", lambda: first in driver.page_source and second in driver.page_source,
                   driver=driver)
        self.assertNotIn(other_id, driver.page_source)
        # The waiting task's bar is empty (its width is the progress, 0).
        width = driver.execute_script(
            f"return document.querySelector('[data-task=\"{second}\"] [data-field=bar]').getBoundingClientRect().width")
        self.assertEqual(0, width)

        # Watch the second task's progress change in place on its page: it waits behind the first
        # (one worker), then downloads and sits in the slow validator (8 s).
        driver.get(f"{self.service.url}/tasks/{second}")
        driver.execute_script("window.notReloaded = true;")
        seen = []

        def progress_moved():
            # The text and the marker read at once: values seen only on this very page count.
            text, same_page, why = driver.execute_script(
                "return [document.querySelector('[data-field=progress]').textContent, window.notReloaded === true,"
                " window.sessionStorage.getItem('imaging-reload')];")
            self.assertTrue(same_page, f"the page reloaded ({why}) before its progress changed in place "
                                       f"(seen {seen})")
            if text not in seen:
                seen.append(text)
            return len(seen) >= 2 and text != "0"
        self.until(f"the progress of {second} to change (seen {seen})", progress_moved, timeout=120, driver=driver)
        self.shot(driver, "1-task-converting")
        driver.get(self.service.url + "/queue")
        self.shot(driver, "2-queue-running")

        # Cancel it while it converts.
        driver.get(f"{self.service.url}/tasks/{second}")
        driver.find_element(By.ID, "cancel").click()
        self.until("the cancel", lambda: "cancelled=1" in driver.current_url, driver=driver)
        self.until("cancelled", lambda: driver.find_element(By.CSS_SELECTOR, "[data-field=state]").text
                   == "cancelled", driver=driver)
        self.assertIn("cancelled by the user on the queue page", driver.page_source)
        self.shot(driver, "3-task-cancelled")

        # The first completes; its log shows the validators and the registered image.
        driver.get(f"{self.service.url}/tasks/{first}")
        self.until("completed", lambda: driver.find_element(By.CSS_SELECTOR, "[data-field=state]").text
                   == "completed", timeout=180, driver=driver)
        self.until("the download button", lambda: driver.find_elements(By.ID, "download"), driver=driver)
        log = driver.find_element(By.ID, "log").text
        self.assertIn("validator", log)
        self.assertIn("registered ami-", log)
        # The toolkit's events the service kept: each hook with its result and duration.
        self.assertRegex(log, r"hook validate/10-linux-release\s+ok in \d+\.\d s")
        self.assertRegex(log, r"hook convert/55-qemu-to-qemu\s+ok in \d+\.\d s")
        self.shot(driver, "4-task-completed-log")

        # Download: a presigned URL of the store, the converted image.
        href = driver.find_element(By.ID, "download").get_attribute("href")
        self.assertTrue(href.endswith(f"/tasks/{first}/download"))

        driver.get(self.service.url + "/queue")
        self.assertNotIn(other_id, driver.page_source)
        self.shot(driver, "5-queue-finished")

        # Another account's task answers as one that does not exist.
        driver.get(f"{self.service.url}/tasks/{other_id}")
        self.assertIn(f"No task {other_id}", driver.page_source)

        # A cancel without the session's CSRF token is refused (the session cookie alone is not enough).
        session = {"imaging_session": driver.get_cookie("imaging_session")["value"]}
        status = post(f"{self.service.url}/tasks/{first}/cancel", {"csrf": "forged"}, session)
        self.assertEqual(403, status)

        # The operator sees every account's tasks and the workers.
        op_access, op_secret, _ = self.service.credential(operator=True)
        operator = self.browser()
        self.sign_in(operator, op_access, op_secret)
        self.until("the other account's task", lambda: other_id in operator.page_source, driver=operator)
        self.assertIn(first, operator.page_source)
        self.assertIn("Workers", operator.page_source)
        self.assertIn("scratch space", operator.page_source)
        self.assertIn(other_account, operator.page_source)
        self.assertIn(account, operator.page_source)
        self.shot(operator, "6-operator-queue")
        # A failed task's page names the failing step and the reason.
        operator.get(f"{self.service.url}/tasks/{other_id}")
        self.assertEqual("failed", operator.find_element(By.CSS_SELECTOR, "[data-field=state]").text)
        self.assertIn("download failed", operator.find_element(By.CSS_SELECTOR, ".message").text)
        self.assertIn("none.vmdk", operator.find_element(By.CSS_SELECTOR, ".message").text)
        self.shot(operator, "7-operator-failed-task")

        # Pages are readable with JavaScript off: the server renders them.
        status, body = get(f"{self.service.url}/tasks/{first}", session)
        self.assertEqual(200, status)
        self.assertIn("completed", body)
        self.assertIn("hook validate/10-linux-release", body)


def _ok(function, arg, errors):
    try:
        function(arg)
        return True
    except errors:
        return False


def post(url, form, cookies):
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                     headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def get(url, cookies):
    request = urllib.request.Request(url, headers={"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, r.read().decode()


class SessionTest(PipelineTest):
    """The session and its checks over plain HTTP (no browser): API-only service."""

    def setUp(self):
        super().setUp()
        self.service = self.useFixture(sf.Service(engine="none", state_dir=self.path("state")))

    def login(self, access, secret, next_url="/queue"):
        request = urllib.request.Request(
            self.service.url + "/login", method="POST",
            data=urllib.parse.urlencode({"access_key": access, "secret_key": secret, "next": next_url}).encode())
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=10) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, e.read().decode()

    def cookie(self, headers):
        value = headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        return {"imaging_session": value}

    def test_sign_in_checks(self):
        access, secret, _ = self.service.credential()
        other_access, other_secret, _ = self.service.credential()
        # A wrong secret and an unknown key: the same answer, no cookie.
        for a, s in ((access, "wrong"), ("AKIANOSUCHKEY", secret)):
            status, headers, body = self.login(a, s)
            self.assertEqual(401, status)
            self.assertIsNone(headers.get("Set-Cookie"))
            self.assertIn("do not match an active credential", body)
        # A good pair: HttpOnly, SameSite=Strict; `next` only to a local path.
        status, headers, _ = self.login(access, secret, next_url="//evil.example/x")
        self.assertEqual(303, status)
        self.assertEqual("/queue", headers["Location"])
        cookie_header = headers["Set-Cookie"].lower()
        self.assertIn("httponly", cookie_header)
        self.assertIn("samesite=strict", cookie_header)
        session = self.cookie(headers)
        status, body = get(self.service.url + "/queue", session)
        self.assertEqual(200, status)

        # Another account's task answers as one that does not exist, on every route.
        other = self.service.client(other_access, other_secret)
        other_id = other.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {
            "S3Bucket": "b", "S3Key": "k.vmdk"}}], Platform="Linux")["ImportTaskId"]
        for path in (f"/tasks/{other_id}", f"/tasks/{other_id}/events", f"/tasks/{other_id}/download"):
            with self.assertRaises(urllib.error.HTTPError) as e:
                get(self.service.url + path, session)
            self.assertEqual(404, e.exception.code, path)
            e.exception.close()
        csrf = json.loads(base64_json(session["imaging_session"]))["csrf"]
        self.assertEqual(404, post(f"{self.service.url}/tasks/{other_id}/cancel", {"csrf": csrf}, session))
        _, body = get(self.service.url + "/queue/events", session)
        self.assertEqual([], json.loads(body)["tasks"])

        # A cookie changed by the client is not a session.
        signature = session["imaging_session"].partition(".")[2]
        payload = json.loads(base64_json(session["imaging_session"]))
        payload["operator"] = True
        forged = {"imaging_session": base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
                  + "." + signature}
        with self.assertRaises(urllib.error.HTTPError) as e:
            get(self.service.url + "/queue/events", forged)
        self.assertEqual(401, e.exception.code)
        e.exception.close()

        # A revoked key's sessions end.
        sf.cli("credentials", "revoke", access, "--state-dir", self.service.state_dir)
        deadline = time.monotonic() + 15  # the service's credential cache lasts 5 s
        while True:
            try:
                get(self.service.url + "/queue/events", session)
            except urllib.error.HTTPError as e:
                e.close()
                self.assertEqual(401, e.code)
                break
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.5)

    def test_sign_in_token(self):
        access, _, _ = self.service.credential()
        made = subprocess.run([sys.executable, "-m", "imaging_service.cli", "credentials", "token", access,
                               "--hours", "0.5", "--state-dir", self.service.state_dir],
                              capture_output=True, text=True, check=True)
        token = made.stdout.strip()

        def login_token(value):
            request = urllib.request.Request(self.service.url + "/login", method="POST",
                                             data=urllib.parse.urlencode({"token": value}).encode())
            try:
                with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as r:
                    return r.status, r.headers
            except urllib.error.HTTPError as e:
                with e:
                    return e.code, e.headers
        status, headers = login_token(token)
        self.assertEqual(303, status)
        session = self.cookie(headers)
        self.assertEqual(200, get(self.service.url + "/queue", session)[0])
        # A changed token, or a session cookie offered as a token, is refused.
        self.assertEqual(401, login_token(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))[0])
        self.assertEqual(401, login_token(session["imaging_session"])[0])
        # A token is not a session cookie either.
        with self.assertRaises(urllib.error.HTTPError) as e:
            get(self.service.url + "/queue/events", {"imaging_session": token})
        self.assertEqual(401, e.exception.code)
        e.exception.close()
        # An unknown key gets no token.
        result = subprocess.run([sys.executable, "-m", "imaging_service.cli", "credentials", "token", "AKIANOSUCHKEY",
                                 "--state-dir", self.service.state_dir], capture_output=True, text=True, check=False)
        self.assertEqual(1, result.returncode)
        self.assertIn("no active access key AKIANOSUCHKEY", result.stderr)

    def test_secure_cookie_when_configured(self):
        self.service = self.useFixture(sf.Service(engine="none", state_dir=self.path("state2"),
                                                  args=["--web-secure-cookie", "true"]))
        access, secret, _ = self.service.credential()
        status, headers, _ = self.login(access, secret)
        self.assertEqual(303, status)
        self.assertIn("secure", headers["Set-Cookie"].lower().split("; "))


def base64_json(cookie_value):
    raw = cookie_value.split(".")[0]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
