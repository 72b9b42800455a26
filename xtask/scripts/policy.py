"""The labeller's ValidatingAdmissionPolicy, evaluated on requests.

Usage: policy.py RENDERED.yaml

Reads the rendered manifests, takes the ValidatingAdmissionPolicy named
intel-gpu-labeler, and evaluates its variables and validations with
cel-python (a CEL implementation independent of the API server's cel-go)
on Node updates the labeller makes and on updates it must not make.
Prints one line per case and exits 1 when a case is decided wrongly.

What it does not model: the API server's type checking and cost limits,
matchConditions (the cases are all the labeller's), and CEL's optional
syntax (the DRA driver's policy uses it and is not evaluated here).
"""

import sys

import celpy
import yaml

NODE = "edge-0"
BASE = {"kubernetes.io/hostname": NODE, "kubernetes.io/arch": "amd64"}


def node(labels, annotations=None, spec=None):
    return {
        "metadata": {"name": NODE, "labels": labels, "annotations": annotations or {}},
        "spec": spec or {},
    }


def request(node_name):
    extra = {} if node_name is None else {"authentication.kubernetes.io/node-name": [node_name]}
    return {
        "userInfo": {
            "username": "system:serviceaccount:intel-gpu:intel-gpu-labeler",
            "extra": extra,
        },
        "operation": "UPDATE",
    }


# (what, new object, old object, node bound to the token, allowed)
CASES = [
    ("the plugin label set", node({**BASE, "intelgpu": "enabled"}), node(BASE), NODE, True),
    ("the DRA variant set", node({**BASE, "intelgpu-dra": "enabled"}), node(BASE), NODE, True),
    (
        "discovery labels set",
        node({**BASE, "gpu.intel.com/tiles": "2", "intel.feature.node.kubernetes.io/gpu": "true"}),
        node(BASE),
        NODE,
        True,
    ),
    ("its labels removed", node(BASE), node({**BASE, "intelgpu": "enabled", "gpu.intel.com/tiles": "2"}), NODE, True),
    (
        "the grace clock set",
        node(BASE, {"gpu.intel.com/labeler-gpu-absent-since": "1700000000"}),
        node(BASE),
        NODE,
        True,
    ),
    ("another label set", node({**BASE, "evil": "x"}), node(BASE), NODE, False),
    ("a system label changed", node({**BASE, "kubernetes.io/hostname": "other"}), node(BASE), NODE, False),
    ("a system label removed", node({"kubernetes.io/arch": "amd64"}), node(BASE), NODE, False),
    ("another annotation set", node(BASE, {"x": "y"}), node(BASE), NODE, False),
    ("the opt-out annotation removed", node(BASE), node(BASE, {"gpu.intel.com/labeler": "disabled"}), NODE, False),
    ("the Node tainted", node(BASE, spec={"taints": [{"key": "k", "effect": "NoSchedule"}]}), node(BASE), NODE, False),
    ("another Node labelled", node({**BASE, "intelgpu": "enabled"}), node(BASE), "other-node", False),
    ("a token bound to no node", node({**BASE, "intelgpu": "enabled"}), node(BASE), None, False),
]


def holds(result):
    """True only for a boolean true: an evaluation error refuses, as the
    policy's failurePolicy Fail does."""
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def main():
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    policy = next(
        d["spec"]
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] == "intel-gpu-labeler"
    )
    env = celpy.Environment()
    variables = [(v["name"], env.program(env.compile(v["expression"]))) for v in policy.get("variables", [])]
    validations = [(v.get("message", ""), env.program(env.compile(v["expression"]))) for v in policy["validations"]]
    wrong = 0
    for what, new, old, bound, allowed in CASES:
        activation = {
            "object": celpy.json_to_cel(new),
            "oldObject": celpy.json_to_cel(old),
            "request": celpy.json_to_cel(request(bound)),
        }
        values = celpy.celtypes.MapType()
        for name, program in variables:
            values[celpy.celtypes.StringType(name)] = program.evaluate({**activation, "variables": values})
        refused = [
            message
            for message, program in validations
            if not holds(program.evaluate({**activation, "variables": values}))
        ]
        decided = not refused
        verdict = "ok" if decided == allowed else "WRONG"
        wrong += decided != allowed
        print(f"{verdict}: {what}: {'allowed' if decided else 'refused (' + '; '.join(refused) + ')'}")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
