"""A local pyarrow filesystem whose every write is whole: written to a temporary file beside the
target and renamed over it on close. A process killed mid-write (a SIGKILLed driver while Ray
Tune syncs its experiment state) leaves the old file, never a truncated one; an object store's
PUT behaves the same way by itself. `storage.Storage` uses it for local paths (and imports this
module, with pyarrow, on first use)."""

from __future__ import annotations

import itertools
import os
import threading

import pyarrow
import pyarrow.fs as pafs

_counter = itertools.count()


def atomic_local_fs() -> pafs.PyFileSystem:
    """The local filesystem with whole-file writes."""
    return pafs.PyFileSystem(WholeWritesLocalHandler())


class _WholeFile:
    """A file written aside and renamed over `path` when closed."""

    def __init__(self, path: str):
        self.path = path
        # a name of its own (process, thread, count), created exclusively: cheaper than mkstemp
        self.tmp = f"{os.path.dirname(path) or '.'}/.tmp-{os.getpid()}-{threading.get_ident()}-{next(_counter)}"
        self.file = open(self.tmp, "xb")  # noqa: SIM115 - closed (and renamed) in close()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            os.replace(self.tmp, self.path)


class WholeWritesLocalHandler(pafs.FileSystemHandler):
    """pyarrow's LocalFileSystem, but output streams are `_WholeFile`s (and copies go through
    them)."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()

    def __reduce__(self):  # pickled by name: a Ray worker receives Tune's storage filesystem
        return (WholeWritesLocalHandler, ())

    def get_type_name(self):
        return "local"

    def equals(self, other):
        return type(other).__name__ == "WholeWritesLocalHandler"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        with self.local.open_input_stream(src) as fin, self.open_output_stream(dest, None) as fout:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_WholeFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)
