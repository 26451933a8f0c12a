"""Reads TensorBoard event files with a reader that shares nothing with fx's
Go code, and prints their scalars as JSON:

    {"reader": "...", "scalars": {"RUN": {"TAG": [[step, value, wall_time], ...]}}}

Usage: read_events.py LOGDIR  (every run under LOGDIR: the directories that
hold an events.out.tfevents.* file, named relative to LOGDIR, "." for LOGDIR)

With TensorBoard importable it is TensorBoard's own EventAccumulator (set
FX_TFEVENTS_READER=manual to skip it): as pip installs it, or a checkout of
its source with tensorboard/compat/proto/*.proto and
tensorboard/plugins/**/*.proto compiled by `protoc --python_out=.`, Debian's
python3-absl installed, and the checkout on PYTHONPATH. Otherwise (Debian 12 packages neither
TensorBoard nor TensorFlow) the records are framed and CRC-checked here,
with a CRC32C written from its definition, and each record is decoded by
Google's protobuf runtime against tensorflow.Event's schema, declared here
from tensorflow/core/util/event.proto and summary.proto.
"""

import json
import os
import struct
import sys


def runs(logdir):
    for root, _dirs, files in sorted(os.walk(logdir)):
        names = sorted(f for f in files if "tfevents" in f)
        if names:
            yield os.path.relpath(root, logdir), [os.path.join(root, f) for f in names]


def with_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run, _files in runs(logdir):
        acc = EventAccumulator(os.path.join(logdir, run), size_guidance={"scalars": 0})
        acc.Reload()
        out[run] = {tag: [[s.step, s.value, s.wall_time] for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return "tensorboard EventAccumulator", out


def _crc32c_table():
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="fx_tfevents_check.proto", package="tensorflow", syntax="proto3")
    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="node_name", number=7, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL, oneof_index=0)
    value.field.add(name="obsolete_old_style_histogram", number=3, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL, oneof_index=0)
    value.oneof_decl.add(name="value")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".tensorflow.Summary.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(name="graph_def", number=4, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".tensorflow.Summary", oneof_index=0)
    event.oneof_decl.add(name="what")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("tensorflow.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        if len(data) - i < 12:
            raise ValueError(f"{path}: {len(data) - i} stray bytes at offset {i}")
        head = data[i:i + 8]
        (n,) = struct.unpack("<Q", head)
        (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked(head):
            raise ValueError(f"{path}: length CRC at offset {i}")
        body = data[i + 12:i + 12 + n]
        if len(body) != n or len(data) < i + 12 + n + 4:
            raise ValueError(f"{path}: record cut at offset {i}")
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if dcrc != masked(body):
            raise ValueError(f"{path}: data CRC at offset {i}")
        yield body
        i += 16 + n


def by_hand(logdir):
    Event = event_class()
    out = {}
    for run, files in runs(logdir):
        tags = out.setdefault(run, {})
        for path in files:
            for k, rec in enumerate(records(path)):
                ev = Event()
                ev.ParseFromString(rec)
                if ev.SerializeToString() != rec:
                    # Unknown fields, a wrong wire type or a non-canonical
                    # encoding: protobuf would not write these bytes.
                    raise ValueError(f"{path}: record {k} is not tensorflow.Event's canonical encoding")
                if k == 0:
                    if ev.WhichOneof("what") != "file_version" or ev.file_version != "brain.Event:2":
                        raise ValueError(f"{path}: the first event is not the brain.Event:2 header: {ev}")
                    continue
                if ev.WhichOneof("what") != "summary":
                    raise ValueError(f"{path}: record {k} is not a summary: {ev}")
                for v in ev.summary.value:
                    if v.WhichOneof("value") != "simple_value":
                        raise ValueError(f"{path}: record {k}: {v.tag} is not a simple_value")
                    tags.setdefault(v.tag, []).append([ev.step, v.simple_value, ev.wall_time])
    return "by hand: TFRecord framing and CRC32C in Python, tensorflow.Event decoded by google.protobuf", out


def main():
    logdir = sys.argv[1]
    if os.environ.get("FX_TFEVENTS_READER") != "manual":
        try:
            reader, scalars = with_tensorboard(logdir)
        except ImportError:
            reader, scalars = by_hand(logdir)
    else:
        reader, scalars = by_hand(logdir)
    json.dump({"reader": reader, "scalars": scalars}, sys.stdout)


if __name__ == "__main__":
    main()
