"""A real S3 HTTP endpoint on loopback for tests: moto's server mode, as s3fs's own test-suite uses.

Clients reach it over HTTP exactly as they would reach AWS (botocore signs, aiobotocore sends, moto parses);
nothing is patched in-process. Credentials are fake and live only in the test's environment.
"""

from __future__ import annotations

import logging
import urllib.request

from tests.support.tables import write_table

# Fake credentials and no AWS config files: nothing from the developer's own AWS setup may leak in, and
# no lookup may leave the machine (instance metadata included).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/sdflow-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sdflow-tests/aws-credentials",
}
UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


class MotoS3Server:
    """moto's threaded server bound to 127.0.0.1 on a port the OS picks (port 0: no race for a free port)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        # werkzeug logs one line per request at INFO; keep the test output readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> "MotoS3Server":
        self._server.start()
        host, port = self._server.get_host_and_port()
        assert host == "127.0.0.1", host  # never listen beyond loopback
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def reset(self) -> None:
        """Drop every bucket and object (moto's own reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200, response.status

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


BUCKET = "sdflow-test"  # the bucket the `s3` fixture (tests/conftest.py) creates on a clean server


def upload_table(fs, folder, rows: list[dict], name: str) -> str:
    """Write rows as a Parquet prompt table and upload it to s3://BUCKET/name; returns its URL."""
    fs.put_file(write_table(folder / name, rows), f"{BUCKET}/{name}")
    return f"s3://{BUCKET}/{name}"
