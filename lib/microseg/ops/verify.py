"""`microseg forget --verify`: read every file under the lake root (and the file
destinations' export folders) for a person's ids.

Nothing is taken on trust from Delta's metadata: every file under the root is read, whether
a table references it or not (data files, `_change_data/`, deletion vectors, `_delta_log`
JSON, checkpoints and `.crc` files, the online store, models, stream checkpoints):

* each file's bytes as they are (JSON, text, SQLite pages, Parquet footers and statistics);
* Parquet files also decoded: every value of every column, nested ones too (compressed
  pages hide an id from a plain byte search);
* SQLite files also opened: every text value of every table (a long value spans pages);
* gzip and zip files decompressed; a file compressed otherwise (Spark's LZ4 state files)
  cannot be read here and is listed as not checked, which fails the verification.

An id matches as a whole token (`core.privacy.id_pattern`). Runs without Spark, through
pyarrow's file systems (local, s3, hdfs, gcs).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import sqlite3
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from microseg.core.privacy import id_pattern

_PARQUET = b"PAR1"
_SQLITE = b"SQLite format 3\x00"
_GZIP = b"\x1f\x8b"
_ZIP = b"PK\x03\x04"
# Compressed formats this scan cannot decode: their magic numbers
_OPAQUE = {
    b"LZ4Block": "LZ4 block stream (Spark)",
    b"\x04\x22\x4d\x18": "LZ4 frame",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xff\x06\x00\x00sNaPpY": "snappy frame",
}
_MAX_HITS_PER_PLACE = 3


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the lake root
    where: str  # "bytes", "column user_key", "sqlite members.user_key", ...
    value: str  # the id found


@dataclass
class Verification:
    files: int = 0
    bytes: int = 0
    hits: list[Hit] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    @property
    def clean(self) -> bool:
        return not self.hits and not self.unreadable


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in root and not root.startswith("file:"):
        return pafs.LocalFileSystem(), os.path.abspath(root)
    return pafs.FileSystem.from_uri(root)


def _files(filesystem: pafs.FileSystem, base: str) -> Iterator[pafs.FileInfo]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    for info in sorted(filesystem.get_file_info(selector), key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            yield info


class _Scanner:
    def __init__(self, ids: set[str]) -> None:
        self.pattern = id_pattern(ids)
        self.text_re = re.compile(self.pattern)
        self.bytes_re = re.compile(self.pattern.encode("utf-8"))

    def in_bytes(self, data: bytes, path: str, where: str) -> list[Hit]:
        found = []
        for match in self.bytes_re.finditer(data):
            found.append(Hit(path, where, match.group(1).decode("utf-8", "replace")))
            if len(found) >= _MAX_HITS_PER_PLACE:
                break
        return found

    def in_texts(self, values: list[str], path: str, where: str) -> list[Hit]:
        found = []
        for value in values:
            match = self.text_re.search(value)
            if match:
                found.append(Hit(path, where, match.group(1)))
                if len(found) >= _MAX_HITS_PER_PLACE:
                    break
        return found

    def in_array(self, array: pa.Array, path: str, where: str) -> list[Hit]:
        """Every string in an Arrow array, nested ones too."""
        kind = array.type
        if isinstance(array, pa.ChunkedArray):
            return [h for chunk in array.chunks for h in self.in_array(chunk, path, where)]
        if pa.types.is_dictionary(kind):
            return self.in_array(array.dictionary, path, where)
        if pa.types.is_struct(kind):
            return [
                h
                for i in range(kind.num_fields)
                for h in self.in_array(array.field(i), path, f"{where}.{kind.field(i).name}")
            ]
        if pa.types.is_map(kind):
            return self.in_array(array.keys, path, f"{where}.key") + self.in_array(
                array.items, path, f"{where}.value"
            )
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return self.in_array(array.flatten(), path, where)
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return [
                h for value in array.to_pylist() if value for h in self.in_bytes(value, path, where)
            ][:_MAX_HITS_PER_PLACE]
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            matches = pc.match_substring_regex(array, self.pattern)
            if not pc.any(matches).as_py():
                return []
            return self.in_texts(array.filter(matches).to_pylist(), path, where)
        return []

    def in_parquet(self, data: bytes, path: str) -> list[Hit]:
        table = pq.ParquetFile(io.BytesIO(data)).read()
        return [
            hit
            for name, column in zip(table.column_names, table.columns, strict=True)
            for hit in self.in_array(column, path, f"column {name}")
        ]

    def in_sqlite(self, data: bytes, path: str) -> list[Hit]:
        with tempfile.TemporaryDirectory() as folder:
            copy = os.path.join(folder, "copy.sqlite")
            with open(copy, "wb") as out:
                out.write(data)
            db = sqlite3.connect(copy)
            try:
                found = []
                tables = [
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables:
                    columns = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]
                    for column in columns:
                        values = [
                            str(r[0])
                            for r in db.execute(f'SELECT "{column}" FROM "{table}"')
                            if r[0] is not None
                        ]
                        found += self.in_texts(values, path, f"sqlite {table}.{column}")
                return found
            finally:
                db.close()

    def in_file(self, data: bytes, path: str, result: Verification) -> list[Hit]:
        hits = self.in_bytes(data, path, "bytes")
        if data[:4] == _PARQUET and data[-4:] == _PARQUET:
            hits += self.in_parquet(data, path)
        elif data.startswith(_SQLITE):
            hits += self.in_sqlite(data, path)
        elif data.startswith(_GZIP):
            hits += self.in_file(gzip.decompress(data), f"{path} (gunzipped)", result)
        elif data.startswith(_ZIP):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    hits += self.in_file(archive.read(member), f"{path}!{member}", result)
        else:
            for magic, name in _OPAQUE.items():
                if data.startswith(magic):
                    result.unreadable.append((path, f"{name} compressed"))
        return hits


def scan_lake(root: str, ids: set[str], *, also: tuple[str, ...] = ()) -> Verification:
    """Read every file under `root`, and under each folder of `also` (a file destination's
    exports), for any of `ids` (see the module docstring). Paths under the root are named
    relative to it, others in full."""
    scanner = _Scanner(ids)
    result = Verification()
    for folder, prefix in ((root, ""), *((f, f.rstrip("/") + "/") for f in also)):
        filesystem, base = _filesystem(folder)
        for info in _files(filesystem, base):
            relative = prefix + info.path[len(base) :].lstrip("/")
            with filesystem.open_input_stream(info.path) as stream:
                data = stream.read()
            result.files += 1
            result.bytes += len(data)
            try:
                result.hits += scanner.in_file(data, relative, result)
            except (
                OSError,
                ValueError,
                pa.ArrowException,
                sqlite3.Error,
                zipfile.BadZipFile,
            ) as exc:
                result.unreadable.append((relative, f"{type(exc).__name__}: {exc}"))
    return result
