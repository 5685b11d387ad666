"""An adapter as the upload route takes it: one archive file, read in chunks that report progress.

A directory is packed into a `.tar.gz` with its files at the archive's root (a temporary file that stays in memory
up to SPOOL_BYTES); an existing `.tar`, `.tar.gz`/`.tgz` or `.zip` is sent as it is. Only regular files are packed:
links and special files are skipped, since the server refuses archives that hold them. A directory that holds an
adapter at its top (format 1's `adapter.json` + `adapter.safetensors`, or PEFT's `adapter_config.json` +
`adapter_model.safetensors`) is packed as that adapter only, with its README.md: a trainer's output directory
(`save_pretrained` beside `checkpoint-*` folders, optimizer state, logs) uploads its adapter, not the rest, which
the server would refuse. One with no adapter at its top but a trainer's checkpoints is refused here, naming them.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Callable

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPOOL_BYTES = 64 << 20

Progress = Callable[[int, int], None]  # (bytes_sent, total_bytes)


def archive_name(path: Path) -> str | None:
    """The file name to upload `path` under when it is an archive already, else None."""
    name = path.name.lower()
    return path.name if path.is_file() and name.endswith(ARCHIVE_SUFFIXES) else None


# the adapter formats the server takes (its README's "Adapter artifact"), and the file it keeps beside them
ADAPTER_FILES = (("adapter.json", "adapter.safetensors"), ("adapter_config.json", "adapter_model.safetensors"))
README_FILE = "README.md"


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def upload_files(directory: Path) -> list[Path]:
    """The files of `directory` to upload (see the module docstring): its adapter's when it holds one at its top,
    else every regular file under it (the server then says what is wrong); ValueError when it has none, or has
    only a trainer's checkpoints."""
    for pair in ADAPTER_FILES:
        if all(_regular(directory / name) for name in pair):
            return [directory / name for name in (*pair, README_FILE) if _regular(directory / name)]
    checkpoints = [d for d in directory.glob("checkpoint-*") if d.is_dir()
                   and any(all(_regular(d / name) for name in pair) for pair in ADAPTER_FILES)]
    if checkpoints:
        checkpoints.sort(key=lambda d: (int(d.name[11:]) if d.name[11:].isdigit() else -1, d.name))
        raise ValueError(f"{directory}: no adapter at its top, only a trainer's checkpoints "
                         f"({', '.join(d.name for d in checkpoints)}); upload one of them, e.g. {checkpoints[-1]}")
    files = sorted(p for p in directory.rglob("*") if _regular(p))
    if not files:
        raise ValueError(f"{directory}: no files to upload")
    return files


def pack_directory(directory: Path) -> IO[bytes]:
    """A .tar.gz of `upload_files(directory)` (paths relative to it), rewound to its start."""
    files = upload_files(directory)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    with tarfile.open(fileobj=spool, mode="w:gz") as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)
    spool.seek(0)
    return spool


def open_upload(path: str | os.PathLike) -> tuple[str, IO[bytes]]:
    """(file name to send, open binary file) for a directory or an archive; the caller closes the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return f"{path.resolve().name or 'adapter'}.tar.gz", pack_directory(path)
    name = archive_name(path)
    if name is None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        raise ValueError(f"{path}: expected an adapter directory or a {', '.join(ARCHIVE_SUFFIXES)} archive")
    return name, path.open("rb")


class ProgressReader:
    """A read-only binary file that calls `progress(bytes_read, total)` after every read.

    httpx's multipart encoder reads the file field in chunks as it sends them, so bytes read is bytes handed to the
    connection; it also seeks to measure the length, which resets the count.
    """

    def __init__(self, file: IO[bytes], progress: Progress | None) -> None:
        self._file = file
        self._progress = progress
        file.seek(0, os.SEEK_END)
        self.total = file.tell()
        file.seek(0)
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.position += len(data)
        if self._progress is not None and data:
            self._progress(self.position, self.total)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = self._file.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
