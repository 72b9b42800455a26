"""An independent gRPC peer for the framework's interop tests: Python grpcio
(grpc-core underneath), with stubs generated at run time by grpcio-tools
from the framework's own .proto.

Two roles, each printing one JSON object per line on stdout:

  client --socket PATH --authority MODE
      Calls every DevicePlugin RPC on PATH and reports each outcome.
  registration --dir DIR --authority MODE --count N
      Serves v1beta1.Registration on DIR/kubelet.sock like a kubelet: inside
      Register it dials the plugin back with MODE and calls
      GetDevicePluginOptions, then keeps a ListAndWatch stream open. After
      N registrations it serves on until its standard input closes.

MODE is how the `:authority` is chosen: `default` (grpc-core's own choice
for a unix: target), `raw` (the socket path, as grpc-go in kubelets before
1.26), `percent` (the percent-encoded path), `localhost`.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import urllib.parse
from concurrent import futures

import grpc
from grpc_tools import protoc

PROTO = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "deviceplugin_v1beta1.proto"
)


def stubs():
    out = tempfile.mkdtemp(prefix="devplugin-py-")
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
    import deviceplugin_v1beta1_pb2 as pb  # noqa: E402
    import deviceplugin_v1beta1_pb2_grpc as rpc  # noqa: E402

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


def emit(**fields):
    print(json.dumps(fields), flush=True)


def outcome(call):
    try:
        return {"ok": True, "value": call()}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}


def run_client(pb, rpc, args):
    with channel(args.socket, args.authority) as ch:
        stub = rpc.DevicePluginStub(ch)
        t = 5

        def options():
            o = stub.GetDevicePluginOptions(pb.Empty(), timeout=t)
            return {"preferred": o.get_preferred_allocation_available, "pre_start": o.pre_start_required}

        def list_and_watch():
            stream = stub.ListAndWatch(pb.Empty(), timeout=t)
            first = next(stream)
            stream.cancel()
            return sorted(d.ID for d in first.devices)

        def preferred():
            req = pb.PreferredAllocationRequest(
                container_requests=[
                    pb.ContainerPreferredAllocationRequest(
                        available_deviceIDs=["null-0", "null-1", "null-2"],
                        must_include_deviceIDs=["null-2"],
                        allocation_size=2,
                    )
                ]
            )
            r = stub.GetPreferredAllocation(req, timeout=t)
            return list(r.container_responses[0].deviceIDs)

        def allocate():
            req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["null-1"])])
            r = stub.Allocate(req, timeout=t)
            return dict(r.container_responses[0].envs)

        def pre_start():
            stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=["null-1"]), timeout=t)
            return None

        for name, call in [
            ("GetDevicePluginOptions", options),
            ("ListAndWatch", list_and_watch),
            ("GetPreferredAllocation", preferred),
            ("Allocate", allocate),
            ("PreStartContainer", pre_start),
        ]:
            emit(rpc=name, **outcome(call))


def run_registration(pb, rpc, args):
    done = threading.Event()
    count = {"n": 0}
    lock = threading.Lock()

    class Registration(rpc.RegistrationServicer):
        def Register(self, request, context):
            # Like the kubelet (1.26+): dial back and read the options before
            # answering; a failure fails Register.
            path = os.path.join(args.dir, request.endpoint)
            ch = channel(path, args.authority)
            stub = rpc.DevicePluginStub(ch)
            try:
                grpc.channel_ready_future(ch).result(timeout=10)
                opts = stub.GetDevicePluginOptions(pb.Empty(), timeout=10)
            except (grpc.RpcError, grpc.FutureTimeoutError) as e:
                emit(event="dial-back-failed", resource=request.resource_name, error=str(e))
                ch.close()
                context.abort(grpc.StatusCode.UNKNOWN, f"dial back to {path} failed: {e}")

            def watch():
                # Like the kubelet, the stream stays open while it lives.
                try:
                    stream = stub.ListAndWatch(pb.Empty())
                    first = next(stream)
                    ids = sorted(d.ID for d in first.devices)
                    emit(
                        event="registered",
                        resource=request.resource_name,
                        endpoint=request.endpoint,
                        version=request.version,
                        preferred=opts.get_preferred_allocation_available,
                        devices=ids,
                    )
                    with lock:
                        count["n"] += 1
                        if count["n"] >= args.count:
                            done.set()
                    for _ in stream:
                        pass
                except grpc.RpcError as e:
                    if not done.is_set():
                        emit(event="list-and-watch-failed", resource=request.resource_name, error=str(e))
                        done.set()
                finally:
                    ch.close()

            threading.Thread(target=watch, daemon=True).start()
            return pb.Empty()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_RegistrationServicer_to_server(Registration(), server)
    sock = os.path.join(args.dir, "kubelet.sock")
    server.add_insecure_port("unix:" + sock)
    server.start()
    emit(event="serving", socket=sock)
    finished = done.wait(timeout=args.timeout)
    if not finished:
        emit(event="timeout")
        server.stop(grace=None)
        sys.exit(1)
    # Serve on (streams open) until the test closes our standard input.
    sys.stdin.read()
    server.stop(grace=None)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    c = sub.add_parser("client")
    c.add_argument("--socket", required=True)
    c.add_argument("--authority", default="default")
    r = sub.add_parser("registration")
    r.add_argument("--dir", required=True)
    r.add_argument("--authority", default="default")
    r.add_argument("--count", type=int, default=1)
    r.add_argument("--timeout", type=float, default=30)
    args = p.parse_args()
    pb, rpc = stubs()
    if args.role == "client":
        run_client(pb, rpc, args)
    else:
        run_registration(pb, rpc, args)


if __name__ == "__main__":
    main()
