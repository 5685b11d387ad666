"""An uploaded adapter archive -> a validated `LoadedAdapter`, or an `UploadError` carrying the HTTP status and a
message that names the problem.

Accepted: a `.tar`, `.tar.gz`/`.tgz` or `.zip` (recognised by content, not by name) of an artifact-format-1
directory or of a PEFT LoRA / IA3 directory, its files at the archive root or inside one top-level folder.
The archive is unpacked in memory and never written to disk. Refusals, in the order they are checked:

| status | refused                                                                                       |
| 413    | the upload over `max_bytes`; the unpacked total over `max_unpacked_bytes` (from the headers, and |
|        | again while decompressing: a zip or gzip bomb is stopped at the limit, whatever its headers say) |
| 415    | an unknown archive type; pickle weights (`.bin`, `.pt`, `.pth`, ...): only safetensors          |
| 400    | more than MAX_ENTRIES entries (a zip: from its end records, before its directory is read; a tar: |
|        | while streaming), absolute paths, `..`, links, devices and other special entries, duplicate or   |
|        | nested entries, unexpected file names, no adapter (or two) in the archive, an unreadable archive |
| 422    | whatever `adapters.artifact` refuses: a manifest or PEFT config over its limits or of the wrong   |
|        | types, shapes against the backbone, unknown target modules, a rank of any part over `max_rank`,  |
|        | dtypes, values not finite in the serving `dtype`, a base fingerprint of another backbone, ...    |
"""
from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from typing import IO

import torch

from adapters.artifact import load_adapter_files
from adapters.errors import ArtifactError
from adapters.files import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    PICKLE_SUFFIXES,
    README_FILE,
    WEIGHTS_FILE,
)
from adapters.manifest import LoadedAdapter

FORMAT1_FILES = {MANIFEST_FILE, WEIGHTS_FILE}
PEFT_FILES = {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE}
ALLOWED_FILES = FORMAT1_FILES | PEFT_FILES | {README_FILE}
MAX_ENTRIES = 64  # an adapter is 2-3 files; more entries than this is not an adapter
MAX_ZIP_DIRECTORY_BYTES = 1 << 20  # a zip's central directory: ~100 bytes per entry in a legitimate one
_TAR_OVERHEAD_BYTES = 1 << 20  # headers and padding a legitimate tar of MAX_ENTRIES entries stays far below
_READ_CHUNK = 1 << 20


class UploadError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def parse_upload(filename: str | None, data: bytes, spec: dict, *, max_bytes: int, max_unpacked_bytes: int,
                 max_rank: int | None, dtype: torch.dtype | str | None = None) -> LoadedAdapter:
    """Unpack, check and validate an uploaded archive against the backbone `spec` (values must stay finite in the
    serving `dtype`: float32 on CPU, bfloat16 on GPU); raises UploadError, and nothing else."""
    name = filename or "upload"
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: {len(data)} bytes is over the server's limit of {max_bytes} bytes "
                               "(MULTIPLEX_MAX_ADAPTER_BYTES)")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise UploadError(415, f"{name}: pickle files can run code when loaded and are refused; only safetensors "
                               "weights are accepted, in a .tar, .tar.gz or .zip of the adapter directory")
    kind = _archive_kind(data)
    if kind == "zip":
        entries = _unpack_zip(name, data, max_unpacked_bytes)
    elif kind in ("tar", "gzip"):
        raw = gzip.GzipFile(fileobj=io.BytesIO(data)) if kind == "gzip" else io.BytesIO(data)
        entries = _unpack_tar(name, raw, max_unpacked_bytes)
    else:
        raise UploadError(415, f"{name}: unknown archive type; upload a .tar, .tar.gz (.tgz) or .zip of an adapter "
                               "directory (artifact format 1 or PEFT LoRA / IA3)")
    files, folder = _layout(name, entries)
    _check_names(name, set(files))
    try:
        loaded = load_adapter_files(files, spec, name=folder or _stem(name), where=name, max_rank=max_rank,
                                    dtype=dtype)
    except ArtifactError as e:
        raise UploadError(422, str(e)) from None
    d = loaded.deltas
    if not (d.lowrank or d.sparse or d.scale or d.para):  # PEFT would refuse it too ("target modules not found")
        raise UploadError(422, f"{name}: the adapter holds no weights for any module of this model; it would "
                               "serve the base model under its name")
    return loaded


def _archive_kind(data: bytes) -> str | None:
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[257:262] == b"ustar":
        return "tar"
    return None


def _stem(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or "adapter"
    return base or "adapter"


def _entry_path(archive: str, raw: str) -> tuple[str, ...]:
    """An entry's name -> its path parts; absolute paths, '..', backslashes and NULs refused."""
    if raw.startswith("/") or (len(raw) > 1 and raw[0].isalpha() and raw[1] == ":"):
        raise UploadError(400, f"{archive}: absolute path {raw!r} in the archive")
    if "\\" in raw or "\x00" in raw:
        raise UploadError(400, f"{archive}: path {raw!r} in the archive has a backslash or NUL character")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UploadError(400, f"{archive}: path {raw!r} in the archive goes up ('..')")
    return parts


class _Entries:
    """What an archive holds, checked as it is read: a bounded number of entries, a bounded total size."""

    def __init__(self, archive: str, max_unpacked_bytes: int) -> None:
        self.archive, self.limit = archive, max_unpacked_bytes
        self.files: dict[tuple[str, ...], bytes] = {}
        self.dirs: set[tuple[str, ...]] = set()
        self.num_entries = self.total = 0

    def add_entry(self, raw_name: str) -> tuple[str, ...]:
        self.num_entries += 1
        if self.num_entries > MAX_ENTRIES:
            raise UploadError(400, f"{self.archive}: more than {MAX_ENTRIES} entries; not an adapter archive")
        path = _entry_path(self.archive, raw_name)
        if path in self.files:
            raise UploadError(400, f"{self.archive}: {raw_name!r} appears twice in the archive")
        return path

    def count(self, num_bytes: int) -> None:
        self.total += num_bytes
        if self.total > self.limit:
            raise self.too_large()

    def too_large(self) -> UploadError:
        return UploadError(413, f"{self.archive}: unpacks to more than {self.limit} bytes, the server's limit "
                                "(MULTIPLEX_MAX_ADAPTER_BYTES)")


def _unpack_zip(archive: str, data: bytes, max_unpacked_bytes: int) -> _Entries:
    _check_zip_directory(archive, data)
    entries = _Entries(archive, max_unpacked_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ENTRIES:
                raise UploadError(400, f"{archive}: {len(infos)} entries; not an adapter archive")
            if sum(i.file_size for i in infos) > max_unpacked_bytes:  # what the headers declare
                raise entries.too_large()
            for info in infos:
                path = entries.add_entry(info.filename)
                mode = info.external_attr >> 16  # unix mode, when the zip was made on unix
                if stat.S_ISLNK(mode):
                    raise UploadError(400, f"{archive}: {info.filename!r} is a symbolic link; links are refused")
                if info.is_dir():
                    entries.dirs.add(path)
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded (DOS, writestr)
                    raise UploadError(400, f"{archive}: {info.filename!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise UploadError(400, f"{archive}: {info.filename!r} is encrypted")
                with zf.open(info) as f:
                    entries.files[path] = _read_bounded(f, entries, info.file_size, info.filename)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError, ValueError,
            struct.error) as e:  # ValueError: e.g. a negative seek from a corrupt header offset
        raise UploadError(400, f"{archive}: not a readable zip archive ({str(e)[:200]})") from None
    return entries


_ZIP_END = b"PK\x05\x06"  # end of central directory record (22 bytes + comment)
_ZIP64_LOCATOR = b"PK\x06\x07"  # zip64 end locator (20 bytes), just before the end record
_ZIP64_END = b"PK\x06\x06"  # zip64 end of central directory record (56 bytes)


def _check_zip_directory(archive: str, data: bytes) -> None:
    """Refuse, from the end records alone, a zip whose central directory claims more than MAX_ENTRIES entries or
    more than MAX_ZIP_DIRECTORY_BYTES, before `zipfile` reads it (one ZipInfo per entry: gigabytes for 10 million).
    Every end record zipfile may use counts, the largest claim wins: the record at the very end and the last
    signature in the final 64 KiB (zipfile's `_EndRecData`), with the zip64 record just before its locator and
    the one the locator points to (then the classic record's 0xFFFF / 0xFFFFFFFF fields are markers, not counts)."""
    entries = directory_bytes = 0
    for at in {len(data) - 22, data.rfind(_ZIP_END, max(len(data) - (1 << 16) - 22, 0))}:
        if at < 0 or data[at:at + 4] != _ZIP_END or at + 22 > len(data):
            continue
        _, _, _, n_disk, n_total, size, _, _ = struct.unpack("<4s4H2LH", data[at:at + 22])
        zip64 = _zip64_claims(data, at)
        if zip64 is not None:
            n_disk, n_total = (0 if n == 0xFFFF else n for n in (n_disk, n_total))
            size = 0 if size == 0xFFFFFFFF else size
            entries, directory_bytes = max(entries, zip64[0]), max(directory_bytes, zip64[1])
        entries, directory_bytes = max(entries, n_disk, n_total), max(directory_bytes, size)
    if entries > MAX_ENTRIES:
        raise UploadError(400, f"{archive}: {entries} entries in its central directory; more than {MAX_ENTRIES} "
                               "is not an adapter archive")
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise UploadError(400, f"{archive}: a central directory of {directory_bytes} bytes; an adapter archive's "
                               f"is under {MAX_ZIP_DIRECTORY_BYTES}")


def _zip64_claims(data: bytes, end_at: int) -> tuple[int, int] | None:
    """(entries, directory bytes), the largest claims of the zip64 records for the end record at `end_at`; None
    without a zip64 locator before it pointing at (or followed by) a zip64 record."""
    locator = end_at - 20
    if locator < 0 or data[locator:locator + 4] != _ZIP64_LOCATOR:
        return None
    _, _, offset, _ = struct.unpack("<4sLQL", data[locator:end_at])
    claims = [struct.unpack("<4sQ2H2L4Q", data[end64:end64 + 56])  # ..., n_disk, n_total, size, offset
              for end64 in {locator - 56, offset}
              if 0 <= end64 <= len(data) - 56 and data[end64:end64 + 4] == _ZIP64_END]
    if not claims:
        return None
    return max(max(c[6:8]) for c in claims), max(c[8] for c in claims)


def _unpack_tar(archive: str, raw: IO[bytes], max_unpacked_bytes: int) -> _Entries:
    entries = _Entries(archive, max_unpacked_bytes)
    # Every byte tarfile reads, headers included (a pax header can claim gigabytes), passes the bound.
    stream = _BoundedStream(raw, max_unpacked_bytes + _TAR_OVERHEAD_BYTES, entries)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # a stream: entries in order, no seeking
            for member in tar:
                path = entries.add_entry(member.name)
                if member.issym() or member.islnk():
                    raise UploadError(400, f"{archive}: {member.name!r} is a link (to {member.linkname!r}); "
                                           "links are refused")
                if member.isdir():
                    entries.dirs.add(path)
                    continue
                if not member.isreg():
                    raise UploadError(400, f"{archive}: {member.name!r} is a device, fifo or other special "
                                           "entry; only regular files are accepted")
                if entries.total + member.size > max_unpacked_bytes:  # what the header declares
                    raise entries.too_large()
                entries.files[path] = _read_bounded(tar.extractfile(member), entries, member.size, member.name)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        raise UploadError(400, f"{archive}: not a readable tar archive ({str(e)[:200]})") from None
    except RecursionError:  # tarfile reads a chain of pax / GNU long-name headers recursively
        raise UploadError(400, f"{archive}: too many chained extended (pax / GNU long name) headers; not an "
                               "adapter archive") from None
    return entries


def _read_bounded(f: IO[bytes], entries: _Entries, declared: int, name: str) -> bytes:
    """An entry's bytes, counted against the total as they are decompressed; more than declared is refused."""
    out = bytearray()
    while chunk := f.read(_READ_CHUNK):
        entries.count(len(chunk))
        out += chunk
        if len(out) > declared:
            raise UploadError(400, f"{entries.archive}: {name!r} holds more bytes than its header says")
    return bytes(out)


class _BoundedStream:
    """A read-only stream that refuses (413) to deliver more than `limit` bytes."""

    def __init__(self, raw: IO[bytes], limit: int, entries: _Entries) -> None:
        self.raw, self.limit, self.entries, self.delivered = raw, limit, entries, 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit + 1 - self.delivered if size is None or size < 0 else size
        data = self.raw.read(min(want, self.limit + 1 - self.delivered))
        self.delivered += len(data)
        if self.delivered > self.limit:
            raise self.entries.too_large()
        return data


def _layout(archive: str, entries: _Entries) -> tuple[dict[str, bytes], str | None]:
    """-> ({file name: bytes}, the top-level folder or None): files at the root, or all inside one folder."""
    paths = list(entries.files)
    if paths and all(len(p) == 1 for p in paths):
        folder = None
    elif paths and all(len(p) == 2 for p in paths) and len({p[0] for p in paths}) == 1:
        folder = paths[0][0]
    else:
        shown = sorted("/".join(p) for p in paths)[:8]
        raise UploadError(400, f"{archive}: the adapter's files must be at the archive root or inside one top-level "
                               f"folder; found {shown or 'no files'}")
    stray = sorted("/".join(d) + "/" for d in entries.dirs - {(), (folder,)})
    if stray:
        raise UploadError(400, f"{archive}: unexpected folders {stray} in the archive")
    return {p[-1]: data for p, data in entries.files.items()}, folder


def _check_names(archive: str, names: set[str]) -> None:
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UploadError(415, f"{archive}: {pickles}: pickle files can run code when loaded and are refused; only "
                               "safetensors weights are accepted (PEFT: save_pretrained(safe_serialization=True))")
    unexpected = sorted(names - ALLOWED_FILES)
    if unexpected:
        raise UploadError(400, f"{archive}: unexpected files {unexpected}; an adapter archive holds {MANIFEST_FILE} + "
                               f"{WEIGHTS_FILE} (format 1) or {PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (PEFT), "
                               f"and optionally {README_FILE}")
    is_format1, is_peft = FORMAT1_FILES <= names, PEFT_FILES <= names
    if (is_format1 and names & PEFT_FILES) or (is_peft and names & FORMAT1_FILES):
        raise UploadError(400, f"{archive}: holds files of both a format-1 artifact and a PEFT adapter; upload one")
    if not is_format1 and not is_peft:
        raise UploadError(400, f"{archive}: no adapter found (files: {sorted(names)}); expected {MANIFEST_FILE} + "
                               f"{WEIGHTS_FILE} (format 1) or {PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (PEFT)")
