"""Caffe prototxts: the zoo-style fixtures parse, `.caffemodel` files round-trip, and `caffe_lmdb.prototxt`
finds each phase's Data layers by Caffe's rules and feeds the batches they feed."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, caffe_key, caffe_raw_datum, run_cli, write_lmdb
from google.protobuf import text_format
from toollmdbs import converted, same_size_tree

from caffe_lmdb import caffe_pb2
from caffe_lmdb.errors import InputError
from caffe_lmdb.prototxt import (
    DataLayerSpec,
    PrototxtError,
    data_layer,
    data_layers,
    describe_prototxt_batches,
    loader_from_prototxt,
)

FIXTURES = Path(__file__).parent / "data" / "prototxt"
NETS = ["caffenet_train_val", "googlenet_train_val", "lenet_train_test", "lenet_v1"]
SOLVERS = ["caffenet_solver", "lenet_solver"]


def _net(name: str) -> caffe_pb2.NetParameter:
    return text_format.Parse((FIXTURES / f"{name}.prototxt").read_text(), caffe_pb2.NetParameter())


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _data_layer(name: str = "data", *, source: str = "db", batch: int = 4, backend: str | None = "LMDB",
                transform: str = "", rules: str = "", extra: str = "") -> str:
    backend_line = f"backend: {backend}" if backend else ""
    return (f'layer {{ name: "{name}" type: "Data" top: "data" top: "label" {rules} {extra}\n'
            f"  transform_param {{ {transform} }}\n"
            f'  data_param {{ source: "{source}" batch_size: {batch} {backend_line} }}\n}}\n')


def _lmdb(path: Path, count: int = 3, shape: tuple[int, int] = (5, 7)) -> Path:
    rng = np.random.default_rng(7)
    records = {caffe_key(i, f"c/{i}.png"): caffe_raw_datum(rng.integers(0, 256, (*shape, 3), np.uint8), i)
               .SerializeToString() for i in range(count)}
    return write_lmdb(path, records)


# --------------------------------------------------------------------------- parsing the fixtures

@pytest.mark.parametrize("name", NETS)
def test_net_fixtures_parse(name):
    net = _net(name)
    layers = list(net.layer) or list(net.layers)
    assert len(layers) >= 7
    data = [layer for layer in net.layer if layer.type == "Data"] or \
        [layer for layer in net.layers if layer.type == caffe_pb2.V1LayerParameter.DATA]
    assert [caffe_pb2.Phase.Name(layer.include[0].phase) for layer in data] == ["TRAIN", "TEST"]
    assert all(layer.data_param.backend == caffe_pb2.DataParameter.LMDB for layer in data)


def test_caffenet_fixture_facts():
    net = _net("caffenet_train_val")
    train, test = net.layer[0], net.layer[1]
    assert (train.transform_param.crop_size, train.transform_param.mirror) == (227, True)
    assert test.transform_param.mirror is False and test.data_param.batch_size == 50
    assert train.transform_param.mean_file == "data/ilsvrc12/imagenet_mean.binaryproto"
    by_name = {layer.name: layer for layer in net.layer[2:]}
    assert by_name["conv2"].convolution_param.group == 2
    assert by_name["conv1"].convolution_param.kernel_size == [11]
    assert by_name["norm1"].lrn_param.alpha == pytest.approx(0.0001)
    assert [p.lr_mult for p in by_name["fc8"].param] == [1, 2]
    assert by_name["accuracy"].include[0].phase == caffe_pb2.TEST


def test_googlenet_fixture_facts():
    net = _net("googlenet_train_val")
    assert list(net.layer[0].transform_param.mean_value) == [104, 117, 123]
    assert net.layer[0].transform_param.crop_size == 224
    by_name = {layer.name: layer for layer in net.layer}
    assert len(by_name["inception_3a/output"].bottom) == 4 and by_name["inception_3a/output"].type == "Concat"
    assert by_name["inception_3a/output"].concat_param.axis == 1  # the default: channels
    assert by_name["loss1/loss"].loss_weight == [pytest.approx(0.3)]
    assert by_name["loss1/top-5"].accuracy_param.top_k == 5
    assert by_name["loss1/top-1"].accuracy_param.top_k == 1
    assert by_name["conv1/7x7_s2"].convolution_param.weight_filler.type == "xavier"
    assert [(p.lr_mult, p.decay_mult) for p in by_name["loss1/fc"].param] == [(1, 1), (2, 0)]
    assert by_name["loss1/ave_pool"].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert by_name["loss1/drop_fc"].dropout_param.dropout_ratio == pytest.approx(0.7)
    assert by_name["pool1/norm1"].type == "LRN"


def test_lenet_fixtures_facts():
    new, old = _net("lenet_train_test"), _net("lenet_v1")
    assert new.layer[0].transform_param.scale == 0.00390625 and new.layer[0].transform_param.crop_size == 0
    assert old.layers[0].data_param.scale == 0.00390625  # the deprecated place, upgraded by data_layers
    assert old.layers[2].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert list(old.layers[2].blobs_lr) == [1, 2]


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_fixtures_parse(name):
    solver = text_format.Parse((FIXTURES / f"{name}.prototxt").read_text(), caffe_pb2.SolverParameter())
    assert solver.net.endswith(".prototxt")
    assert solver.test_iter and solver.test_interval and solver.base_lr == pytest.approx(0.01)
    if name == "caffenet_solver":
        assert (solver.lr_policy, solver.stepsize, solver.type) == ("step", 100000, "SGD")
        assert solver.gamma == pytest.approx(0.1) and solver.max_iter == 450000
        assert solver.solver_mode == caffe_pb2.SolverParameter.GPU
    else:
        assert (solver.lr_policy, solver.random_seed) == ("inv", 1701)
        assert solver.solver_mode == caffe_pb2.SolverParameter.CPU
        assert solver.type == "SGD"  # the default


def test_caffemodel_round_trip(tmp_path):
    net = caffe_pb2.NetParameter(name="tiny")
    conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 2
    weights = np.arange(2 * 3 * 3 * 3, dtype=np.float32) / 7
    conv.blobs.add(shape=caffe_pb2.BlobShape(dim=[2, 3, 3, 3])).data.extend(weights.tolist())
    conv.blobs.add(shape=caffe_pb2.BlobShape(dim=[2])).data.extend([0.5, -0.25])
    fc = net.layer.add(name="fc", type="InnerProduct", bottom=["conv1"], top=["fc"])
    fc.blobs.add(num=1, channels=1, height=4, width=2).data.extend([1, 2, 3, 4, 5, 6, 7, 8])  # legacy 4-D dims
    legacy = caffe_pb2.NetParameter(name="old")
    legacy.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT).blobs.add(num=1).data.append(3)
    path = tmp_path / "tiny.caffemodel"
    path.write_bytes(net.SerializeToString())
    back = caffe_pb2.NetParameter()
    back.ParseFromString(path.read_bytes())
    assert back == net
    assert list(back.layer[0].blobs[0].shape.dim) == [2, 3, 3, 3]
    assert np.array_equal(np.asarray(back.layer[0].blobs[0].data, np.float32), weights)
    assert back.layer[1].blobs[0].height == 4
    assert caffe_pb2.NetParameter.FromString(legacy.SerializeToString()).layers[0].blobs[0].data == [3]
    # the weights are one packed run of little-endian floats, as Caffe writes them
    assert weights.tobytes() in path.read_bytes()


# --------------------------------------------------------------------------- choosing Data layers

@pytest.mark.parametrize("name", ["caffenet_train_val", "googlenet_train_val", "lenet_train_test", "lenet_v1"])
def test_fixture_data_layers_per_phase(name):
    path = FIXTURES / f"{name}.prototxt"
    train = data_layers(path, "TRAIN", check_files=False)
    test = data_layers(path, "test", check_files=False)
    assert len(train) == len(test) == 1
    assert train[0].phase == "TRAIN" and test[0].phase == "TEST"
    assert "train" in train[0].source_text and ("val" in test[0].source_text or "test" in test[0].source_text)
    assert train[0].line is not None and test[0].line > train[0].line
    assert path.read_text().splitlines()[train[0].line - 1].lstrip().startswith("layer")


def test_fixture_transform_fields(tmp_path):
    caffenet = data_layers(FIXTURES / "caffenet_train_val.prototxt", root=tmp_path, check_files=False)[0]
    assert (caffenet.crop_size, caffenet.mirror, caffenet.batch_size) == (227, True, 256)
    assert caffenet.mean_file == tmp_path / "data/ilsvrc12/imagenet_mean.binaryproto"
    assert caffenet.source == tmp_path / "examples/imagenet/ilsvrc12_train_lmdb"
    googlenet = data_layers(FIXTURES / "googlenet_train_val.prototxt", "TEST", check_files=False)[0]
    assert (googlenet.mean_value, googlenet.crop_size, googlenet.mirror) == ((104.0, 117.0, 123.0), 224, False)
    assert googlenet.mean_file is None
    lenet = data_layers(FIXTURES / "lenet_train_test.prototxt", check_files=False)[0]
    assert (lenet.scale, lenet.crop_size, lenet.name) == (0.00390625, 0, "mnist")
    v1_train = data_layers(FIXTURES / "lenet_v1.prototxt", check_files=False)[0]
    assert v1_train.scale == 0.00390625  # moved from the deprecated data_param field
    assert not v1_train.data_param.HasField("scale")


def test_no_rules_means_every_phase_and_exclude_rules(tmp_path):
    net = _write(tmp_path / "net.prototxt",
                 _data_layer("both", source="a") + _data_layer("not_test", source="b", rules="exclude { phase: TEST }"))
    assert [s.name for s in data_layers(net, "TRAIN", check_files=False)] == ["both", "not_test"]
    assert [s.name for s in data_layers(net, "TEST", check_files=False)] == ["both"]


def test_stage_and_level_rules(tmp_path):
    net = _write(tmp_path / "net.prototxt",
                 'state { stage: "fromfile" }\n'
                 + _data_layer("plain", rules='include { phase: TRAIN not_stage: "big" }')
                 + _data_layer("big", rules='include { phase: TRAIN stage: "big" }')
                 + _data_layer("file", rules='include { phase: TRAIN stage: "fromfile" min_level: 1 }')
                 + _data_layer("low", rules="include { max_level: 0 }"))
    names = lambda **kw: [s.name for s in data_layers(net, "TRAIN", check_files=False, **kw)]  # noqa: E731
    assert names() == ["plain", "low"]
    assert names(stages=["big"]) == ["big", "low"]
    assert names(level=1) == ["plain", "file"]
    assert [s.name for s in data_layers(net, "TEST", check_files=False)] == ["low"]


def test_a_layer_phase_field_sets_its_phase_not_its_net(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer("fixed", extra="phase: TEST"))
    spec = data_layers(net, "TRAIN", check_files=False)[0]
    assert (spec.name, spec.phase) == ("fixed", "TEST")  # built in the TRAIN net, run as TEST (centre crops)
    assert spec.transform().phase == "test"


def test_layer_choice_by_name(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer("data") + _data_layer("labels", source="db"))
    _lmdb(tmp_path / "db")
    assert data_layer(net, root=tmp_path).name == "data"
    assert data_layer(net, layer="labels", root=tmp_path).name == "labels"
    with pytest.raises(PrototxtError, match=r'no Data layer "nope" in the TRAIN net \(it has "data", "labels"\)$'):
        data_layer(net, layer="nope", root=tmp_path)


# --------------------------------------------------------------------------- backends and sources

def test_explicit_leveldb_is_refused(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer(backend="LEVELDB"))
    with pytest.raises(PrototxtError) as info:
        data_layers(net, check_files=False)
    assert str(info.value) == (f'{net}:1: layer "data": backend: LEVELDB (db): LEVELDB is not supported: '
                               "convert it to LMDB")
    _lmdb(tmp_path / "db")
    with pytest.raises(PrototxtError, match=r"backend: LEVELDB, but .*db is an LMDB: write `backend: LMDB`"):
        data_layers(net, root=tmp_path)


def test_default_backend_reads_an_lmdb_folder(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer(backend=None))
    _lmdb(tmp_path / "db")
    spec = data_layers(net, root=tmp_path)[0]
    assert spec.source == tmp_path / "db" and spec.backend_given is False
    assert data_layers(_write(tmp_path / "given.prototxt", _data_layer()), root=tmp_path)[0].backend_given


def test_default_backend_on_anything_else_is_the_leveldb_error(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer(backend=None))
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(PrototxtError) as info:
        data_layers(net, root=tmp_path)
    message = str(info.value)
    assert message.startswith(f'{net}:1: layer "data": {tmp_path / "db"} is a LevelDB')
    assert "without `backend: LMDB` is LEVELDB (Caffe's default): LEVELDB is not supported: convert it to LMDB" \
        in message
    (tmp_path / "db" / "CURRENT").unlink()
    with pytest.raises(PrototxtError, match=r"is not an LMDB \(no data.mdb in it\), and a layer without"):
        data_layers(net, root=tmp_path)


def test_sources_that_are_not_lmdb_folders(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer())
    with pytest.raises(PrototxtError, match=r'layer "data": source db \(.*db\) does not exist$'):
        data_layers(net, root=tmp_path)
    (tmp_path / "db").mkdir()
    with pytest.raises(PrototxtError, match=r"source .*db is not an LMDB \(no data.mdb in the folder\)"):
        data_layers(net, root=tmp_path)
    (tmp_path / "db").rmdir()
    (tmp_path / "db").write_bytes(b"\0" * 64)
    with pytest.raises(PrototxtError, match="is a file; Caffe opens an LMDB folder"):
        data_layers(net, root=tmp_path)


def test_relative_paths_follow_the_working_directory_and_hint_at_the_prototxt_folder(tmp_path, monkeypatch):
    models = tmp_path / "models"
    net = _write(models / "net.prototxt", _data_layer(source="db", transform='mean_file: "mean.binaryproto"'))
    _lmdb(models / "db")
    (models / "mean.binaryproto").write_bytes(caffe_pb2.BlobProto(num=1).SerializeToString())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrototxtError) as info:
        data_layers(net)
    assert f"source db ({tmp_path / 'db'}) does not exist; relative paths are relative to the working directory" \
        in str(info.value)
    assert f"and {models / 'db'} exists: run from {models} or pass root='{models}'" in str(info.value)
    monkeypatch.chdir(models)
    spec = data_layers(net)[0]
    assert spec.source == models / "db" and spec.mean_file == models / "mean.binaryproto"
    assert data_layers(net, root=models)[0] == spec


# --------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('layer { name: "d" type: "Data" data_parm { } }',
         r':1:32: Message type "caffe.LayerParameter" has no field named "data_parm"\.$'),
        ('layer {\n  name: "d"\n  data_param { backend: ROCKSDB }\n}',
         r':3:25: Enum type "caffe.DataParameter.DB" has no value named ROCKSDB\.$'),
        ("layer { name: \"d\" ", r":1:\d+: Expected \"}\"\.$"),
    ],
)
def test_parse_errors_name_file_line_and_column(tmp_path, text, expected):
    net = _write(tmp_path / "bad.prototxt", text)
    with pytest.raises(PrototxtError, match=expected) as info:
        data_layers(net)
    assert str(info.value).startswith(f"{net}:")
    assert "\n" not in str(info.value)


def test_unreadable_prototxts(tmp_path):
    with pytest.raises(PrototxtError, match=r"missing.prototxt: no such file or directory$"):
        data_layers(tmp_path / "missing.prototxt")
    with pytest.raises(PrototxtError, match=rf"^{tmp_path}: is a directory$"):
        data_layers(tmp_path)
    binary = tmp_path / "model.caffemodel"
    binary.write_bytes(b"\n\x04tiny\xa2\x06\xff\xfe")
    with pytest.raises(PrototxtError, match=r"model.caffemodel: not a text prototxt \(byte 6 is not UTF-8"):
        data_layers(binary)


def test_no_data_layer_for_the_phase(tmp_path):
    train_only = _write(tmp_path / "train.prototxt", _data_layer(rules="include { phase: TRAIN }"))
    with pytest.raises(PrototxtError) as info:
        data_layers(train_only, "TEST")
    assert str(info.value) == f'{train_only}: no Data layer for phase TEST (its Data layer "data" is not in the TEST net)'
    deploy = _write(tmp_path / "deploy.prototxt",
                    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
                    'layer { name: "prob" type: "Softmax" bottom: "data" top: "prob" }')
    with pytest.raises(PrototxtError, match=r"deploy.prototxt: no Data layer for phase TRAIN; it reads its input "
                                            r'through Input layer "data", which caffe-lmdb does not read$'):
        data_layers(deploy)
    with pytest.raises(PrototxtError, match=r"empty.prototxt: no Data layer for phase TRAIN \(the net has no layers\)"):
        data_layers(_write(tmp_path / "empty.prototxt", 'name: "nothing"\n'))


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ('layer { name: "d" type: "Data" data_param { batch_size: 4 } }', "no data_param source"),
        ('layer { name: "d" type: "Data" data_param { source: "db" backend: LMDB } }',
         "data_param batch_size is missing or 0"),
        (_data_layer("d", transform='mean_file: "m.binaryproto" mean_value: 1'), "both mean_file and mean_value"),
        (_data_layer("d", transform="force_color: true force_gray: true"), "both force_color and force_gray"),
        (_data_layer("d", transform='mean_file: "nope.binaryproto"'), r"mean_file nope.binaryproto \(.*\) does not exist"),
        (_data_layer("d", rules="include { phase: TRAIN } exclude { phase: TEST }"), "both include and exclude rules"),
    ],
)
def test_unusable_data_layers(tmp_path, layer, expected):
    _lmdb(tmp_path / "db")
    (tmp_path / "m.binaryproto").write_bytes(b"")
    net = _write(tmp_path / "net.prototxt", "# a comment {\n" + layer)
    with pytest.raises(PrototxtError, match=rf'^{net}:2: layer "d": .*{expected}'):
        data_layers(net, root=tmp_path)


def test_legacy_forms(tmp_path):
    both = _write(tmp_path / "both.prototxt", _data_layer() + 'layers { name: "old" type: DATA }')
    with pytest.raises(PrototxtError, match="both `layer` and legacy `layers` fields"):
        data_layers(both, check_files=False)
    v0 = _write(tmp_path / "v0.prototxt", 'layers { layer { name: "mnist" type: "data" source: "db" batchsize: 4 } }')
    with pytest.raises(PrototxtError, match=r'v0.prototxt:1: layer "#0": the V0 layer format .* upgrade_net_proto_text'):
        data_layers(v0, check_files=False)


def test_bad_phase_is_a_usage_error():
    with pytest.raises(InputError, match="phase must be TRAIN or TEST, got 'val'"):
        data_layers(FIXTURES / "lenet_train_test.prototxt", "val")
    assert issubclass(PrototxtError, InputError)


def test_solver_prototxt_leads_to_its_nets(tmp_path):
    _write(tmp_path / "nets" / "train_val.prototxt",
           _data_layer("train", source="db", rules="include { phase: TRAIN }")
           + _data_layer("val", source="db", rules='include { phase: TEST stage: "val" }'))
    _lmdb(tmp_path / "db")
    solver = _write(tmp_path / "solver.prototxt",
                    'net: "nets/train_val.prototxt"\ntest_iter: 1\ntest_state { stage: "val" }\nbase_lr: 0.1\n')
    assert data_layer(solver, root=tmp_path).name == "train"
    assert data_layer(solver, "TEST", root=tmp_path).name == "val"  # the solver's test_state stage applies
    inline = _write(tmp_path / "inline.prototxt", "train_net_param { " + _data_layer("inline", source="db") + " }")
    assert data_layer(inline, root=tmp_path).name == "inline"
    missing = _write(tmp_path / "missing.prototxt", 'net: "nowhere.prototxt"')
    with pytest.raises(PrototxtError, match=r"missing.prototxt: net nowhere.prototxt \(.*\) does not exist"):
        data_layers(missing, root=tmp_path)
    loop = _write(tmp_path / "loop.prototxt", 'net: "loop.prototxt"')
    with pytest.raises(PrototxtError, match="loop.prototxt: a solver prototxt where a net prototxt was expected"):
        data_layers(loop, root=tmp_path)
    with pytest.raises(PrototxtError, match="names no TEST net"):
        data_layers(_write(tmp_path / "none.prototxt", 'train_net: "nets/train_val.prototxt"'), "TEST", root=tmp_path)


# --------------------------------------------------------------------------- the loader, end to end

def _records_in_key_order(path: Path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


def _expected_batch(spec: DataLayerSpec, records: list[bytes], seed: int = 0) -> np.ndarray:
    """What Caffe's transformer gives each record, one at a time, at the loader's draw for that index."""
    transform = spec.transform()
    out = []
    for index, value in enumerate(records):
        datum = caffe_pb2.Datum.FromString(value)
        h_off, w_off, mirror = transform.params(datum.height, datum.width, seed, 0, index)
        one = np.empty(transform.output_shape(datum.channels, datum.height, datum.width), np.float32)
        transform.transform_into(value, one, h_off, w_off, mirror)
        out.append(one)
    return np.stack(out)


@pytest.fixture
def converted_lmdb(tmp_path, rng):
    """Six 5x7 RGB images converted by caffe-lmdb's converter to `tmp/data/train.lmdb`, with a mean file."""
    lmdb_path = converted(same_size_tree(tmp_path / "images", rng), tmp_path / "data" / "train.lmdb")
    values = [v for _, v in _records_in_key_order(lmdb_path)]
    planes = [np.frombuffer(caffe_pb2.Datum.FromString(v).data, np.uint8).reshape(3, 5, 7) for v in values]
    from caffe_lmdb.mean import save_mean

    save_mean(tmp_path / "data" / "mean.binaryproto", np.mean(planes, axis=0))
    return lmdb_path


def test_loader_from_prototxt_first_batch_is_caffes(tmp_path, converted_lmdb):
    net = _write(tmp_path / "models" / "train_val.prototxt",
                 "# CaffeNet-style, on the tiny LMDB\n"
                 + _data_layer(source="data/train.lmdb", batch=4, rules="include { phase: TRAIN }",
                               transform='mirror: true crop_size: 3 mean_file: "data/mean.binaryproto" scale: 0.5')
                 + _data_layer(source="data/train.lmdb", batch=5, rules="include { phase: TEST }",
                               transform="crop_size: 4 mean_value: 100 mean_value: 110 mean_value: 120"))
    records = [v for _, v in _records_in_key_order(converted_lmdb)]
    train = loader_from_prototxt(net, root=tmp_path)
    try:
        assert train.batch_size == 4 and len(train) == 2
        images, labels = next(iter(train))
        spec = data_layer(net, root=tmp_path)
        expected = _expected_batch(spec, records)
        assert images.shape == (4, 3, 3, 3) and str(images.dtype) == "torch.float32"
        assert np.array_equal(images.numpy(), expected[:4])
        assert labels.tolist() == [caffe_pb2.Datum.FromString(v).label for v in records[:4]]
        assert repr(train.transform) == repr(spec.transform())
        # and by hand for each record: the crop window (mirrored if drawn) minus the mean's window, times 0.5
        mean = np.asarray(caffe_pb2.BlobProto.FromString((tmp_path / "data/mean.binaryproto").read_bytes()).data,
                          np.float32).reshape(3, 5, 7)
        for index, value in enumerate(records[:4]):
            pixels = np.frombuffer(caffe_pb2.Datum.FromString(value).data, np.uint8).reshape(3, 5, 7)
            h, w, flip = spec.transform().params(5, 7, 0, 0, index)
            window = pixels[:, h:h + 3, w:w + 3].astype(np.float32) - mean[:, h:h + 3, w:w + 3]
            assert np.array_equal(images[index].numpy(), (window[..., ::-1] if flip else window) * np.float32(0.5))
    finally:
        train.close()
    test = loader_from_prototxt(net, "TEST", root=tmp_path)
    try:
        images, _ = next(iter(test))
        spec = data_layer(net, "TEST", root=tmp_path)
        assert np.array_equal(images.numpy(), _expected_batch(spec, records)[:5])
        centre = (np.frombuffer(caffe_pb2.Datum.FromString(records[0]).data, np.uint8).reshape(3, 5, 7)
                  [:, 0:4, 1:5].astype(np.float32) - np.float32([100, 110, 120])[:, None, None])
        assert np.array_equal(images[0].numpy(), centre)  # Caffe's floored centre crop, BGR minus mean_value
    finally:
        test.close()


def test_loader_reads_key_order_even_when_the_keys_file_does_not(tmp_path):
    from caffe_lmdb.files import default_keys_path
    from caffe_lmdb.keys import save_keys

    lmdb_path = _lmdb(tmp_path / "db.lmdb", count=5)
    keys, records = zip(*_records_in_key_order(lmdb_path), strict=True)
    save_keys(default_keys_path(lmdb_path), list(keys[::-1]))
    net = _write(tmp_path / "net.prototxt", _data_layer(source="db.lmdb", batch=5))
    loader = loader_from_prototxt(net, root=tmp_path)
    try:
        _, labels = next(iter(loader))
        assert labels.tolist() == [0, 1, 2, 3, 4]  # record i has label i: key order, not the keys file's
        images, _ = next(iter(loader))
        assert np.array_equal(images.numpy(), _expected_batch(data_layer(net, root=tmp_path), list(records)))
    finally:
        loader.close()


def test_describe_prototxt_batches(tmp_path, converted_lmdb):
    net = _write(tmp_path / "net.prototxt",
                 _data_layer(source="data/train.lmdb", batch=4, transform='mean_file: "data/mean.binaryproto"'))
    lines = list(describe_prototxt_batches(net, "train", batches=5, root=tmp_path))
    assert lines[0] == (f'{net}:1: layer "data" (TRAIN): {converted_lmdb} (LMDB), batch_size 4, no crop, '
                        f"mean_file {tmp_path / 'data' / 'mean.binaryproto'}")
    assert lines[1].startswith("transform: CaffeTransform(crop_size=0")
    assert lines[2] == "2 batches of up to 4 per epoch, samples 3x5x7 (float32)"
    assert lines[3] == "batch 0: images (4, 3, 5, 7) float32, labels (4,) int64"
    assert lines[4].startswith("batch 0 channel means: B ")
    means = [float(part.split()[1]) for part in lines[4].removeprefix("batch 0 channel means: ").split(", ")]
    assert len(means) == 3 and all(abs(m) < 40 for m in means)
    assert lines[5] == "batch 1: images (2, 3, 5, 7) float32, labels (2,) int64"
    assert len(lines) == 6
    assert len(list(describe_prototxt_batches(net, batches=0, root=tmp_path))) == 3


def test_the_loader_errors_are_prototxt_errors(tmp_path):
    net = _write(tmp_path / "net.prototxt", _data_layer(source="gone"))
    with pytest.raises(PrototxtError, match='net.prototxt:1: layer "data": source gone'):
        loader_from_prototxt(net, root=tmp_path)


def test_a_broken_solver_reports_the_solver_error(tmp_path):
    solver = _write(tmp_path / "solver.prototxt", 'net: "n.prototxt"\nbase_lr: 0.1\nlr_polcy: "step"\n')
    with pytest.raises(PrototxtError, match=r'solver.prototxt:3:1: Message type "caffe.SolverParameter" has no '
                                            r'field named "lr_polcy"\.$'):
        data_layers(solver)


# --------------------------------------------------------------------------- caffe-lmdb loader --prototxt

def test_cli_loader_prototxt_prints_the_layer_and_batches(tmp_path, converted_lmdb):
    net = _write(tmp_path / "models" / "train_val.prototxt",
                 _data_layer(source="data/train.lmdb", batch=4, rules="include { phase: TRAIN }",
                             transform="mirror: true crop_size: 3")
                 + _data_layer(name="val", source="data/train.lmdb", batch=5, rules="include { phase: TEST }",
                               transform='crop_size: 4 mean_file: "data/mean.binaryproto"'))
    result = run_cli("loader", "--prototxt", net, "--phase", "test", "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == list(describe_prototxt_batches(net, "TEST", batches=2, root=tmp_path))
    assert lines[0].startswith(f'{net}:') and 'layer "val" (TEST)' in lines[0] and "batch_size 5" in lines[0]
    assert "batch 0: images (5, 3, 4, 4) float32, labels (5,) int64" in lines
    assert "batch 1: images (1, 3, 4, 4) float32, labels (1,) int64" in lines
    train = run_cli("loader", "--prototxt", net, "--root", tmp_path, "--batches", "1", "--workers", "0")
    assert train.returncode == 0, train.stderr
    assert [line for line in train.stdout.splitlines() if line.startswith("batch 0: ")] == [
        "batch 0: images (4, 3, 3, 3) float32, labels (4,) int64"]
    assert not any(line.startswith("batch 1: ") for line in train.stdout.splitlines())


def test_cli_loader_prototxt_errors_are_one_line(tmp_path, converted_lmdb):
    leveldb = _write(tmp_path / "leveldb.prototxt", _data_layer(source="data/train.lmdb", backend="LEVELDB"))
    assert_one_line_error(run_cli("loader", "--prototxt", leveldb, "--root", tmp_path), 2, "leveldb.prototxt",
                          "LEVELDB")
    assert_one_line_error(run_cli("loader", "--prototxt", tmp_path / "missing.prototxt"), 2, "missing.prototxt")
    assert_one_line_error(run_cli("loader"), 2, "--prototxt")
    assert_one_line_error(run_cli("loader", converted_lmdb, "--prototxt", leveldb), 2, "one of them")


def test_cli_loader_refuses_a_prototxt_that_is_a_fifo(tmp_path):
    import os

    os.mkfifo(tmp_path / "net.prototxt")  # nothing ever writes to it: reading it waited forever
    result = run_cli("loader", "--prototxt", tmp_path / "net.prototxt", timeout=30)
    assert_one_line_error(result, 2, f"{tmp_path / 'net.prototxt'}: not a regular file (a FIFO)")


def test_cli_loader_refuses_dev_zero_as_a_prototxt():
    result = run_cli("loader", "--prototxt", "/dev/zero", timeout=30)  # read until memory ran out
    assert_one_line_error(result, 2, "/dev/zero: not a regular file (a character device)")



def test_loader_prototxt_with_a_batch_size_far_above_the_records(tmp_path, converted_lmdb):
    def net(batch: int) -> Path:
        return _write(tmp_path / "models" / f"b{batch}.prototxt",
                      _data_layer(source="data/train.lmdb", batch=batch, transform="crop_size: 3"))

    huge = loader_from_prototxt(net(100_000), root=tmp_path, num_workers=0)
    got = [(images.clone(), labels.clone()) for images, labels in huge]
    assert huge._local[0].shape[0] == 6  # the slot holds the six records, not 100,000 samples
    exact = loader_from_prototxt(net(6), root=tmp_path, num_workers=0)
    expected = list(exact)
    assert len(got) == len(expected) == 1
    assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[0][1], expected[0][1])
    result = run_cli("loader", "--prototxt", net(100_000), "--root", tmp_path, "--workers", "2", timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "batch 0: images (6, 3, 3, 3) float32, labels (6,) int64" in result.stdout.splitlines()
