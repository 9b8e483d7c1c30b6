"""The `caffe-lmdb` command: argparse subcommands, each a thin call into the library.

Exit codes: 0 ok, 1 problems found (or the operation failed), 2 usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import CaffeLmdbError

log = logging.getLogger("caffe_lmdb")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class UsageError(CaffeLmdbError):
    """Bad arguments or input the user must fix; exits with status 2."""


def cmd_selftest(args: argparse.Namespace) -> int:
    """Round-trip every image of a folder through raw and encoded Datums and compare the pixels."""
    from .selftest import codec_roundtrip

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"{folder}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    mismatches = 0
    for path in files:
        report = codec_roundtrip(path)
        mismatches += not report.ok
        print(f"{path.relative_to(folder)}: {report}")
    print(f"{len(files)} images, {len(files) - mismatches} round-tripped pixel-exact, {mismatches} mismatched")
    return EXIT_OK if mismatches == 0 else EXIT_PROBLEMS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caffe-lmdb",
        description="Convert image folders to Caffe Datum LMDBs and inspect Caffe LMDBs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "selftest",
        help="round-trip a folder of images through the Datum codec",
        description="Round-trip every image of FOLDER through raw and encoded Datums and compare pixels. "
        "Example: caffe-lmdb selftest img/train",
    )
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, for in-process tests."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        print(f"caffe-lmdb {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CaffeLmdbError, OSError) as exc:
        print(f"caffe-lmdb {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        print(f"caffe-lmdb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
