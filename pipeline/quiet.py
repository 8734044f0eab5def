"""Keeps TensorFlow's native start-up chatter off the terminal, and real errors on it.

TensorFlow's C++ code logs through absl before anything initializes absl logging, so
`TF_CPP_MIN_LOG_LEVEL` does not reach those lines: every command would open with
`WARNING: All log messages before absl::InitializeLog()`, oneDNN and CUDA notices and,
on a machine with CUDA libraries but no GPU, `E... failed call to cuInit: UNKNOWN
ERROR (303)`. To a new user they read as failures. No flag silences them, so the
process's file descriptor 2 is routed through a filter thread that drops native INFO
and WARNING lines and the known-benign errors, and passes everything else through.
Python keeps writing to the real stderr directly, so our own log lines, progress bars
and one-line errors never wait on the filter. `VERBOSE=1` (`--verbose`) skips all this.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import IO

#: An absl/glog line: severity letter, MMDD, a time (absl before initialization prints
#: `00:00:<epoch seconds>`), thread id, file:line].
_NATIVE = re.compile(r"^(?P<severity>[IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ")
#: Errors that only say there is no GPU, that a plugin registered twice, that oneDNN
#: leaves a uint8 op (the image decoder's) to Eigen, or that libjpeg met a truncated file
#: (stage 1 names that image itself, with its path, when it skips it).
_BENIGN_ERRORS = re.compile(
    r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|oneDNN supports DT_UINT8 only"
    r"|Premature end of JPEG data"
)
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def keep_line(line: str) -> bool:
    """Whether a line written to fd 2 by native code reaches the terminal."""
    if line.startswith(_ABSL_NOTICE):
        return False
    match = _NATIVE.match(line)
    if match is None:
        return True  # not a native log line: somebody's real output
    if match["severity"] in "IW":
        return False
    return not _BENIGN_ERRORS.search(line)


class NativeLogFilter:
    """Routes fd 2 through `keep_line`; `close()` restores it and drains what is left."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._terminal = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        # Python's own stderr goes straight to the terminal, unfiltered and unbuffered.
        self._stderr: IO[str] = sys.stderr
        sys.stderr = open(os.dup(self._terminal), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        self._thread = threading.Thread(target=self._pump, args=(read,), name="native-log-filter", daemon=True)
        self._thread.start()

    def _pump(self, read: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = [line for line in lines if keep_line(line.decode("utf-8", "replace"))]
                if kept:
                    os.write(self._terminal, b"\n".join(kept) + b"\n")
        if pending and keep_line(pending.decode("utf-8", "replace")):
            os.write(self._terminal, pending)

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self._terminal, 2)  # closes the pipe's last write end, so the pump ends
        self._thread.join(timeout=5)
        sys.stderr.close()
        sys.stderr = self._stderr
        os.close(self._terminal)
