"""Run `caffe-lmdb ARGS...` and SIGKILL it just before its Nth file-system step: kill windows found deterministically.

    python tests/killstep.py N [--no-exchange] ARGS...

A step is a rename (`os.rename`/`os.replace`), a removal (`os.remove`/`os.unlink`, `os.rmdir`) or the
`renameat2(RENAME_EXCHANGE)` call, as Python's audit hooks see them. N larger than the run's steps
lets it finish. `--no-exchange` makes `publish.exchange_paths` answer "not available", as it does on
file systems without `RENAME_EXCHANGE` (older glibc, NFS), so the rename-aside path runs for real.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_STEPS = {"os.rename", "os.remove", "os.rmdir"}


def main() -> int:
    limit, args = int(sys.argv[1]), sys.argv[2:]
    from caffe_lmdb import cli, publish

    if args[:1] == ["--no-exchange"]:
        args = args[1:]
        publish.exchange_paths = lambda a, b: False
    renameat2 = ctypes.cast(ctypes.CDLL(None).renameat2, ctypes.c_void_p).value
    parent, count = os.getpid(), 0

    def hook(event: str, details: tuple) -> None:
        nonlocal count
        if os.getpid() != parent:
            return
        if event in _STEPS or (event == "ctypes.call_function" and details[0] == renameat2):
            count += 1
            if count == limit:
                os.kill(parent, signal.SIGKILL)

    sys.addaudithook(hook)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
