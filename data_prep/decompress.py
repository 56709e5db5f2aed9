"""Opening inputs, decompressing .gz / .zst, with every damaged stream an error that names the file.

The libraries' own readers are not enough: python-zstandard's `stream_reader` (0.25) returns a short
stream without complaint when a file ends inside a frame, even with `read_across_frames=True`, so a
truncated .jsonl.zst lost half its documents behind a single "malformed_json" skip; gzip raises a bare
EOFError / BadGzipFile that does not say which file. Here the zstd frames are decoded with
`decompressobj`, whose `eof` says whether the frame in progress was complete, and both formats turn
their errors into a PrepError: truncated (re-copy it), not that format at all (rename it), corrupt.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import BinaryIO, Optional

from data_prep.errors import PrepError

READ_CHUNK = 1 << 17  # compressed bytes per read: a text corpus expands ~3-10x, so outputs stay small
BUFFER_SIZE = 1 << 20


def compression_of(path: str) -> Optional[str]:
    if path.endswith(".gz"):
        return "gz"
    if path.endswith(".zst") or path.endswith(".zstd"):
        return "zst"
    return None


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _truncated(path: str, fmt: str) -> PrepError:
    return PrepError(f"input {path!r} is truncated ({fmt} stream ends early after {os.path.getsize(path)} bytes): "
                     f"re-copy or re-compress it")


def _has_magic(head: bytes, fmt: str) -> bool:
    if fmt == "gzip":
        return head[:2] == b"\x1f\x8b"
    # a zstd frame, or a skippable frame (magic 0x184D2A50-0x184D2A5F, little-endian)
    return head[:4] == b"\x28\xb5\x2f\xfd" or (head[1:4] == b"\x2a\x4d\x18" and 0x50 <= head[0] <= 0x5F)


def _damaged(path: str, fmt: str, detail: str) -> PrepError:
    head = _head(path)
    if not _has_magic(head, fmt):  # most likely never compressed in this format: the name is wrong
        ext = ".gz" if fmt == "gzip" else os.path.splitext(path)[1]
        return PrepError(f"input {path!r} is not {fmt} data although its name ends in {ext} (it starts with "
                         f"{head!r}): rename it to match its contents, or re-compress it")
    return PrepError(f"input {path!r} is corrupt ({fmt}: {detail}): re-copy or re-compress it")


class _ZstdStream(io.RawIOBase):
    """The zstd frames of a file, back to back (pzstd and `cat a.zst b.zst` write several); input that
    ends inside a frame raises instead of ending the stream."""

    def __init__(self, path: str):
        import zstandard  # only needed for .zst inputs

        self.path = path
        self._error = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")
        self._frame = None  # decompressobj of the frame being decoded; None between frames
        self._out = memoryview(b"")  # decoded bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            data = b""
            if self._frame is not None and self._frame.eof:  # frame done; what follows starts the next
                data, self._frame = self._frame.unused_data, None
            if not data:
                data = self._file.read(READ_CHUNK)
                if not data:
                    if self._frame is not None:
                        raise _truncated(self.path, "zstd")
                    return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                self._out = memoryview(self._frame.decompress(data))
            except self._error as exc:
                raise _damaged(self.path, "zstd", str(exc)) from None
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class _GzipStream(io.RawIOBase):
    """gzip.GzipFile, with its EOFError / BadGzipFile / zlib.error turned into errors naming the file."""

    def __init__(self, path: str):
        self.path = path
        self._gz = gzip.open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        try:
            n = self._gz.readinto(buffer)
        except EOFError:
            raise _truncated(self.path, "gzip") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise _damaged(self.path, "gzip", str(exc)) from None
        return n

    def close(self) -> None:
        self._gz.close()
        super().close()


def open_binary(path: str) -> BinaryIO:
    """Open a file for reading, decompressing .gz / .zst; a damaged stream raises PrepError when read."""
    comp = compression_of(path)
    if comp is None:
        return open(path, "rb")
    raw = _GzipStream(path) if comp == "gz" else _ZstdStream(path)
    return io.BufferedReader(raw, BUFFER_SIZE)  # type: ignore[return-value]
