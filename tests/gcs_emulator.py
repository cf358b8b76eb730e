"""A Cloud Storage emulator (gcp-storage-emulator, from PyPI) on 127.0.0.1, for tests of gs://
run directories: `Emulator()` starts it in a subprocess on a free port, `env()` gives the
variables that point gcsfs, google-cloud-storage and TensorStore at it, `stop()` ends it.

The emulator leaves out two things real Cloud Storage does and TensorStore (Orbax's arrays)
relies on; run as a script, this file adds them before serving:

- a media download says the object's generation (`x-goog-generation`; TensorStore fails with
  "Malformed StorageGeneration" without it);
- the generation preconditions `ifGenerationMatch` (412 when the object's generation differs; 0
  means "does not exist") on uploads, downloads and deletes, and `ifGenerationNotMatch` (304) on
  downloads: TensorStore's conditional writes and cached reads.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, timeout: float = 60.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gcs_emulator", str(self.port)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2):
                    return
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"the GCS emulator exited ({self._proc.returncode})"
                    ) from None
                if time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(
                        f"the GCS emulator did not answer within {timeout} s"
                    ) from None
                time.sleep(0.05)

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage (tensorboardX)
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # Orbax's arrays
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # array_record (TFDS datasets)
            "GOOGLE_CLOUD_PROJECT": "test",
            # TensorStore's fixed token for tests: it then looks for no credentials (and logs
            # no error about them).
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        }

    def new_bucket(self) -> str:
        """A new empty bucket's name."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        return name

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _serve(port: int) -> None:
    """Serve the emulator, with generations and preconditions, on 127.0.0.1:`port` until
    terminated."""
    import signal
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current(request, storage, name):
        try:
            return storage.get_file_obj(request.params["bucket_name"], name)
        except NotFound:
            return None

    def failed(request, obj, read):
        generation = obj["generation"] if obj else "0"
        match = request.query.get("ifGenerationMatch")
        if match and match[0] != generation:
            return HTTPStatus.PRECONDITION_FAILED
        not_match = request.query.get("ifGenerationNotMatch")
        if read and not_match and not_match[0] == generation:
            return HTTPStatus.NOT_MODIFIED
        return None

    def guarded(handler, name_of, read):
        def wrapped(request, response, storage, *args, **kwargs):
            name = name_of(request)
            if name is not None:
                obj = current(request, storage, name)
                status = failed(request, obj, read)
                if status is not None:
                    response.status = status
                    return None
                if read and obj is not None:
                    response["x-goog-generation"] = obj["generation"]
                    response["x-goog-metageneration"] = obj["metageneration"]
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    def upload_name(request):
        if "name" in request.query:
            return request.query["name"][0]
        data = request.data if isinstance(request.data, dict) else {}
        return (data.get("meta") or {}).get("name")

    object_id = lambda request: request.params.get("object_id")
    # Patched before the server module builds its routing table from these functions.
    objects.download = guarded(objects.download, object_id, read=True)
    objects.delete = guarded(objects.delete, object_id, read=False)
    objects.insert = guarded(objects.insert, upload_name, read=False)
    objects.xml_upload = guarded(objects.xml_upload, object_id, read=False)

    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # run() stops the server
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
