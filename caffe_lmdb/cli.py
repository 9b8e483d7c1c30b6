"""The `caffe-lmdb` command: argparse subcommands, each a thin call into the library.

Exit codes: 0 ok, 1 problems found (or the operation failed), 2 usage errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import CaffeLmdbError
from .sources import IMAGE_EXTENSIONS, InputError

log = logging.getLogger("caffe_lmdb")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

UsageError = InputError  # bad arguments or input the user must fix: exit status 2


def flag(value: str) -> bool:
    """gflags-style booleans, so Caffe command lines (`--gray=true`, `--shuffle=false`) work as-is."""
    lowered = value.lower()
    if lowered in ("1", "true", "t", "yes", "y"):
        return True
    if lowered in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_bool_flag(parser: argparse.ArgumentParser, *names: str, help: str) -> None:
    parser.add_argument(*names, type=flag, nargs="?", const=True, default=False, metavar="BOOL", help=help)


def _shard_arguments(args: argparse.Namespace) -> dict:
    """`--num-shards N --shard-index I`, or `--num-shards auto` from torchrun's or Slurm's variables."""
    from .shards import local_world_size, shard_from_environment

    if args.num_shards is None:
        if args.shard_index is not None:
            raise UsageError("--shard-index needs --num-shards")
        return {}
    if args.num_shards == "auto":
        if args.shard_index is not None:
            raise UsageError("--shard-index cannot be combined with --num-shards auto")
        index, count = shard_from_environment()
        if args.workers is None:  # the launcher starts one converter per shard: share the cores
            args.workers = max(1, (os.cpu_count() or 1) // local_world_size())
        return {"num_shards": count, "shard_index": index}
    try:
        count = int(args.num_shards)
    except ValueError:
        raise UsageError(f"--num-shards must be an integer or 'auto', got {args.num_shards!r}") from None
    if args.shard_index is None:
        raise UsageError("--num-shards N needs --shard-index I (or use --num-shards auto under a launcher)")
    from .shards import shard_range

    shard_range(0, count, args.shard_index)  # validates the pair
    return {"num_shards": count, "shard_index": args.shard_index}


def cmd_convert(args: argparse.Namespace) -> int:
    """Resolve the positional forms, then convert with `writer.convert` (or `convert_splits`)."""
    from .writer import ConvertOptions, convert, convert_splits

    options = ConvertOptions(
        gray=args.gray,
        resize_height=args.resize_height,
        resize_width=args.resize_width,
        encoded=args.encoded,
        encode_type=args.encode_type,
        check_size=args.check_size,
    )
    common = dict(
        options=options, shuffle=args.shuffle, seed=args.seed, workers=args.workers,
        commit_every=args.commit_every, overwrite=args.overwrite, strict=args.strict,
        progress=False if args.quiet else None, **_shard_arguments(args),
    )
    paths = args.paths
    if args.list is not None:
        if len(paths) != 1:
            raise UsageError("with --list, give exactly one positional argument: the output LMDB")
        results = [convert(None, paths[0], list_file=args.list, root=args.root, keys_path=args.keys, **common)]
    elif len(paths) == 3:  # Caffe's own form: ROOTFOLDER/ LISTFILE DB_NAME
        results = [convert(None, paths[2], list_file=paths[1], root=paths[0], keys_path=args.keys, **common)]
    elif len(paths) == 2:
        results = [convert(paths[0], paths[1], root=args.root, keys_path=args.keys, **common)]
    elif len(paths) == 1:
        if args.keys is not None:
            raise UsageError("--keys needs an explicit output LMDB (the one-argument form writes one per split)")
        results = convert_splits(paths[0], **common)
    else:
        raise UsageError("give SRC OUT.lmdb, ROOTFOLDER/ LISTFILE OUT.lmdb, --list FILE OUT.lmdb, or a dataset root")
    for result in results:
        print(result)
        if result.skipped:
            print(f"  {result.skipped} unreadable images skipped, listed in {result.output.parent}/"
                  f"{result.keys_path.name.replace('keys.npy', 'skipped.txt')}")
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge shard LMDBs (a list, or a glob) into one with `merge.merge_lmdbs`."""
    from .merge import merge_lmdbs
    from .shards import find_shards

    shards = [shard for pattern in args.shards for shard in find_shards(pattern)]
    print(merge_lmdbs(shards, args.output, keys_path=args.keys, overwrite=args.overwrite,
                      progress=False if args.quiet else None))
    return EXIT_OK


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
        "convert",
        help="convert an image folder or a Caffe list file into a Datum LMDB",
        description="Convert images into a Caffe Datum LMDB plus a .npy keys file, as Caffe's convert_imageset "
        "does (same keys and flags). Forms: `convert SRC_DIR OUT.lmdb` (one subfolder per class), "
        "`convert ROOTFOLDER/ LISTFILE OUT.lmdb` (Caffe's), `convert --list FILE --root DIR OUT.lmdb`, "
        "and `convert DATASET_DIR` (each split folder DATASET_DIR/train, /val ... to DATASET_DIR/<split>.lmdb). "
        "Example: caffe-lmdb convert img/train train.lmdb --keys train_keys.npy",
    )
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="SRC OUT, ROOT LISTFILE OUT, OUT (with --list), or DATASET_DIR")
    p.add_argument("--list", metavar="FILE",
                   help="Caffe list file: 'relative/path label [more numeric columns]' lines")
    p.add_argument("--root", metavar="DIR", help="folder the list file's paths are relative to (default: its folder)")
    p.add_argument("--keys", metavar="FILE.npy",
                   help="where to save the keys (default: <out>_keys.npy beside the LMDB)")
    add_bool_flag(p, "--gray", help="store one-channel grayscale images (Caffe's --gray)")
    add_bool_flag(p, "--shuffle", help="shuffle the input order before assigning line ids (Caffe's --shuffle)")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle (default 0; same seed, same order)")
    p.add_argument("--resize_height", "--resize-height", type=int, default=0, metavar="H",
                   help="resize to this height (needs --resize_width too; 0 = keep)")
    p.add_argument("--resize_width", "--resize-width", type=int, default=0, metavar="W",
                   help="resize to this width (needs --resize_height too; 0 = keep)")
    add_bool_flag(p, "--check_size", "--check-size", help="fail unless every image has the same size")
    add_bool_flag(p, "--encoded", help="store the image files' bytes (encoded Datums) instead of raw pixels")
    p.add_argument("--encode_type", "--encode-type", default="", metavar="EXT",
                   help="format of encoded records (jpg, png, ...); empty keeps each file's bytes; implies --encoded")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    p.add_argument("--commit-every", "--commit_every", type=int, default=1000, metavar="N",
                   help="records per write transaction (default 1000, as Caffe)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output LMDB and keys file")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--num-shards", "--num_shards", metavar="N|auto",
                   help="convert one of N contiguous shards to OUT-IIIII-of-NNNNN.lmdb; 'auto' takes the shard "
                   "from RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or "
                   "SLURM_PROCID/SLURM_NTASKS")
    p.add_argument("--shard-index", "--shard_index", type=int, metavar="I", help="which shard, 0 <= I < N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "merge",
        help="merge shard LMDBs into one LMDB",
        description="Merge shard LMDBs (from `convert --num-shards`) into one LMDB whose records and keys file "
        "equal the unsharded conversion's. Example: caffe-lmdb merge 'train-*-of-00008.lmdb' -o train.lmdb",
    )
    p.add_argument("shards", nargs="+", metavar="SHARD", help="shard LMDBs, or glob patterns (quoted)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.lmdb", help="the merged LMDB to create")
    p.add_argument("--keys", metavar="FILE.npy", help="keys file (default: <out>_keys.npy beside the LMDB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

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
