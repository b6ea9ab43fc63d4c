"""Runs gcp-storage-emulator on 127.0.0.1:PORT with bucket BUCKET (``python
tests/gcs_emulator.py PORT BUCKET``), for tests/test_storage.py.

One gap of the emulator is closed here: GCS answers every media download with the
object's ``x-goog-generation`` and ``x-goog-metageneration`` headers, the emulator sends
neither.  TensorStore needs the generation of what it read to update an OCDBT manifest
(orbax's checkpoint format): without it, a save of a tree with many arrays fails at
random with "Malformed StorageGeneration" when one array's write reads the manifest
another one has just written.  Nothing else is changed; in particular the emulator still
ignores generation preconditions (``ifGenerationMatch``), which the workdir lock must and
does cope with (see resnorm_jax.workdir.WorkdirLock).
"""

import logging
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (not found: the 404 stands)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


def main(port: int, bucket: str) -> None:
  logging.basicConfig(level=logging.CRITICAL)
  objects.download = _download_with_generation     # also reached through objects.get
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _download:
        handlers[method] = _download_with_generation
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
