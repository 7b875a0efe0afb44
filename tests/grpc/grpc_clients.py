#!/usr/bin/env python3
"""Drives vmmd's API with Python grpcio (the C-core stack behind C++, Ruby and PHP too), no .proto.

Usage: grpc_clients.py SOCKET PID

For each :authority a client may send over a unix socket -- grpcio's default (the percent-encoded
socket path), the raw path (what grpc-java sends) and `localhost` (grpc-go, tonic) -- it opens a
plain `grpc.insecure_channel("unix:SOCKET")`, checks health, lists the services by reflection,
builds the vmmd.v1 messages from the reflected descriptors and calls Info, Pause, Resume and
GetMigrationParameters. It prints one line per authority and exits non-zero on any mismatch.
"""

import sys

PIP = "python3 -m pip install grpcio grpcio-reflection grpcio-health-checking protobuf"

try:
    import grpc
    from google.protobuf import descriptor_pool, message_factory
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as e:
    print(f"grpc_clients.py: {e}; install the Python gRPC client: {PIP}", file=sys.stderr)
    sys.exit(3)

TIMEOUT = 10


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def enum_name(msg, field):
    value = getattr(msg, field)
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


class Vmm:
    """`vmmd.v1.Vmm` through descriptors fetched by reflection."""

    def __init__(self, channel, pool):
        self.channel = channel
        self.service = pool.FindServiceByName("vmmd.v1.Vmm")

    def call(self, method, **fields):
        m = self.service.methods_by_name[method]
        req = message_factory.GetMessageClass(m.input_type)(**fields)
        resp = message_factory.GetMessageClass(m.output_type)
        rpc = self.channel.unary_unary(
            f"/{self.service.full_name}/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=resp.FromString,
        )
        return rpc(req, timeout=TIMEOUT)


def check(socket, pid, label, authority):
    options = [] if authority is None else [("grpc.default_authority", authority)]
    with grpc.insecure_channel(f"unix:{socket}", options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = []
        for service in ("", "vmmd.v1.Vmm"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            if status != "SERVING":
                fail(f"{label}: health of {service!r} is {status}")
            statuses.append(status)

        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        for want in ("vmmd.v1.Vmm", "grpc.health.v1.Health"):
            if want not in services:
                fail(f"{label}: reflection lists {services}, not {want}")
        vmm = Vmm(channel, descriptor_pool.DescriptorPool(db))

        info = vmm.call("Info")
        state = enum_name(info, "run_state")
        if state != "RUN_STATE_RUNNING" or info.pid != pid:
            fail(f"{label}: Info says {state} pid {info.pid}; want RUN_STATE_RUNNING pid {pid}")
        paused = enum_name(vmm.call("Pause"), "run_state")
        resumed = enum_name(vmm.call("Resume"), "run_state")
        if (paused, resumed) != ("RUN_STATE_PAUSED", "RUN_STATE_RUNNING"):
            fail(f"{label}: Pause gave {paused}, Resume gave {resumed}")
        mode = enum_name(vmm.call("GetMigrationParameters"), "mode")
        print(
            f"{label}: health {'/'.join(statuses)}; reflection {len(services)} services incl. "
            f"vmmd.v1.Vmm; Info {state} pid {info.pid}; Pause {paused}; Resume {resumed}; "
            f"GetMigrationParameters {mode}",
            flush=True,
        )


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    socket, pid = sys.argv[1], int(sys.argv[2])
    print(f"grpcio {grpc.__version__}", flush=True)
    cases = [
        ("default authority (percent-encoded path)", None),
        ("raw socket path authority (grpc-java)", socket),
        ("localhost authority (grpc-go)", "localhost"),
    ]
    for label, authority in cases:
        try:
            check(socket, pid, label, authority)
        except grpc.RpcError as e:
            fail(f"{label}: {e.code()}: {e.details()}")
    print("all authorities served", flush=True)


if __name__ == "__main__":
    main()
