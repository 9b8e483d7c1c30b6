"""The whole Caffe schema in proto/caffe.proto: the facts that wire and text-format compatibility rest on.

The full field-by-field proof against Caffe's own file was done once by compiling both and comparing
every descriptor; these tests pin the count and the facts caffe-lmdb relies on, so an edit that
changes one of them fails here.
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, text_format
from wire import field_bytes, field_float, field_varint

from caffe_lmdb import caffe_pb2

FDP = descriptor_pb2.FieldDescriptorProto
OPT, REP, REQ = FDP.LABEL_OPTIONAL, FDP.LABEL_REPEATED, FDP.LABEL_REQUIRED

CAFFE_MESSAGES = {
    "AccuracyParameter", "ArgMaxParameter", "BatchNormParameter", "BiasParameter", "BlobProto",
    "BlobProtoVector", "BlobShape", "ClipParameter", "ConcatParameter", "ContrastiveLossParameter",
    "ConvolutionParameter", "CropParameter", "DataParameter", "Datum", "DropoutParameter",
    "DummyDataParameter", "ELUParameter", "EltwiseParameter", "EmbedParameter", "ExpParameter",
    "FillerParameter", "FlattenParameter", "HDF5DataParameter", "HDF5OutputParameter",
    "HingeLossParameter", "ImageDataParameter", "InfogainLossParameter", "InnerProductParameter",
    "InputParameter", "LRNParameter", "LayerParameter", "LogParameter", "LossParameter",
    "MVNParameter", "MemoryDataParameter", "NetParameter", "NetState", "NetStateRule", "PReLUParameter",
    "ParamSpec", "ParameterParameter", "PoolingParameter", "PowerParameter", "PythonParameter",
    "RecurrentParameter", "ReLUParameter", "ReductionParameter", "ReshapeParameter", "SPPParameter",
    "ScaleParameter", "SigmoidParameter", "SliceParameter", "SoftmaxParameter", "SolverParameter",
    "SolverState", "SwishParameter", "TanHParameter", "ThresholdParameter", "TileParameter",
    "TransformationParameter", "V0LayerParameter", "V1LayerParameter", "WindowDataParameter",
}

# (name, number, type, label, default or None, packed) for the records caffe-lmdb writes: these
# must never change, whatever else the schema gains.
CORE_TABLE = {
    "BlobShape": [("dim", 1, FDP.TYPE_INT64, REP, None, True)],
    "BlobProto": [
        ("num", 1, FDP.TYPE_INT32, OPT, "0", False),
        ("channels", 2, FDP.TYPE_INT32, OPT, "0", False),
        ("height", 3, FDP.TYPE_INT32, OPT, "0", False),
        ("width", 4, FDP.TYPE_INT32, OPT, "0", False),
        ("data", 5, FDP.TYPE_FLOAT, REP, None, True),
        ("diff", 6, FDP.TYPE_FLOAT, REP, None, True),
        ("shape", 7, FDP.TYPE_MESSAGE, OPT, None, False),
        ("double_data", 8, FDP.TYPE_DOUBLE, REP, None, True),
        ("double_diff", 9, FDP.TYPE_DOUBLE, REP, None, True),
    ],
    "BlobProtoVector": [("blobs", 1, FDP.TYPE_MESSAGE, REP, None, False)],
    "Datum": [
        ("channels", 1, FDP.TYPE_INT32, OPT, None, False),
        ("height", 2, FDP.TYPE_INT32, OPT, None, False),
        ("width", 3, FDP.TYPE_INT32, OPT, None, False),
        ("data", 4, FDP.TYPE_BYTES, OPT, None, False),
        ("label", 5, FDP.TYPE_INT32, OPT, None, False),
        ("float_data", 6, FDP.TYPE_FLOAT, REP, None, False),
        ("encoded", 7, FDP.TYPE_BOOL, OPT, "false", False),
    ],
}


def _fields(message_name: str) -> dict[str, FDP]:
    proto = descriptor_pb2.DescriptorProto()
    caffe_pb2.DESCRIPTOR.message_types_by_name[message_name].CopyToProto(proto)
    return {field.name: field for field in proto.field}


def _numbers(message_name: str) -> dict[str, int]:
    return {name: field.number for name, field in _fields(message_name).items()}


def test_the_whole_schema_is_there():
    file = caffe_pb2.DESCRIPTOR
    assert file.package == "caffe"
    assert set(file.message_types_by_name) == CAFFE_MESSAGES
    assert len(file.message_types_by_name) == 63
    assert list(file.enum_types_by_name) == ["Phase"]
    assert {v.name: v.number for v in file.enum_types_by_name["Phase"].values} == {"TRAIN": 0, "TEST": 1}
    assert sum(len(m.fields) for m in file.message_types_by_name.values()) == 423


@pytest.mark.parametrize("message_name", sorted(CORE_TABLE))
def test_datum_and_blob_descriptors_did_not_change(message_name):
    fields = _fields(message_name)
    actual = [
        (
            f.name, f.number, f.type, f.label,
            f.default_value if f.HasField("default_value") else None,
            f.options.packed,
        )
        for f in sorted(fields.values(), key=lambda f: f.number)
    ]
    assert actual == CORE_TABLE[message_name]
    if message_name == "BlobProto":
        assert fields["shape"].type_name == ".caffe.BlobShape"


def test_layer_parameter_numbers():
    numbers = _numbers("LayerParameter")
    assert {k: numbers[k] for k in ("name", "type", "bottom", "top", "loss_weight", "param", "blobs",
                                    "include", "exclude", "phase", "propagate_down")} == {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5, "param": 6, "blobs": 7,
        "include": 8, "exclude": 9, "phase": 10, "propagate_down": 11,
    }
    assert numbers["transform_param"] == 100
    assert numbers["loss_param"] == 101
    assert numbers["data_param"] == 107
    assert numbers["convolution_param"] == 106
    assert numbers["inner_product_param"] == 117
    assert numbers["swish_param"] == 147 and numbers["clip_param"] == 148
    assert max(numbers.values()) == 148 and len(numbers) == 60
    fields = _fields("LayerParameter")
    assert fields["include"].label == REP and fields["include"].type_name == ".caffe.NetStateRule"
    assert fields["phase"].type_name == ".caffe.Phase"


def test_net_parameter_layers_new_and_legacy():
    numbers = _numbers("NetParameter")
    assert numbers == {"name": 1, "layers": 2, "input": 3, "input_dim": 4, "force_backward": 5,
                       "state": 6, "debug_info": 7, "input_shape": 8, "layer": 100}
    assert _fields("NetParameter")["layers"].type_name == ".caffe.V1LayerParameter"
    v1 = caffe_pb2.V1LayerParameter
    assert (v1.DATA, v1.CONVOLUTION, v1.SOFTMAX_LOSS, v1.DECONVOLUTION) == (5, 4, 21, 39)
    assert _numbers("V1LayerParameter")["data_param"] == 11
    assert _numbers("V1LayerParameter")["transform_param"] == 36
    assert _numbers("V1LayerParameter")["include"] == 32
    assert _numbers("V0LayerParameter")["meanfile"] == 18


def test_data_and_transformation_defaults():
    data = caffe_pb2.DataParameter()
    assert data.backend == caffe_pb2.DataParameter.LEVELDB == 0
    assert caffe_pb2.DataParameter.LMDB == 1
    assert (data.batch_size, data.rand_skip, data.prefetch) == (0, 0, 4)
    assert _numbers("DataParameter") == {
        "source": 1, "scale": 2, "mean_file": 3, "batch_size": 4, "crop_size": 5, "mirror": 6,
        "rand_skip": 7, "backend": 8, "force_encoded_color": 9, "prefetch": 10,
    }
    transform = caffe_pb2.TransformationParameter()
    assert (transform.scale, transform.mirror, transform.crop_size) == (1.0, False, 0)
    assert (transform.force_color, transform.force_gray, list(transform.mean_value)) == (False, False, [])
    assert _numbers("TransformationParameter") == {
        "scale": 1, "mirror": 2, "crop_size": 3, "mean_file": 4, "mean_value": 5,
        "force_color": 6, "force_gray": 7,
    }
    assert _fields("TransformationParameter")["mean_value"].label == REP
    assert _fields("TransformationParameter")["crop_size"].type == FDP.TYPE_UINT32
    # NetState defaults to TEST; a rule's phase has no default (unset means "any phase").
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert not _fields("NetStateRule")["phase"].HasField("default_value")


def test_solver_parameter_fields_and_defaults():
    numbers = _numbers("SolverParameter")
    assert {k: numbers[k] for k in ("train_net", "test_net", "test_iter", "test_interval", "base_lr",
                                    "display", "max_iter", "lr_policy", "gamma", "momentum",
                                    "weight_decay", "stepsize", "snapshot", "snapshot_prefix",
                                    "solver_mode", "net", "type", "weights")} == {
        "train_net": 1, "test_net": 2, "test_iter": 3, "test_interval": 4, "base_lr": 5, "display": 6,
        "max_iter": 7, "lr_policy": 8, "gamma": 9, "momentum": 11, "weight_decay": 12, "stepsize": 13,
        "snapshot": 14, "snapshot_prefix": 15, "solver_mode": 17, "net": 24, "type": 40, "weights": 42,
    }
    assert len(numbers) == 42
    solver = caffe_pb2.SolverParameter()
    assert solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert solver.type == "SGD" and solver.regularization_type == "L2"
    assert solver.random_seed == -1 and solver.clip_gradients == -1
    assert solver.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert solver.momentum2 == pytest.approx(0.999) and solver.delta == pytest.approx(1e-8)
    assert (solver.average_loss, solver.iter_size, solver.test_initialization) == (1, 1, True)


def test_a_few_layer_defaults():
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.ConvolutionParameter().group == 1
    assert _fields("ConvolutionParameter")["kernel_size"].label == REP
    assert caffe_pb2.PoolingParameter().pool == caffe_pb2.PoolingParameter.MAX
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL
    lrn = caffe_pb2.LRNParameter()
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1.0, 0.75, 1.0)
    assert caffe_pb2.DropoutParameter().dropout_ratio == 0.5
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.FillerParameter().sparse == -1
    assert caffe_pb2.AccuracyParameter().top_k == 1
    assert caffe_pb2.ParamSpec().lr_mult == 1.0 and caffe_pb2.ParamSpec().decay_mult == 1.0
    assert caffe_pb2.BatchNormParameter().moving_average_fraction == pytest.approx(0.999)
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.ImageDataParameter().batch_size == 1
    assert caffe_pb2.ReductionParameter().operation == caffe_pb2.ReductionParameter.SUM == 1
    assert {f.label for f in _fields("ClipParameter").values()} == {REQ}


def test_layer_wire_bytes_match_caffe_numbers():
    """A Data layer serialised by caffe_pb2 equals the bytes written by hand from Caffe's numbers."""
    layer = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    layer.include.add(phase=caffe_pb2.TRAIN)
    layer.transform_param.crop_size = 227
    layer.transform_param.mean_value.extend([104.0])
    layer.data_param.source = "train_lmdb"
    layer.data_param.batch_size = 256
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    expected = (
        field_bytes(1, b"data") + field_bytes(2, b"Data") + field_bytes(4, b"data") + field_bytes(4, b"label")
        + field_bytes(8, field_varint(1, 0))
        + field_bytes(100, field_varint(3, 227) + field_float(5, 104.0))  # mean_value is not packed
        + field_bytes(107, field_bytes(1, b"train_lmdb") + field_varint(4, 256) + field_varint(8, 1))
    )
    assert layer.SerializeToString() == expected
    net = caffe_pb2.NetParameter()
    net.ParseFromString(field_bytes(1, b"n") + field_bytes(100, expected))
    assert net.layer[0] == layer


def test_text_format_uses_the_schema_names():
    net = text_format.Parse(
        'name: "n" layer { name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 '
        'weight_filler { type: "xavier" } } include { phase: TEST } }',
        caffe_pb2.NetParameter(),
    )
    assert net.layer[0].convolution_param.kernel_size == [3]
    assert net.layer[0].include[0].phase == caffe_pb2.TEST
    with pytest.raises(text_format.ParseError):
        text_format.Parse('layer { data_param { backend: ROCKSDB } }', caffe_pb2.NetParameter())
