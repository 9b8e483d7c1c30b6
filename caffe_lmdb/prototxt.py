"""Caffe net prototxts: the Data layers a phase builds, and a `CaffeLoader` that feeds what they feed.

A `train_val.prototxt` already says how a model was fed: the LMDB, the batch size, the crop, the
mirror, the mean and the scale. `loader_from_prototxt` reads those from the net itself, so the
batches match the ones Caffe made, without copying numbers by hand. The rules are Caffe's own:

* Which layers a phase builds is `Net::FilterNet`: a layer with no `include`/`exclude` rule is
  in every phase; with rules, it is in when one `include` rule matches the net's state (or no
  `exclude` rule does). A rule matches when each thing it sets matches: `phase`, `min_level` /
  `max_level` against the state's level, every `stage` present and no `not_stage`. The state is
  the phase asked for, `level` (as given; else a solver's `train_state`/`test_state` level; else
  0, the `caffe` tool's default) and the stages of the prototxt's `state { stage: ... }`, a
  solver's state and those given.
* A layer's own `phase: TEST` field does not filter it (Caffe builds the layer in either net);
  it is the phase the layer then runs in, so it decides the crop (centre, not random) even in
  the TRAIN net. `DataLayerSpec.phase` is that effective phase.
* Only layers of type "Data" are read (the legacy `layers { type: DATA }` form too; its
  deprecated `data_param { scale mean_file crop_size mirror }` are moved into the transform as
  Caffe's `UpgradeNetDataTransformation` does). A new-style layer's deprecated `data_param`
  transform fields are ignored, as Caffe ignores them.
* Backend. `backend: LEVELDB` is refused ("LEVELDB is not supported: convert it to LMDB"). The
  field's default is LEVELDB, but real nets (the model zoo's, and `convert_imageset` users')
  write `backend: LMDB`; a layer without the field whose source is an LMDB folder (a
  `data.mdb` inside) is read as the LMDB it plainly is, with no warning; a layer without the
  field whose source is anything else gets the LEVELDB error. A source that is a single LMDB
  file is refused too: Caffe opens an LMDB folder.
* Relative `source`, `mean_file` and a solver's `net` are relative to the working directory,
  as for the `caffe` tool (which runs from the Caffe root), or to `root` when given. When the
  path is missing there but exists beside the prototxt, the error says so.
* A solver prototxt is accepted in place of a net: its train net for TRAIN (`train_net_param`,
  `train_net`, `net_param`, `net`), its first test net for TEST (`test_net_param`, `test_net`,
  then `net_param` / `net`), with the solver's `train_state` / `test_state` stages.

The loader follows Caffe's reading order too: records in key order (the LMDB's sorted order;
if the converter's keys file lists them otherwise, a sampler puts them back in key order),
unless `shuffle` or a `sampler` is given. One difference remains: Caffe's reader wraps around
at the end of the LMDB, so its batches straddle epochs, while the loader's epoch ends with a
short batch (or none with `drop_last=True`).

Every problem is a `PrototxtError` (an `InputError`) of one line naming the prototxt and the
layer (with its line when it can be found): a parse error (`file:line:column`), no Data layer
for the phase, a missing source or mean file, a LEVELDB backend.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import text_format

from .errors import InputError, PrototxtError, describe_os_error
from .proto import caffe_pb2
from .sources import special_kind
from .tool_reading import keys_file_for
from .transform import CaffeTransform

if TYPE_CHECKING:
    from .loader import CaffeLoader

PHASES = ("TRAIN", "TEST")

#: Input layers other than "Data", named when a phase has no Data layer (caffe-lmdb reads none of them).
_OTHER_INPUTS = frozenset({
    "ImageData", "HDF5Data", "Input", "MemoryData", "DummyData", "WindowData", "Python", "AnnotatedData",
})
#: V1 layer types that are inputs, by their new-style names.
_V1_NAMES = {
    caffe_pb2.V1LayerParameter.DATA: "Data",
    caffe_pb2.V1LayerParameter.IMAGE_DATA: "ImageData",
    caffe_pb2.V1LayerParameter.HDF5_DATA: "HDF5Data",
    caffe_pb2.V1LayerParameter.MEMORY_DATA: "MemoryData",
    caffe_pb2.V1LayerParameter.DUMMY_DATA: "DummyData",
    caffe_pb2.V1LayerParameter.WINDOW_DATA: "WindowData",
}
_LEGACY_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


@dataclass(frozen=True)
class DataLayerSpec:
    """One Data layer of a net, for one phase: where it reads, how many, and its transformation.

    Attributes:
        prototxt: the net prototxt the layer is in.
        name: the layer's name.
        line: the line of the prototxt where the layer starts, when it could be found.
        phase: "TRAIN" or "TEST": the phase the layer runs in (its own `phase` field, else the net's).
        source: the LMDB, resolved (see the module docstring); checked to be an LMDB folder unless
            `data_layers(..., check_files=False)`.
        source_text: `source` as the prototxt writes it.
        batch_size: records per batch.
        backend_given: whether the layer says `backend: LMDB` (False: read as an LMDB because it is one).
        crop_size, mirror, mean_file, mean_value, scale, force_color, force_gray: the layer's
            `transform_param` (`mean_file` resolved like `source`).
        data_param, transform_param: the layer's messages, as parsed (the V1 form upgraded).
    """

    prototxt: Path
    name: str
    line: int | None
    phase: str
    source: Path
    source_text: str
    batch_size: int
    backend_given: bool
    crop_size: int
    mirror: bool
    mean_file: Path | None
    mean_value: tuple[float, ...]
    scale: float
    force_color: bool
    force_gray: bool
    data_param: Any = field(compare=False, repr=False)
    transform_param: Any = field(compare=False, repr=False)

    def transform(self, **overrides: Any) -> CaffeTransform:
        """The `CaffeTransform` this layer applies (BGR, as Caffe's blob); `overrides` change its arguments.

        Raises:
            TransformError, MeanError: as `CaffeTransform` (e.g. a mean file that is not a BlobProto).
        """
        arguments: dict[str, Any] = {
            "crop_size": self.crop_size, "mirror": self.mirror, "mean_file": self.mean_file,
            "mean_value": self.mean_value, "scale": self.scale, "phase": self.phase.lower(),
            "force_color": self.force_color, "force_gray": self.force_gray,
        }
        arguments.update(overrides)
        return CaffeTransform(**arguments)

    def where(self) -> str:
        """`net.prototxt:12: layer "data"`: how messages about this layer begin."""
        return _where(self.prototxt, self.line, self.name)

    def __str__(self) -> str:
        parts = transform_param_summary(self)
        parts += [flag for flag in ("force_color", "force_gray") if getattr(self, flag)]
        return (f"{self.where()} ({self.phase}): {self.source} (LMDB), batch_size {self.batch_size}, "
                + ", ".join(parts))


def transform_param_summary(param: Any) -> list[str]:
    """How messages show a transform: `crop_size 227`, `mirror`, `mean_file ...`, `mean_value ...`, `scale ...`.

    For anything with those five attributes: a Data layer's `transform_param`, a `CaffeTransform`.
    """
    parts = [f"crop_size {param.crop_size}" if param.crop_size else "no crop"]
    if param.mirror:
        parts.append("mirror")
    if param.mean_file is not None:
        parts.append(f"mean_file {param.mean_file}")
    if len(param.mean_value):
        parts.append("mean_value " + " ".join(f"{v:g}" for v in param.mean_value))
    if param.scale != 1:
        parts.append(f"scale {param.scale:g}")
    return parts


# --------------------------------------------------------------------------- reading prototxts

def _read_text(path: Path) -> str:
    """The prototxt's text. Only a regular file is read: a FIFO would wait for a writer and /dev/zero never ends.

    The file is opened without blocking, then the opened descriptor is checked (as list files and
    images are, `sources.special_kind`), so what is checked is what is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PrototxtError(describe_os_error(exc, path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise PrototxtError(f"{path}: is a directory")
        kind = special_kind(mode)
        if kind is not None:
            raise PrototxtError(f"{path}: not a regular file ({kind}); a prototxt is a text file")
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as exc:
        raise PrototxtError(describe_os_error(exc, path)) from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrototxtError(
            f"{path}: not a text prototxt (byte {exc.start} is not UTF-8; a binary .caffemodel or "
            ".binaryproto?)"
        ) from None


def _parse_error(path: Path, exc: text_format.ParseError) -> str:
    reason = re.sub(r"^\d+:\d+ : ", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "parse error")
    if reason.startswith("'") and "': " in reason:  # some errors quote the whole line first: the number says it
        reason = reason.split("': ", 1)[1]
    line, column = exc.GetLine(), exc.GetColumn()
    if line is None:
        return f"{path}: {reason}"
    return f"{path}:{line}:{column}: {reason}"


def _resolve(text: str, base: Path) -> Path:
    return base / text  # an absolute `text` stays as it is


def _missing(what: str, text: str, resolved: Path, prototxt: Path, root: Path | None) -> str:
    """`source examples/x_lmdb (/cwd/examples/x_lmdb) does not exist`, with a hint when it is beside the prototxt."""
    shown = text if text == os.fspath(resolved) else f"{text} ({resolved})"
    message = f"{what} {shown} does not exist"
    if not Path(text).is_absolute():
        beside = prototxt.parent / text
        if beside.exists() and beside.resolve() != resolved.resolve():
            relative_to = "root" if root is not None else "the working directory"
            message += (f"; relative paths are relative to {relative_to}, and {beside} exists: "
                        f"run from {prototxt.parent} or pass root={os.fspath(prototxt.parent)!r}")
    return message


def _layer_lines(text: str, names: tuple[str, ...]) -> dict[str, list[int]]:
    """The line of each top-level `layer` / `layers` field, in order, skipping strings and comments."""
    lines: dict[str, list[int]] = {name: [] for name in names}
    depth, line, i, n = 0, 1, 0, len(text)
    while i < n:
        char = text[i]
        if char == "\n":
            line += 1
        elif char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif char in "\"'":
            j = i + 1
            while j < n and text[j] != char and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        elif char in "{<":
            depth += 1
        elif char in "}>":
            depth -= 1
        elif depth == 0 and (char.isalpha() or char == "_"):
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if word in lines:
                lines[word].append(line)
            i = j
            continue
        i += 1
    return lines


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _where(prototxt: Path, line: int | None, name: str) -> str:
    return f'{prototxt}:{line}: layer "{name}"' if line is not None else f'{prototxt}: layer "{name}"'


@dataclass
class _Net:
    """A parsed net and what locating its layers needs."""

    path: Path
    param: Any
    lines: dict[str, list[int]]
    stages: list[str]
    level: int | None


def _check_phase(phase: str) -> str:
    if not isinstance(phase, str) or phase.upper() not in PHASES:
        raise InputError(f"phase must be TRAIN or TEST, got {phase!r}")
    return phase.upper()


def _load_net(path: Path, phase: str, base: Path, root: Path | None, *, solver_ok: bool = True) -> _Net:
    """The net of a net prototxt, or (`solver_ok`) the phase's net of a solver prototxt."""
    text = _read_text(path)
    try:
        net = text_format.Parse(text, caffe_pb2.NetParameter())
    except text_format.ParseError as net_error:
        solver = caffe_pb2.SolverParameter()
        try:
            text_format.Parse(text, solver)
        except text_format.ParseError as solver_error:
            unknown = re.search(r'"caffe\.NetParameter" has no field named "(\w+)"', str(net_error))
            is_solver = unknown is not None and unknown[1] in solver.DESCRIPTOR.fields_by_name
            raise PrototxtError(_parse_error(path, solver_error if is_solver else net_error)) from None
        if not solver_ok:
            raise PrototxtError(f"{path}: a solver prototxt where a net prototxt was expected") from None
        return _solver_net(path, solver, phase, base, root)
    return _Net(path, net, _layer_lines(text, ("layer", "layers")), list(net.state.stage), None)


def _solver_net(path: Path, solver: Any, phase: str, base: Path, root: Path | None) -> _Net:
    """The train net (TRAIN) or first test net (TEST) of a solver, in Caffe's order of precedence."""
    if phase == "TRAIN":
        inline = [solver.train_net_param] if solver.HasField("train_net_param") else []
        files = [solver.train_net] if solver.HasField("train_net") else []
        state = solver.train_state if solver.HasField("train_state") else None
    else:
        inline, files = list(solver.test_net_param), list(solver.test_net)
        state = solver.test_state[0] if len(solver.test_state) else None
    if not inline and not files:
        inline = [solver.net_param] if solver.HasField("net_param") else []
        files = [solver.net] if solver.HasField("net") else []
    stages = list(state.stage) if state is not None else []
    level = state.level if state is not None and state.HasField("level") else None
    if inline:
        net = inline[0]
        return _Net(path, net, {}, list(net.state.stage) + stages, level)
    if not files:
        which = "train_net, train_net_param, net or net_param" if phase == "TRAIN" else \
            "test_net, test_net_param, net or net_param"
        raise PrototxtError(f"{path}: solver prototxt names no {phase} net (no {which})")
    resolved = _resolve(files[0], base)
    if not resolved.exists():
        raise PrototxtError(f"{path}: " + _missing("net", files[0], resolved, path, root))
    loaded = _load_net(resolved, phase, base, root, solver_ok=False)
    loaded.stages += stages
    loaded.level = level
    return loaded


# --------------------------------------------------------------------------- layers and rules

@dataclass
class _Layer:
    """A layer of either form (new `layer`, legacy V1 `layers`), as far as choosing Data layers goes."""

    name: str
    type: str
    line: int | None
    include: Sequence[Any]
    exclude: Sequence[Any]
    phase: str | None
    data_param: Any
    transform_param: Any


def _layers(net: _Net) -> list[_Layer]:
    param = net.param
    if len(param.layer) and len(param.layers):
        raise PrototxtError(f"{net.path}: the net has both `layer` and legacy `layers` fields: use one form")
    layers: list[_Layer] = []
    lines = net.lines.get("layer", [])
    lines = lines if len(lines) == len(param.layer) else [None] * len(param.layer)
    for index, (layer, line) in enumerate(zip(param.layer, lines, strict=True)):
        name = layer.name or f"#{index}"
        layers.append(_Layer(
            name, layer.type, line, layer.include, layer.exclude,
            caffe_pb2.Phase.Name(layer.phase) if layer.HasField("phase") else None,
            layer.data_param if layer.HasField("data_param") else None, layer.transform_param,
        ))
    lines = net.lines.get("layers", [])
    lines = lines if len(lines) == len(param.layers) else [None] * len(param.layers)
    for index, (layer, line) in enumerate(zip(param.layers, lines, strict=True)):
        name = layer.name or f"#{index}"
        if layer.HasField("layer"):
            raise PrototxtError(
                f"{_where(net.path, line, name)}: the V0 layer format (`layers {{ layer {{ ... }} }}`) is not "
                "read: upgrade the prototxt with Caffe's upgrade_net_proto_text"
            )
        type_name = _V1_NAMES.get(layer.type, caffe_pb2.V1LayerParameter.LayerType.Name(layer.type))
        transform = caffe_pb2.TransformationParameter()
        transform.CopyFrom(layer.transform_param)
        data = None
        if layer.HasField("data_param"):
            data = caffe_pb2.DataParameter()
            data.CopyFrom(layer.data_param)
            if layer.type == caffe_pb2.V1LayerParameter.DATA:  # Caffe's UpgradeNetDataTransformation
                for name_ in _LEGACY_TRANSFORM_FIELDS:
                    if data.HasField(name_):
                        setattr(transform, name_, getattr(data, name_))
                        data.ClearField(name_)
        layers.append(_Layer(name, type_name, line, layer.include, layer.exclude, None, data, transform))
    return layers


def _meets(rule: Any, phase: str, level: int, stages: set[str]) -> bool:
    """Caffe's `StateMeetsRule`."""
    if rule.HasField("phase") and caffe_pb2.Phase.Name(rule.phase) != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    return all(stage in stages for stage in rule.stage) and not any(stage in stages for stage in rule.not_stage)


def _included(layer: _Layer, path: Path, phase: str, level: int, stages: set[str]) -> bool:
    """Caffe's `FilterNet` for one layer."""
    if len(layer.include) and len(layer.exclude):
        raise PrototxtError(
            f"{_where(path, layer.line, layer.name)}: has both include and exclude rules (Caffe refuses that)"
        )
    included = not len(layer.include)
    if any(_meets(rule, phase, level, stages) for rule in layer.exclude):
        included = False
    if any(_meets(rule, phase, level, stages) for rule in layer.include):
        included = True
    return included


def _is_lmdb_folder(path: Path) -> bool:
    return path.is_dir() and (path / "data.mdb").is_file()


def _check_source(where: str, layer: _Layer, spec_source: Path, text: str, prototxt: Path,
                  root: Path | None, check_files: bool) -> bool:
    """Refuse LEVELDB and non-LMDB sources; returns whether `backend: LMDB` was written."""
    data = layer.data_param
    given = data.HasField("backend")
    leveldb = data.backend == caffe_pb2.DataParameter.LEVELDB
    if given and leveldb:
        if check_files and _is_lmdb_folder(spec_source):
            raise PrototxtError(f"{where}: backend: LEVELDB, but {spec_source} is an LMDB: write `backend: LMDB` "
                                "(LEVELDB is not supported)")
        raise PrototxtError(f"{where}: backend: LEVELDB ({text}): LEVELDB is not supported: convert it to LMDB")
    if not check_files:
        return given
    if not spec_source.exists():
        raise PrototxtError(f"{where}: " + _missing("source", text, spec_source, prototxt, root))
    if _is_lmdb_folder(spec_source):
        return given
    if not given:
        kind = ("a file, not an LMDB folder" if spec_source.is_file() else
                "a LevelDB" if (spec_source / "CURRENT").is_file() else "not an LMDB (no data.mdb in it)")
        raise PrototxtError(
            f"{where}: {spec_source} is {kind}, and a layer without `backend: LMDB` is LEVELDB (Caffe's "
            "default): LEVELDB is not supported: convert it to LMDB"
        )
    if spec_source.is_dir():
        raise PrototxtError(f"{where}: source {spec_source} is not an LMDB (no data.mdb in the folder)")
    raise PrototxtError(f"{where}: source {spec_source} is a file; Caffe opens an LMDB folder (holding data.mdb)")


def _spec(net: _Net, layer: _Layer, phase: str, base: Path, root: Path | None, check_files: bool) -> DataLayerSpec:
    where = _where(net.path, layer.line, layer.name)
    data = layer.data_param
    if data is None or not data.source:
        raise PrototxtError(f"{where}: no data_param source (the LMDB to read)")
    if not data.batch_size:
        raise PrototxtError(f"{where}: data_param batch_size is missing or 0")
    source = _resolve(data.source, base)
    backend_given = _check_source(where, layer, source, data.source, net.path, root, check_files)
    transform = layer.transform_param
    mean_file = None
    if transform.mean_file:
        if len(transform.mean_value):
            raise PrototxtError(f"{where}: transform_param has both mean_file and mean_value (Caffe refuses that)")
        mean_file = _resolve(transform.mean_file, base)
        if check_files and not mean_file.is_file():
            raise PrototxtError(f"{where}: " + _missing("mean_file", transform.mean_file, mean_file, net.path, root))
    if transform.force_color and transform.force_gray:
        raise PrototxtError(f"{where}: transform_param sets both force_color and force_gray")
    return DataLayerSpec(
        prototxt=net.path, name=layer.name, line=layer.line, phase=layer.phase or phase, source=source,
        source_text=data.source, batch_size=int(data.batch_size), backend_given=backend_given,
        crop_size=int(transform.crop_size), mirror=bool(transform.mirror), mean_file=mean_file,
        mean_value=tuple(float(v) for v in transform.mean_value), scale=float(transform.scale),
        force_color=bool(transform.force_color), force_gray=bool(transform.force_gray),
        data_param=data, transform_param=transform,
    )


def _no_data_layer(net: _Net, layers: list[_Layer], phase: str, level: int, stages: set[str]) -> str:
    message = f"{net.path}: no Data layer for phase {phase}"
    data = [layer.name for layer in layers if layer.type == "Data"]
    if data:
        which = f'Data layer "{data[0]}" is' if len(data) == 1 else f"Data layers {_quoted(data)} are"
        return message + f" (its {which} not in the {phase} net)"
    others = [f'{layer.type} layer "{layer.name}"' for layer in layers
              if layer.type in _OTHER_INPUTS and _included(layer, net.path, phase, level, stages)]
    if others:
        return message + f"; it reads its input through {', '.join(others)}, which caffe-lmdb does not read"
    return message + (" (the net has no layers)" if not layers else "")


# --------------------------------------------------------------------------- the API

def data_layers(
    path: str | os.PathLike,
    phase: str = "TRAIN",
    *,
    root: str | os.PathLike | None = None,
    level: int | None = None,
    stages: Sequence[str] = (),
    check_files: bool = True,
) -> list[DataLayerSpec]:
    """The Data layers of a net (or solver) prototxt that the `phase` net builds, in prototxt order.

    Args:
        path: a net prototxt (train_val.prototxt) or a solver prototxt naming one.
        phase: "TRAIN" or "TEST" (any case).
        root: the folder relative `source`, `mean_file` and solver `net` paths are relative to;
            None: the working directory, as for Caffe.
        level, stages: the rest of the net's state, for include/exclude rules that use them: the
            level (None: a solver's train_state/test_state level, else 0) and stages added to
            those of the prototxt's `state` (and a solver's state).
        check_files: check that each source is an LMDB folder and each mean file exists. With
            False nothing is looked at on disk: `backend: LEVELDB` is still refused, and a layer
            without `backend` is taken to be an LMDB.

    Raises:
        PrototxtError: the prototxt cannot be read or parsed, its phase net has no Data layer, or
            a Data layer is unusable (no source or batch size, LEVELDB, a missing LMDB or mean
            file, both mean_file and mean_value, both force_color and force_gray).
        InputError: `phase` is not TRAIN or TEST.
    """
    phase = _check_phase(phase)
    prototxt = Path(path)
    base = Path(root) if root is not None else Path.cwd()
    root_path = Path(root) if root is not None else None
    net = _load_net(prototxt, phase, base, root_path)
    state_level = int(level) if level is not None else net.level if net.level is not None else 0
    state_stages = set(net.stages) | set(stages)
    layers = _layers(net)
    chosen = [layer for layer in layers
              if layer.type == "Data" and _included(layer, net.path, phase, state_level, state_stages)]
    if not chosen:
        raise PrototxtError(_no_data_layer(net, layers, phase, state_level, state_stages))
    return [_spec(net, layer, phase, base, root_path, check_files) for layer in chosen]


def data_layer(
    path: str | os.PathLike,
    phase: str = "TRAIN",
    *,
    layer: str | None = None,
    root: str | os.PathLike | None = None,
    level: int | None = None,
    stages: Sequence[str] = (),
) -> DataLayerSpec:
    """The phase's Data layer named `layer`, or its first one (`data_layers` for the rest).

    Raises:
        PrototxtError: as `data_layers`, or no Data layer of that name in the phase's net.
    """
    specs = data_layers(path, phase, root=root, level=level, stages=stages)
    if layer is None:
        return specs[0]
    for spec in specs:
        if spec.name == layer:
            return spec
    raise PrototxtError(f'{specs[0].prototxt}: no Data layer "{layer}" in the {phase.upper()} net '
                        f"(it has {_quoted(spec.name for spec in specs)})")


def loader_for(spec: DataLayerSpec, *, shuffle: bool = False, **loader_options: Any) -> CaffeLoader:
    """A `CaffeLoader` feeding what `spec`'s layer feeds: its LMDB, batch size and transform, in key order.

    `loader_options` go to `CaffeLoader` (num_workers, device, seed, output, sampler, drop_last, worker_options, ...).

    Raises:
        TransformError, MeanError: the layer's transform is refused (e.g. a mean file that is not
            a BlobProto, mean values that do not fit the records).
        LmdbFormatError, CorruptLmdbError, KeysFileError: the LMDB cannot be read.
    """
    from .dataset import LmdbDataset_train
    from .loader import CaffeLoader

    dataset = LmdbDataset_train(spec.source, keys_path=keys_file_for(spec.source))
    if not shuffle and loader_options.get("sampler") is None:
        keys = dataset.keys
        if len(keys) > 1 and not bool(np.all(keys[:-1] <= keys[1:])):
            loader_options["sampler"] = np.argsort(keys, kind="stable").tolist()  # Caffe reads in key order
    return CaffeLoader(dataset, spec.batch_size, transform=spec.transform(), shuffle=shuffle, **loader_options)


def loader_from_prototxt(
    path: str | os.PathLike,
    phase: str = "TRAIN",
    *,
    root: str | os.PathLike | None = None,
    layer: str | None = None,
    shuffle: bool = False,
    level: int | None = None,
    stages: Sequence[str] = (),
    **loader_options: Any,
) -> CaffeLoader:
    """A `CaffeLoader` that feeds the batches the prototxt's Data layer feeds its net in `phase`.

    The layer's LMDB, its `batch_size`, and `CaffeTransform(crop_size, mirror, mean_file,
    mean_value, scale, phase, force_color, force_gray)` from its `transform_param`, giving
    Caffe's BGR blob. Records come in key order, as Caffe reads them, unless `shuffle` or a
    `sampler` is given. When the phase has several Data layers (e.g. a data and a label LMDB),
    the first in the prototxt is used unless `layer` names another.

    Args:
        path: a net prototxt, or a solver prototxt (its train or first test net).
        phase: "TRAIN" or "TEST" (any case).
        root: the folder relative paths in the prototxt are relative to (default: the working directory).
        layer: the name of the Data layer to read.
        shuffle: a new random order each epoch, instead of key order.
        level, stages: the net state's level and extra stages (see `data_layers`).
        **loader_options: passed to `CaffeLoader` (num_workers, device, seed, output, drop_last, worker_options, ...).

    Raises:
        PrototxtError, InputError: as `data_layer`.
        TransformError, MeanError, LmdbFormatError, CorruptLmdbError, KeysFileError: as `loader_for`.
    """
    spec = data_layer(path, phase, layer=layer, root=root, level=level, stages=stages)
    return loader_for(spec, shuffle=shuffle, **loader_options)


def _channel_names(channels: int) -> list[str]:
    if channels == 3:
        return ["B", "G", "R"]
    if channels == 1:
        return ["gray"]
    return [f"c{c}" for c in range(channels)]


def describe_prototxt_batches(
    path: str | os.PathLike,
    phase: str = "TRAIN",
    batches: int | None = 2,
    *,
    root: str | os.PathLike | None = None,
    layer: str | None = None,
    **loader_options: Any,
) -> Iterator[str]:
    """The lines `caffe-lmdb loader --prototxt FILE --phase PHASE` prints: the layer, then each batch's shapes.

    First the Data layer and its transform, then one line per batch (images and labels shapes and
    dtypes) for the first `batches` batches (None: the whole epoch), with the first batch's mean
    of each channel (in the blob's order, B, G, R for colour), which, with a mean subtracted,
    should be near 0. Lines are yielded as the batches arrive.

    Raises:
        As `loader_from_prototxt`, before the first batch line; LoaderError during iteration.
    """
    if batches is not None and batches < 0:
        raise InputError(f"batches must be >= 0, got {batches}")
    spec = data_layer(path, phase, layer=layer, root=root)
    yield str(spec)
    loader = loader_for(spec, **loader_options)
    try:
        yield f"transform: {loader.transform!r}"
        shape = "x".join(map(str, loader.sample_shape))
        yield f"{len(loader)} batches of up to {spec.batch_size} per epoch, samples {shape} ({loader.output})"
        for index, (images, labels) in enumerate(loader):
            if batches is not None and index >= batches:
                break
            yield (f"batch {index}: images {tuple(images.shape)} {str(images.dtype).removeprefix('torch.')}, "
                   f"labels {tuple(labels.shape)} {str(labels.dtype).removeprefix('torch.')}")
            if index == 0:
                means = images.double().mean(dim=(0, 2, 3)).tolist()
                names = _channel_names(len(means))
                yield "batch 0 channel means: " + ", ".join(f"{n} {m:.4f}" for n, m in zip(names, means, strict=True))
    finally:
        loader.close()
