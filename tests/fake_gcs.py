"""A stand-in for Google Cloud Storage in tests: `gs://BUCKET/...` paths, read and written through
etils.epath's fsspec backend as in production (gcsfs's place), land in a local directory that
several processes can share. No network."""
import sys

from etils.epath import backend
import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


def install(root: str) -> None:
  """Serves gs://B/X from ROOT/B/X in this process."""

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, **_):
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

  for name in FakeGCS.protocol:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem it made


def uninstall() -> None:
  for name in ("gs", "gcs"):
    sys.modules["fsspec.registry"]._registry.pop(name, None)  # pylint: disable=protected-access
  backend.fsspec_backend._get_filesystem.cache_clear()
