"""A fault-injecting HTTP proxy for the storage tests: it runs on 127.0.0.1 between the
commands under test (gcsfs, TensorStore) and the GCS emulator (tests/gcs_emulator.py) and,
on a schedule, answers with an HTTP error, resets the connection, delays, corrupts the
body, or drops or garbles the generation header of a response.

    proxy = FaultProxy(upstream_port)          # a thread of the test process
    env = emulator_env(proxy.port)             # the runs talk to the proxy
    proxy.add(Fault("status", code=503, count=5, match=r"^POST ", arm=FIRST_METADATA))
    ...
    proxy.close()

A :class:`Fault` applies to requests whose ``"METHOD /path?query"`` line matches ``match``
(a regex; every request by default), from the moment it is armed: at once, or when a
request matching ``arm`` has gone through (e.g. the first checkpoint's metadata upload).
It then applies to the next ``count`` matching requests, or to all of them for
``seconds`` (None: from then on, an outage).  ``proxy.log`` lists ``(time, request line,
status or fault)`` for every request, so a test can show that the fault did happen.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import re
import socket
import struct
import threading
import time

KINDS = ("status", "reset", "delay", "corrupt", "no_generation", "bad_generation")


@dataclasses.dataclass
class Fault:
  """One scheduled fault (see the module docstring).  ``kind``: ``status`` (answer ``code``
  without forwarding), ``reset`` (close the connection with a TCP RST, nothing answered),
  ``delay`` (forward after ``delay`` seconds), ``corrupt`` (forward, then flip the bytes
  of the body), ``no_generation`` / ``bad_generation`` (forward, then drop the
  ``x-goog-generation`` header of the response or set it to a non-number)."""
  kind: str
  match: str = ""
  arm: str | None = None
  count: int | None = None
  seconds: float | None = None
  code: int = 503
  delay: float = 0.0
  armed_at: float | None = None
  hits: int = 0

  def __post_init__(self):
    assert self.kind in KINDS, self.kind
    if self.arm is None:
      self.armed_at = time.monotonic()

  def applies(self, line: str, now: float) -> bool:
    if self.armed_at is None or not re.search(self.match, line):
      return False
    if self.count is not None and self.hits >= self.count:
      return False
    if self.seconds is not None and now - self.armed_at > self.seconds:
      return False
    return True


class FaultProxy:
  """The proxy (a thread of the calling process); ``port`` is where clients connect."""

  def __init__(self, upstream_port: int):
    self.upstream_port = upstream_port
    self.faults: list[Fault] = []
    self.log: list[tuple[float, str, str]] = []
    self._lock = threading.Lock()
    proxy = self

    class Handler(_Handler):
      owner = proxy
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.port = self._server.server_address[1]
    self._thread = threading.Thread(target=self._server.serve_forever,
                                    kwargs={"poll_interval": 0.1}, daemon=True)
    self._thread.start()

  def add(self, fault: Fault) -> Fault:
    with self._lock:
      self.faults.append(fault)
    return fault

  def clear(self) -> None:
    """Removes every fault: the store works again."""
    with self._lock:
      self.faults = []

  def faulted(self) -> list[tuple[float, str, str]]:
    """The log entries of requests a fault was applied to."""
    return [entry for entry in self.log if not entry[2].isdigit()]

  def _choose(self, line: str) -> Fault | None:
    now = time.monotonic()
    with self._lock:
      for fault in self.faults:
        if fault.applies(line, now):
          fault.hits += 1
          return fault
    return None

  def _seen(self, line: str) -> None:
    """Arms the faults whose ``arm`` pattern ``line`` matches (after it went through)."""
    with self._lock:
      for fault in self.faults:
        if fault.armed_at is None and re.search(fault.arm, line):
          fault.armed_at = time.monotonic()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=10)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"   # keep-alive, as the clients use it
  owner: FaultProxy

  def log_message(self, *args):  # quiet
    pass

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      data = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return data
        data += self.rfile.read(size)
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _handle(self):
    owner = self.owner
    line = f"{self.command} {self.path}"
    body = self._body()
    fault = owner._choose(line)  # pylint: disable=protected-access
    kind = fault.kind if fault else None
    if kind == "reset":
      owner.log.append((time.time(), line, "reset"))
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
      self.close_connection = True
      self.connection.close()
      return
    if kind == "status":
      owner.log.append((time.time(), line, f"status {fault.code}"))
      payload = (b'{"error": {"code": %d, "message": "injected fault"}}' % fault.code)
      self.send_response(fault.code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)
      return
    if kind == "delay":
      time.sleep(fault.delay)
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("host", "expect", "transfer-encoding", "connection",
                                    "content-length")}
    upstream = http.client.HTTPConnection("127.0.0.1", owner.upstream_port, timeout=60)
    try:
      upstream.request(self.command, self.path, body=body if body or self.command in (
          "POST", "PUT", "PATCH") else None, headers=headers)
      response = upstream.getresponse()
      data = response.read()
      status, reason = response.status, response.reason
      out_headers = [(k, v) for k, v in response.getheaders()
                     if k.lower() not in ("transfer-encoding", "connection",
                                          "content-length", "keep-alive")]
    finally:
      upstream.close()
    if kind == "corrupt" and data:
      data = bytes(b ^ 0x5A for b in data)
    if kind in ("no_generation", "bad_generation"):
      out_headers = [(k, v) for k, v in out_headers if k.lower() != "x-goog-generation"]
      if kind == "bad_generation":
        out_headers.append(("x-goog-generation", "not-a-number"))
    owner.log.append((time.time(), line, kind or str(status)))
    owner._seen(line)  # pylint: disable=protected-access
    self.send_response(status, reason)
    for k, v in out_headers:
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  def handle_one_request(self):
    try:
      super().handle_one_request()
    except (ConnectionError, OSError):
      self.close_connection = True

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle
