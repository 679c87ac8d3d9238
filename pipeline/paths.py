"""Where the job reads and writes: local paths and pyarrow filesystem URIs, compared safely.

The output folder may be emptied (`--overwrite`) and is written into, so it must never be,
contain or lie inside the input, the model folder or the adapter store. Local paths are
compared after resolving symlinks; URIs (`s3://bucket/key`) by scheme, host and normalised
path.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A folder or file on a pyarrow filesystem.

    Args:
        uri: as the user gave it (messages quote it).
        fs: the filesystem it lives on.
        path: the path on `fs`.
    """

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def parse(cls, uri: str) -> Location:
        """A local path (or `file://` URI) or any URI pyarrow has a filesystem for."""
        if _is_remote(uri):
            fs, path = pafs.FileSystem.from_uri(uri)
            return cls(uri, fs, path)
        return cls(uri, pafs.LocalFileSystem(), os.path.abspath(_local_path(uri)))

    def child(self, name: str) -> Location:
        """The entry `name` inside this folder."""
        return Location(self.uri.rstrip("/") + "/" + name, self.fs, self.path.rstrip("/") + "/" + name)


def check_not_overlapping(output: str, protected: dict[str, str | None], flag: str = "--output") -> None:
    """Refuse an output that is, contains or lies inside one of the `protected` locations.

    Args:
        output: the output (or checkpoint) folder's URI or path.
        protected: what each location is ("input", "model folder", ...) -> its URI or path.
        flag: the flag that named `output`, for the message.

    Raises:
        ValueError: one line naming both locations and what to do.
    """
    out = _key(output)
    for what, uri in protected.items():
        if not uri:
            continue
        relation = _relation(out, _key(uri))
        if relation:
            names = [f"the {k}" for k, v in protected.items() if v]
            others = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
            kind = "an output folder" if flag == "--output" else "a folder"
            raise ValueError(f"{flag} {output!r} {relation} the {what} {uri!r}; the job writes into (and "
                             f"--overwrite empties) that folder, so pass {kind} outside {others}")


def _relation(a: tuple[str, str], b: tuple[str, str]) -> str | None:
    """How location `a` relates to `b`: "is", "lies inside", "contains", or None."""
    if a[0] != b[0]:
        return None
    if a[1] == b[1]:
        return "is"
    if a[1].startswith(b[1].rstrip("/") + "/"):
        return "lies inside"
    if b[1].startswith(a[1].rstrip("/") + "/"):
        return "contains"
    return None


def _key(uri: str) -> tuple[str, str]:
    """(filesystem, normalised absolute path): equal keys name the same place."""
    if _is_remote(uri):
        parts = urlsplit(uri)
        return f"{parts.scheme.lower()}://{parts.netloc}", posixpath.normpath("/" + parts.path.lstrip("/"))
    return "file://", os.path.realpath(_local_path(uri))


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri
