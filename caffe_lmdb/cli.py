"""The `caffe-lmdb` command: argparse subcommands, each a thin call into the library.

Exit codes: 0 ok, 1 problems found (or the operation failed), 2 usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb

from . import __version__
from .allocator import set_heap_retention
from .conversion import convert_paths
from .encode import ConvertOptions
from .errors import CaffeLmdbError, InputError, describe_os_error
from .exporting import export
from .files import sidecar_path
from .grid_sheet import grid
from .inspection import info, verify
from .layout_migration import TARGET_RULES
from .mean import compute_mean
from .merging import merge
from .migration import migrate
from .prototxt import describe_prototxt_batches
from .reader import LAYOUTS
from .selftest import codec_roundtrip
from .serve_transform import transforms_from
from .served_lmdb import MAX_PIXELS
from .serving import DEFAULT_HOST, DEFAULT_PORT, serve
from .shards import find_shards
from .sources import IMAGE_EXTENSIONS

log = logging.getLogger("caffe_lmdb")

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2



def flag(value: str) -> bool:
    """gflags-style booleans, so Caffe command lines (`--gray=true`, `--shuffle=false`) work as-is."""
    lowered = value.lower()
    if lowered in ("1", "true", "t", "yes", "y"):
        return True
    if lowered in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


#: What a BOOL flag's `metavar` is, which `bind_bool_values` looks for.
BOOL = "BOOL"

#: The words a BOOL flag takes as its value when they follow it (`flag`'s).
_BOOL_WORDS = ("1", "true", "t", "yes", "y", "0", "false", "f", "no", "n")


def add_bool_flag(parser: argparse.ArgumentParser, *names: str, help: str) -> None:
    """A Caffe-style boolean: `--gray`, `--gray=true`, `--gray false`, in any position (`bind_bool_values`)."""
    parser.add_argument(*names, type=flag, nargs="?", const=True, default=False, metavar=BOOL, help=help)


def bool_flag_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a BOOL flag, in `parser` and its subcommands."""
    names = set()
    for action in parser._actions:
        if action.metavar == BOOL:
            names.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= bool_flag_names(sub)
    return names


def bind_bool_values(argv: Sequence[str], names: set[str]) -> list[str]:
    """`--encoded SRC OUT` read as `--encoded=true SRC OUT`: a bare BOOL flag takes only a true/false word after it.

    argparse gives an optional value (`nargs="?"`) the next argument whatever it is, so a flag
    written as Caffe users write it, before the paths, swallowed the first path. A BOOL flag
    followed by anything but one of `flag`'s words is bound to true here; `--gray=false` and
    `--gray false` keep working. Nothing after `--` is touched.
    """
    args = list(argv)
    bound = []
    for position, arg in enumerate(args):
        if arg == "--":
            return bound + args[position:]
        following = args[position + 1] if position + 1 < len(args) else None
        if arg in names and (following is None or following.lower() not in _BOOL_WORDS):
            arg += "=true"
        bound.append(arg)
    return bound


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert with `conversion.convert_paths`, which resolves the positional forms and the shard."""
    options = ConvertOptions(
        gray=args.gray,
        resize_height=args.resize_height,
        resize_width=args.resize_width,
        encoded=args.encoded,
        encode_type=args.encode_type,
        check_size=args.check_size,
        resize_backend=args.resize_backend,
        reencode_gray=args.reencode_gray,
        fast_resize=args.fast_resize,
    )
    results = convert_paths(
        args.paths, list_file=args.list, root=args.root, keys_path=args.keys, num_shards=args.num_shards,
        shard_index=args.shard_index, options=options, shuffle=args.shuffle, seed=args.seed, workers=args.workers,
        commit_every=args.commit_every, overwrite=args.overwrite, strict=args.strict,
        progress=False if args.quiet else None, append=args.append, extend_classes=args.extend_classes,
        resume=args.resume,
    )
    for result in results:
        print(result)
        if result.skipped:
            listed = sidecar_path(result.output, "skipped.txt")
            print(f"  {result.skipped} unreadable inputs skipped, listed in {listed}")
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge shard LMDBs (a list, or a glob) into one with `merge.merge`."""
    shards = [shard for pattern in args.shards for shard in find_shards(pattern)]
    print(merge(shards, args.output, keys_path=args.keys, overwrite=args.overwrite,
                      progress=False if args.quiet else None))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """Rewrite a pickle/msgpack LMDB as a Datum LMDB with `migrate.migrate` (never unpickling unsafely)."""
    print(migrate(args.old, args.new, keys_path=args.keys, overwrite=args.overwrite, dry_run=args.dry_run,
                  progress=False if args.quiet else None, layout=args.layout, targets=args.targets,
                  image=args.image, workers=args.workers))
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    """Round-trip every image of a folder through raw and encoded Datums and compare the pixels."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{folder}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    mismatches = 0
    for path in files:
        report = codec_roundtrip(path)
        mismatches += not report.ok
        print(f"{path.relative_to(folder)}: {report}")
    print(f"{len(files)} images, {len(files) - mismatches} round-tripped pixel-exact, {mismatches} mismatched")
    return EXIT_OK if mismatches == 0 else EXIT_PROBLEMS


def positive_int(value: str) -> int:
    """An argparse type for counts and sizes that must be at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an LMDB with `inspection.info`; exit 1 if some of its records are not Datums."""
    result = info(args.lmdb, keys_path=args.keys, sample=args.sample, seed=args.seed, layout=args.layout)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return EXIT_PROBLEMS if result.invalid else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every record and the keys file with `inspection.verify`; print each problem with its key."""
    report = verify(args.lmdb, keys_path=args.keys, decode=args.decode, progress=False if args.quiet else None,
                    layout=args.layout)
    for line in report.problem_lines():
        print(line)
    print(report)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def cmd_mean(args: argparse.Namespace) -> int:
    """Write Caffe's mean.binaryproto (and Normalize stats) with `mean.compute_mean`."""
    print(compute_mean(args.lmdb, args.output, json_path=args.json, progress=False if args.quiet else None))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write the records back as image files plus a list file with `export.export`."""
    result = export(args.lmdb, args.out_dir, overwrite=args.overwrite, progress=False if args.quiet else None,
                    layout=args.layout, image=args.image)
    for line in result.report_lines(args.lmdb):
        print(line)
    print(result)
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def cmd_grid(args: argparse.Namespace) -> int:
    """Save a contact sheet of random records with `grid_sheet.grid`; exit 1 if a sample was drawn broken."""
    result = grid(args.lmdb, args.output, n=args.n, seed=args.seed, keys_path=args.keys, tile=args.tile,
                  layout=args.layout)
    for line in result.problems:
        print(line)
    print(result)
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def cmd_loader(args: argparse.Namespace) -> int:
    """Print batches as they arrive: a prototxt's Data layer through `CaffeLoader`
    (`prototxt.describe_prototxt_batches`), or an LMDB through a DataLoader (`dataloader_check.loader_check`)."""
    if (args.lmdb is None) == (args.prototxt is None):
        raise InputError("give an LMDB or --prototxt FILE (one of them)")
    if args.prototxt is not None:
        lines = describe_prototxt_batches(args.prototxt, args.phase, args.batches, root=args.root, layer=args.layer,
                                          num_workers=args.workers)
    else:
        from .dataloader_check import loader_check  # torch: imported only by the command that needs it

        lines = loader_check(args.lmdb, keys_path=args.keys, batch_size=args.batch_size, size=args.size,
                             num_workers=args.workers)
    for line in lines:
        print(line, flush=True)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve LMDBs to a web browser with `serving.serve`, read-only, until Ctrl-C."""
    transforms = transforms_from(args.prototxt, args.layer, args.root, args.crop_size, args.mirror, args.mean_file,
                                 args.mean_value or (), args.scale)
    serve(args.lmdb, args.host, args.port, transforms=transforms, max_pixels=args.max_pixels,
          announce=lambda line: print(line, flush=True))
    print("caffe-lmdb serve: stopped", file=sys.stderr)
    return EXIT_OK


def port_number(value: str) -> int:
    """An argparse type for a TCP port: 0 (any free one) to 65535."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {number}")
    return number


# Over 100 lines: every command's options, declared in one place and in order, as `convert_imageset`
# declares its flags at the top; split up, a newcomer would look for them in several places.
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
    p.add_argument("--resize-backend", "--resize_backend", choices=("pillow", "opencv"), default="pillow",
                   help="pillow (default) or opencv: cv2.resize INTER_LINEAR, Caffe's own call, for pixel parity "
                   "(needs opencv-python-headless)")
    add_bool_flag(p, "--fast-resize", "--fast_resize",
                  help="with a resize, decode JPEGs at a DCT scale (at least twice the target) first: much faster "
                  "on big photos, pixels close to the full decode's (not Caffe's)")
    add_bool_flag(p, "--check_size", "--check-size", help="fail unless every image has the same size")
    add_bool_flag(p, "--encoded", help="store the image files' bytes (encoded Datums) instead of raw pixels")
    p.add_argument("--encode_type", "--encode-type", default="", metavar="EXT",
                   help="format of encoded records (jpg, png, ...); empty keeps each file's bytes; implies --encoded")
    add_bool_flag(p, "--reencode-gray", "--reencode_gray",
                  help="with --encoded --gray, store colour files re-encoded as gray images (Caffe keeps their bytes)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: CPU count; 0 converts in this process)")
    p.add_argument("--commit-every", "--commit_every", type=int, default=1000, metavar="N",
                   help="most records per write transaction (default 1000, as Caffe); a transaction also "
                   "ends at 4 MiB of records, so large raw records commit more often")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output LMDB and keys file")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--append", action="store_true",
                   help="add the images after an existing LMDB's records, line ids continued (needs its keys file)")
    p.add_argument("--extend-classes", "--extend_classes", action="store_true",
                   help="with --append, add classes the LMDB lacks to the end of its class list")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run (same arguments) from its last committed record instead of restarting")
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
        "migrate",
        help="rewrite a pickle/msgpack LMDB (Efficient-PyTorch folder2lmdb, LMDB_Image), or any other layout "
        "(LSUN, ...), as a Datum LMDB, safely",
        description="Rewrite an LMDB of pickled or msgpack records (Efficient-PyTorch folder2lmdb, the LMDB_Image "
        "recipe) as Caffe Datum records plus a .npy keys file. Pickles are read by a restricted unpickler "
        "(builtin containers, numpy arrays, LMDB_Image only): a record naming anything else is refused, and "
        "nothing is written. Any other layout the readers know (LSUN, ...; --layout forces one) is brought over "
        "sample by sample: encoded images stored unchanged, text targets to a classes or texts file (--targets), "
        "one image of a pair (--image). Example: caffe-lmdb migrate train_old.lmdb train.lmdb --dry-run",
    )
    p.add_argument("old", metavar="OLD.lmdb", help="the pickle/msgpack LMDB to read (never modified)")
    p.add_argument("new", metavar="NEW.lmdb", help="the Datum LMDB to create")
    p.add_argument("--keys", metavar="FILE.npy", help="keys file (default: <new>_keys.npy beside the LMDB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output LMDB and keys file")
    p.add_argument("--dry-run", action="store_true",
                   help="print the detected format, record count and a sample record; write nothing")
    p.add_argument("--layout", metavar="NAME", help="read OLD as this layout (default: detected; "
                   f"known: {', '.join(layout.name for layout in LAYOUTS)})")
    p.add_argument("--targets", choices=TARGET_RULES, default="auto",
                   help="text targets: classes (<new>_classes.txt, label = class number) or texts (<new>_texts.txt, "
                   "one escaped line per record, label 0); auto: classes for category names (LSUN), else texts")
    p.add_argument("--image", type=int, metavar="INDEX",
                   help="for layouts holding several images per sample (pairs): store image INDEX of each")
    p.add_argument("-j", "--workers", type=int, metavar="N", help="processes making records (default: one per CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "selftest",
        help="round-trip a folder of images through the Datum codec",
        description="Round-trip every image of FOLDER through raw and encoded Datums and compare pixels. "
        "Example: caffe-lmdb selftest img/train",
    )
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.set_defaults(func=cmd_selftest)

    keys_help = "keys file (default: <stem>_keys.npy beside the LMDB if present, else keys are scanned)"
    layout_help = (f"read the LMDB as this layout (default: detected; known: {', '.join(x.name for x in LAYOUTS)}); "
                   "layouts other than datum: the sample count and a sample's kinds (info), every sample read (verify)")
    p = sub.add_parser(
        "info",
        help="summarise an LMDB: record kinds, sizes, labels, disk use, key range",
        description="Summarise a Datum LMDB without decoding any image: records, raw vs encoded, "
        "channels x height x width and label histograms (class names from <stem>_classes.txt), bytes on "
        "disk, first and last key. Exit 1 if some records are not Datums. Example: caffe-lmdb info img/train.lmdb",
    )
    p.add_argument("lmdb", metavar="LMDB", help="the LMDB (a directory with data.mdb, or a single file)")
    p.add_argument("--keys", metavar="FILE.npy", help=keys_help)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (every histogram row)")
    p.add_argument("--sample", type=positive_int, metavar="N",
                   help="count only N records drawn at random from the keys: a quick estimate on big LMDBs")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument("--layout", metavar="NAME", help=layout_help)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check every record and the keys file; exit 1 on any problem",
        description="Parse every record, check its data size against its dims, compare the keys file with the "
        "LMDB (missing and extra keys named) and, with --decode, decode every encoded image. Each problem is "
        "printed with its key; exit 1 if there is any. Example: caffe-lmdb verify img/train.lmdb --decode",
    )
    p.add_argument("lmdb", metavar="LMDB", help="the LMDB to check")
    p.add_argument("--keys", metavar="FILE.npy",
                   help="keys file to compare with the LMDB (default: <stem>_keys.npy beside the LMDB if present)")
    p.add_argument("--decode", action="store_true", help="also decode every encoded image (slower)")
    p.add_argument("--layout", metavar="NAME", help=layout_help)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "mean",
        help="compute the mean image as Caffe's compute_image_mean (mean.binaryproto)",
        description="Write what Caffe's compute_image_mean writes: a BlobProto (num=1, channels, height, width) "
        "holding the per-pixel mean in Datum order (BGR, CxHxW), and print one mean value per channel. Every "
        "record must have the same size. Example: caffe-lmdb mean train.lmdb -o mean.binaryproto --json stats.json",
    )
    p.add_argument("lmdb", metavar="LMDB", help="the LMDB to average")
    p.add_argument("-o", "--output", required=True, metavar="MEAN.binaryproto", help="the mean file to write")
    p.add_argument("--json", metavar="STATS.json",
                   help="also write per-channel mean and std, RGB order, scaled to [0,1] (for Normalize)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mean)

    p = sub.add_parser(
        "export",
        help="write the records back as image files in class folders, plus a Caffe list file",
        description="Write every record to OUT_DIR/<class>/<name> (PNG for raw records, the stored bytes for "
        "encoded ones) and OUT_DIR/list.txt, from which `convert --list` rebuilds identical Datums. Names come "
        "from the keys, sanitised so that nothing lands outside OUT_DIR. An LMDB of another layout (LSUN, CRNN, ...) "
        "is exported sample by sample: stored images as they are, labels by migrate's rule, OCR texts in "
        "OUT_DIR/texts.txt. Example: caffe-lmdb export img/train.lmdb exported/",
    )
    p.add_argument("lmdb", metavar="LMDB", help="the LMDB to export")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write into (created if needed)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in OUT_DIR")
    p.add_argument("--layout", metavar="NAME", help=f"read the LMDB as this layout (default: detected; known: "
                   f"{', '.join(x.name for x in LAYOUTS)}); layouts other than datum: each sample's stored image, "
                   "list labels by migrate's rule, OCR texts in OUT_DIR/texts.txt")
    p.add_argument("--image", type=int, metavar="INDEX",
                   help="for layouts holding several images per sample (pairs): export image INDEX of each")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "grid",
        help="save a contact sheet of random records with their labels",
        description="Draw N random records in a grid, each captioned with its label (and class name when "
        "<stem>_classes.txt is there): the quickest way to spot BGR/RGB or label mistakes. Any other layout "
        "(LSUN, CRNN, ...) shows its samples captioned with their targets, an unreadable one as a broken tile. "
        "Example: caffe-lmdb grid img/train.lmdb -o samples.png --n 16",
    )
    p.add_argument("lmdb", metavar="LMDB", help="the LMDB to sample")
    p.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the image to write (e.g. samples.png)")
    p.add_argument("--n", type=positive_int, default=64, help="records to show (default 64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; same seed, same records)")
    p.add_argument("--tile", type=positive_int, default=128, metavar="PX", help="tile side in pixels (default 128)")
    p.add_argument("--keys", metavar="FILE.npy", help=keys_help)
    p.add_argument("--layout", metavar="NAME", help=f"read the LMDB as this layout (default: detected; known: "
                   f"{', '.join(x.name for x in LAYOUTS)}); layouts other than datum: samples captioned with their "
                   "targets, an unreadable one drawn as a broken tile and listed (exit 1)")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser(
        "loader",
        help="iterate an LMDB through a DataLoader, or a net prototxt's Data layer through CaffeLoader",
        description="With an LMDB, the loader check: read every record through LmdbDataset_train and a "
        "DataLoader (images resized to SIZE x SIZE, H x W x C uint8 tensors), printing `key N` per sample and "
        "the batch's torch.Size per batch. With --prototxt, feed the net's Data layer for --phase as Caffe "
        "would (its source, batch_size and transform_param) through CaffeLoader, printing the layer, the "
        "transform, each batch's shapes and the first batch's per-channel mean. "
        "Example: caffe-lmdb loader img/train.lmdb, or caffe-lmdb loader --prototxt train_val.prototxt --phase TEST",
    )
    p.add_argument("lmdb", metavar="LMDB", nargs="?", help="the LMDB to read (or give --prototxt)")
    p.add_argument("--keys", metavar="FILE.npy", help=keys_help)
    p.add_argument("--batch-size", "--batch_size", type=positive_int, default=2, help="samples per batch (default 2)")
    p.add_argument("--size", type=positive_int, default=224, help="side images are resized to (default 224)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 0 = none)")
    p.add_argument("--prototxt", metavar="FILE", help="a net prototxt (train_val.prototxt): read its Data layer")
    p.add_argument("--phase", type=str.upper, choices=("TRAIN", "TEST"), default="TRAIN",
                   help="the phase whose Data layer is read (default TRAIN)")
    p.add_argument("--root", metavar="DIR", help="folder the layer's relative source and mean_file are resolved "
                   "against (default: the working directory, as Caffe)")
    p.add_argument("--layer", metavar="NAME", help="the Data layer to read when the phase has several")
    p.add_argument("--batches", type=int, default=2, help="batches to print with --prototxt (default 2)")
    p.set_defaults(func=cmd_loader)

    p = sub.add_parser(
        "serve",
        help="look inside LMDBs in a web browser: overview, gallery, records, problems, the transform (read-only)",
        description="Start a local web app showing LMDBs (or every LMDB under a folder): an overview (counts by "
        "kind, shapes, label histogram with class names), a paged gallery of thumbnails (filter by class, jump to "
        "an index, search by key), each record (image, key, shape, label, float_data, downloads), the problems "
        "verify finds, and what a net is fed through the transform. Any layout LmdbDataset reads is shown. The "
        "LMDBs are opened read-only without a lock file. Listens on 127.0.0.1; another --host needs the token "
        "printed in the URL. Ctrl-C stops it. Example: caffe-lmdb serve img/train.lmdb img/val.lmdb",
    )
    p.add_argument("lmdb", metavar="LMDB", nargs="+", help="LMDBs, or folders holding LMDBs")
    p.add_argument("--host", default=DEFAULT_HOST, metavar="ADDR",
                   help=f"address to listen on (default {DEFAULT_HOST}; any other needs the printed token)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--prototxt", metavar="FILE",
                   help="a net prototxt (train_val.prototxt): its Data layers' transform_param for the transform page")
    p.add_argument("--layer", metavar="NAME", help="the Data layer to take with --prototxt (default: the first)")
    p.add_argument("--root", metavar="DIR", help="folder the prototxt's relative mean_file is resolved against "
                   "(default: the working directory, as Caffe)")
    p.add_argument("--crop-size", "--crop_size", type=int, default=0, metavar="N",
                   help="without --prototxt: crop_size of the transform page (0: no crop)")
    add_bool_flag(p, "--mirror", help="without --prototxt: mirror, as transform_param's")
    p.add_argument("--mean-file", "--mean_file", metavar="FILE",
                   help="without --prototxt: a mean.binaryproto to subtract")
    p.add_argument("--mean-value", "--mean_value", type=float, nargs="+", metavar="V",
                   help="without --prototxt: mean values (one, or one per channel in B G R order)")
    p.add_argument("--scale", type=float, default=1.0, help="without --prototxt: scale (default 1)")
    p.add_argument("--max-pixels", "--max_pixels", type=positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"images over N pixels are not decoded, a placeholder says so (default {MAX_PIXELS})")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, for in-process tests."""
    parser = build_parser()
    argv = bind_bool_values(sys.argv[1:] if argv is None else argv, bool_flag_names(parser))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InputError as exc:
        print(f"caffe-lmdb {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `caffe-lmdb info ... | head`: the reader left, nothing is wrong
        with contextlib.suppress(OSError, ValueError):  # as the Python docs advise: no flush error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except CaffeLmdbError as exc:
        print(f"caffe-lmdb {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except OSError as exc:  # a file operation no library call named itself: the error names the file
        print(f"caffe-lmdb {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_PROBLEMS
    except lmdb.Error as exc:  # last resort: LMDB's own errors carry no path; the command's input is the LMDB
        target = getattr(args, "lmdb", None) or getattr(args, "old", None) or ""
        print(f"caffe-lmdb {args.command}: error: {target}{': ' if target else ''}LMDB error: {exc}",
              file=sys.stderr)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        print(f"caffe-lmdb {args.command}: interrupted", file=sys.stderr)
        return 130


def run(argv: Sequence[str] | None = None) -> None:
    """The `caffe-lmdb` program (and `tools/*.py`): `main`, in a process that is ours to tune, then exit.

    Only here, never in a library call, is glibc's heap retention set for the whole process
    (`allocator.set_heap_retention`): the process ends with the command, so nothing is left changed
    behind a caller's back, and the writer reuses freed memory as the worker processes do.
    """
    set_heap_retention()
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
