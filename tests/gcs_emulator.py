"""A real GCS server for the tests: gcp-storage-emulator (pip, from the test extra) on a free
loopback port, in a subprocess, with the fixes the clients we use need.

`GcsEmulator()` starts it (one bucket, in memory) and `stop()`s it; `env()` is the environment
a command needs to use it (only $STORAGE_EMULATOR_HOST: vim_jax/infra/storage.py derives the rest);
`objects()` lists the bucket through the JSON API, independently of every client under test.

Run as a script, this file is the server: `python tests/gcs_emulator.py start --host 127.0.0.1
--port 9023 --in-memory --default-bucket bucket` (the emulator's own CLI). gcp-storage-emulator
2026.7.19 needed these fixes to serve tensorstore, gcsfs and google-cloud-cpp as GCS does (each
found by a failing client; GCS's documented behaviour in brackets):
 1. a zero-byte media upload (a "dir/" marker) crashed the handler [empty objects are fine];
 2. a chunked upload that also carries Content-Length was stored with its chunk framing
    [chunked wins, RFC 7230];
 3. GET .../b/{bucket}/storageLayout was not routed [answers the layout: no hierarchical
    namespace];
 4. a suffix range `bytes=-N` (array_record reads its footer so) returned the whole object
    [the last N bytes, 206];
 5. objects.move (POST .../o/{src}/moveTo/o/{dst}, gcsfs's rename) was not routed [moves];
 6. a listen backlog of 5 refused tensorstore's parallel connections [the server queues them];
 7. downloads lacked x-goog-generation, so tensorstore's conditional writes failed
    [every object read names its generation];
 8. ifGenerationMatch / ifGenerationNotMatch were ignored [412 / 304], which OCDBT and
    directory markers rely on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request


class GcsEmulator:
  """A GCS server with one empty bucket, for as long as the object lives (or until stop())."""

  def __init__(
      self,
      bucket: str = "bucket",
      log_path: str | None = None,
      disk: str | None = None,
      port: int | None = None,
  ):
    """disk: keep the objects in this folder (a server restarted on it finds them again)
    instead of in memory; port: a given one (a restart), else a free one."""
    self.bucket, self.disk = bucket, disk
    if port is None:
      with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    self.port = port
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path or os.devnull, "a")
    storage = ["--in-memory"] if disk is None else []
    env = dict(os.environ, **({"STORAGE_BASE": disk} if disk else {}))
    self.process = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *storage,
            "--default-bucket",
            bucket,
            "-q",
        ],
        stdout=self._log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
      try:
        if urllib.request.urlopen(self.url + "/", timeout=1).read() == b"OK":
          break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (exit {self.process.poll()})")
        time.sleep(0.05)

  def env(self) -> dict[str, str]:
    """What a command's environment needs to send its gs:// paths here."""
    return {"STORAGE_EMULATOR_HOST": self.url}

  def objects(self, prefix: str = "") -> dict[str, int]:
    """{object name: size} of the bucket's objects under `prefix`, through the JSON API."""
    found, token = {}, None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      page = json.load(
          urllib.request.urlopen(
              f"{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}"
          )
      )
      found.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        return found

  def read(self, name: str) -> bytes:
    """One object's bytes."""
    quoted = urllib.parse.quote(name, safe="")
    return urllib.request.urlopen(
        f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media"
    ).read()

  def write(self, name: str, data: bytes) -> None:
    """Uploads `data` as object `name` (replacing it)."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    urllib.request.urlopen(
        urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
    ).read()

  def delete(self, name: str) -> None:
    """Deletes object `name`."""
    quoted = urllib.parse.quote(name, safe="")
    urllib.request.urlopen(
        urllib.request.Request(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}", method="DELETE")
    ).read()

  def stop(self) -> None:
    """Stops the server (its objects are gone with it)."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGINT)  # the server's clean shutdown
      try:
        self.process.wait(10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self._log.close()


# ----------------------------------------------------------------------------------------------
# The server process: the emulator with the fixes listed above.
# ----------------------------------------------------------------------------------------------
def _serve(argv: list[str]) -> None:
  import http.server

  from gcp_storage_emulator import server
  from gcp_storage_emulator.__main__ import main
  from gcp_storage_emulator.handlers import objects

  http.server.HTTPServer.request_queue_size = 128  # fix 6

  def current(storage, bucket, name):
    try:
      return storage.get_file_obj(bucket, name)
    except Exception:  # the emulator's NotFound, or a missing bucket
      return None

  def upload_precondition_fails(request, storage, name) -> bool:  # fix 8, writes
    if "ifGenerationMatch" not in request.query or name is None:
      return False
    want = request.query["ifGenerationMatch"][0]
    obj = current(storage, request.params["bucket_name"], name)
    holds = obj is None if want == "0" else (obj is not None and str(obj.get("generation")) == want)
    return not holds

  original_insert = objects.insert

  def insert(request, response, storage, *args, **kwargs):
    name = request.query["name"][0] if "name" in request.query else None
    if name is None and isinstance(request.data, dict):
      name = (request.data.get("meta") or request.data).get("name")
    if "upload_id" not in request.query and upload_precondition_fails(request, storage, name):
      response.status = server.HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "a precondition did not hold"}})
      return
    return original_insert(request, response, storage, *args, **kwargs)

  original_media_upload = objects._media_upload

  def media_upload(request, response, storage):  # fix 1
    if request.data is None:
      request._data = b""
    return original_media_upload(request, response, storage)

  original_read_raw = server._read_raw_data

  def read_raw_data(handler):  # fix 2
    if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
      if handler.headers.get("Content-Length"):
        del handler.headers["Content-Length"]
    return original_read_raw(handler)

  def storage_layout(request, response, storage):  # fix 3
    name = request.params["bucket_name"]
    if storage.get_bucket(name) is None:
      response.status = server.HTTPStatus.NOT_FOUND
      return
    response.json(
        {
            "kind": "storage#storageLayout",
            "bucket": name,
            "location": "US",
            "locationType": "multi-region",
            "hierarchicalNamespace": {"enabled": False},
        }
    )

  def move(request, response, storage, *args, **kwargs):  # fix 5
    bucket = request.params["bucket_name"]
    try:
      moved = objects._copy(
          request.base_url,
          storage,
          bucket,
          request.params["object_id"],
          bucket,
          request.params["dest_object_id"],
      )
      storage.delete_file(bucket, request.params["object_id"])
      response.json(moved)
    except objects.NotFound:
      response.status = server.HTTPStatus.NOT_FOUND

  original_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", None) or "")
    obj = current(storage, bucket, name)
    if suffix and obj is not None:  # fix 4
      size = len(storage.get_file(bucket, name))
      request._request_handler.headers.replace_header(
          "Range", f"bytes={max(0, size - int(suffix.group(1)))}-"
      )
    if obj is not None:  # fix 8, reads
      query = request.query
      if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != str(
          obj.get("generation")
      ):
        response.status = server.HTTPStatus.PRECONDITION_FAILED
        return
      if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == str(
          obj.get("generation")
      ):
        response.status = server.HTTPStatus.NOT_MODIFIED
        return
    original_download(request, response, storage, *args, **kwargs)
    if obj is not None and response.status in (
        server.HTTPStatus.OK,
        server.HTTPStatus.PARTIAL_CONTENT,
    ):  # fix 7
      response["x-goog-generation"] = str(obj.get("generation"))
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
      response["x-goog-stored-content-length"] = str(obj.get("size"))

  objects.insert, objects._media_upload, objects.download = insert, media_upload, download
  server._read_raw_data = read_raw_data
  # The routing table holds the original functions: swap them, and add the missing routes.
  swap = {original_download: download, original_insert: insert}
  server.HANDLERS = (
      (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$", {server.GET: storage_layout}),
      (
          r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
          r"(?P<dest_object_id>.*[^/]+)$",
          {server.POST: move},
      ),
  ) + tuple(
      (pattern, {method: swap.get(f, f) for method, f in handlers.items()})
      for pattern, handlers in server.HANDLERS
  )
  main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
