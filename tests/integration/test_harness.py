"""Fast checks of the harness's own parsers (no real parts): if these break, counts in the
end-to-end tests would mean nothing."""

from __future__ import annotations

from pathlib import Path

from tests.harness.node import parse_metrics
from tests.harness.registry import AccessLog

DIGEST = "sha256:" + "ab" * 32
REGISTRY_OUTPUT = f"""\
time="2026-11-28T07:27:41Z" level=info msg="response completed" http.request.method=GET
127.0.0.1 - - [28/Nov/2026:07:27:41 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
127.0.0.1 - - [28/Nov/2026:07:27:41 +0000] "GET /v2/a/b/blobs/{DIGEST} HTTP/1.1" 200 1000 "" "x"
127.0.0.1 - - [28/Nov/2026:07:27:42 +0000] "HEAD /v2/a/b/blobs/{DIGEST} HTTP/1.1" 200 0 "" "x"
127.0.0.1 - - [28/Nov/2026:07:27:42 +0000] "GET /v2/a/b/blobs/{DIGEST}?x=1 HTTP/1.1" 206 24 "" "x"
127.0.0.1 - - [28/Nov/2026:07:27:42 +0000] "GET /v2/a/b/blobs/{DIGEST} HTTP/1.1" 404 157 "" "x"
127.0.0.1 - - [28/Nov/2026:07:27:43 +0000] "GET /v2/a/b/manifests/v1 HTTP/1.1" 200 582 "" "x"
"""


def test_access_log_counts_blob_serves_only(tmp_path: Path) -> None:
    log_path = tmp_path / "registry.log"
    log_path.write_text(REGISTRY_OUTPUT)
    access_log = AccessLog(log_path)
    assert len(access_log.entries()) == 6
    assert access_log.serve_count(DIGEST) == 2
    assert access_log.bytes_served(DIGEST) == 1024
    assert access_log.serve_count(DIGEST, since=3) == 1
    assert access_log.entries()[1].user_agent == "x"


def test_parse_metrics_reads_labels_and_values() -> None:
    text = (
        "# HELP d7y_proxy_requests_total Mirror requests\n"
        "# TYPE d7y_proxy_requests_total counter\n"
        'd7y_proxy_requests_total{route="blob",status="200"} 3.0\n'
        'd7y_proxy_requests_total{route="manifest",status="401"} 1.0\n'
        "d7y_origin_bytes_total 1.048576e+06\n"
    )
    samples = parse_metrics(text)
    assert ("d7y_proxy_requests_total", {"route": "blob", "status": "200"}, 3.0) in samples
    assert ("d7y_origin_bytes_total", {}, 1048576.0) in samples
    assert len(samples) == 3
