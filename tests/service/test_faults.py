"""Faults of issue 12 not covered in test_pipeline.TestFaults: a cancel while the task downloads.

The other faults of the issue and their tests: the service killed mid-conversion and restarted
(test_pipeline.TestFaults.test_service_killed_and_restarted), the toolkit process killed and a
cancel during conversion (test_cancel_during_conversion_and_killed_toolkit), a corrupt, truncated
or wrong-size part, a format lie, an entity bomb and a part URL to another host
(test_manifest_faults), a deleted part (test_missing_part_named_when_the_upload_expires), a part
replaced after the upload (test_part_damaged_after_upload), a manifest or Url to a disallowed
host (test_disallowed_url_refused_at_submit), a full scratch space (test_full_scratch_space; one
that is only full for now: TestLimits.test_scratch_reservation_waits).
"""

import os
import subprocess
import time

from imaging_service import manifest, tasks
from tests.service.test_pipeline import PipelineTest

PART = 64 * 1024


class TestCancelDuringDownload(PipelineTest):

    def slow_manifest(self, store, bucket, parts):
        """A manifest of `parts` parts that all read the same small object: thousands of GETs,
        so the download lasts seconds whatever the store's speed."""
        store.put_bytes(os.urandom(PART), bucket, "slow/part")
        url = store.presign("get_object", bucket, "slow/part")
        head = store.presign("head_object", bucket, "slow/part")
        m = manifest.ImportManifest("RAW", parts * PART, 1, [
            manifest.Part(i, i * PART, (i + 1) * PART - 1, "slow/part", head, url) for i in range(parts)])
        store.put_bytes(manifest.build(m), bucket, "slow/manifest.xml")
        return store.presign("get_object", bucket, "slow/manifest.xml"), parts * PART

    def test_cancel_conversion_task_while_it_downloads(self):
        self.start("--cache", "false")
        ec2, store, bucket, _account = self.user()
        url, size = self.slow_manifest(store, bucket, 4000)
        task_id = ec2.import_volume(AvailabilityZone="us-east-1a", Volume={"Size": 1},
                                    Image={"Format": "RAW", "Bytes": size, "ImportManifestUrl": url}
                                    )["ConversionTask"]["ConversionTaskId"]
        self.wait_step(task_id, "download")
        source = os.path.join(self.service.state_dir, "work", task_id, "source.img")
        deadline = time.monotonic() + 30
        while not (os.path.exists(source) and os.path.getsize(source) > 16 * PART):
            self.assertLess(time.monotonic(), deadline, "the download never started")
            time.sleep(0.05)
        with self.db().session() as s:
            row = s.get(tasks.Task, task_id)
            self.assertEqual(("converting", "download"), (row.state, row.step))
        partial = os.path.getsize(source)
        asked = time.monotonic()
        ec2.cancel_conversion_task(ConversionTaskId=task_id)
        task = self.wait_conversion(ec2, task_id, until=("cancelled",), timeout=10)
        self.assertLess(time.monotonic() - asked, 5)
        self.assertIn("cancelled", task["StatusMessage"])
        self.assertLess(partial, size)  # cancelled mid-download
        with self.db().session() as s:
            self.assertEqual("cancelled", s.get(tasks.Task, task_id).state)
        self.assertFalse(os.path.exists(source))
        self.assert_no_work_left()
        found = subprocess.run(["pgrep", "-f", f"{self.service.state_dir}/work/{task_id}"],
                               stdout=subprocess.PIPE, text=True, check=False).stdout
        self.assertEqual("", found)
