"""An independent plugin-watcher client for the registration interop test:
Python grpcio (grpc-core underneath), stubs generated at run time by
grpcio-tools from the framework's own pluginregistration .proto.

  watcher --socket PATH --authority MODE
      Calls GetInfo on PATH, then NotifyRegistrationStatus(registered), as
      the kubelet's plugin watcher does, and prints one JSON object.

MODE is how the `:authority` is chosen: `default` (grpc-core's own choice
for a unix: target: the percent-encoded path), `raw` (the socket path),
`percent` (the percent-encoded path, as grpc-go >= 1.57 sends for the
kubelet's plain-path dial), `localhost`.
"""

import argparse
import json
import os
import sys
import tempfile
import urllib.parse

import grpc
from grpc_tools import protoc

PROTO = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "pluginregistration_v1.proto"
)


def stubs():
    out = tempfile.mkdtemp(prefix="dra-py-")
    proto_dir = os.path.dirname(os.path.abspath(PROTO))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.basename(PROTO),
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO}: {rc}")
    sys.path.insert(0, out)
    import pluginregistration_v1_pb2 as pb  # noqa: E402
    import pluginregistration_v1_pb2_grpc as rpc  # noqa: E402

    return pb, rpc


def channel(path, mode):
    options = []
    if mode == "raw":
        options.append(("grpc.default_authority", path))
    elif mode == "percent":
        options.append(("grpc.default_authority", urllib.parse.quote(path, safe="")))
    elif mode == "localhost":
        options.append(("grpc.default_authority", "localhost"))
    elif mode != "default":
        sys.exit(f"unknown authority mode {mode!r}")
    return grpc.insecure_channel("unix:" + path, options=options)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["watcher"])
    p.add_argument("--socket", required=True)
    p.add_argument("--authority", default="default")
    a = p.parse_args()
    pb, rpc = stubs()
    with channel(a.socket, a.authority) as ch:
        stub = rpc.RegistrationStub(ch)
        try:
            info = stub.GetInfo(pb.InfoRequest(), timeout=5)
            stub.NotifyRegistrationStatus(
                pb.RegistrationStatus(plugin_registered=True, error=""), timeout=5
            )
            print(
                json.dumps(
                    {
                        "ok": True,
                        "type": info.type,
                        "name": info.name,
                        "endpoint": info.endpoint,
                        "versions": list(info.supported_versions),
                    }
                ),
                flush=True,
            )
        except grpc.RpcError as e:
            print(json.dumps({"ok": False, "code": e.code().name, "details": e.details()}), flush=True)


if __name__ == "__main__":
    main()
