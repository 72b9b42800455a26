"""What `kubectl apply` of NEW does to a cluster holding OLD.

Usage: migration.py OLD.yaml NEW.yaml

Models the parts of apply that decide whether a migration is safe, and
exits 1 naming each problem:
- an object with the same group, kind, namespace and name is replaced in
  place; a DaemonSet's spec.selector is immutable, so apply fails when it
  differs (apps/v1 validation, ValidateDaemonSetSpecUpdate);
- a replaced DaemonSet rolls its pods with its updateStrategy: with
  RollingUpdate and maxSurge 0 the old pod on a node is deleted before the
  new one is created (pkg/controller/daemon/update.go); a surge runs both;
- objects in OLD that NEW does not name stay (apply without --prune);
- two DaemonSets whose pods run a GPU plugin and whose node selectors can
  match the same node register the same resource twice on it.
Not modelled: kubectl's three-way merge of the replaced object's fields,
node affinity and taints (node selectors that do not contradict are taken to
share a node, the cautious reading).
"""

import sys

import yaml


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def key(obj):
    group = obj["apiVersion"].rpartition("/")[0]
    meta = obj.get("metadata", {})
    return (group, obj["kind"], meta.get("namespace", ""), meta["name"])


def runs_gpu_plugin(ds):
    for c in ds["spec"]["template"]["spec"].get("containers", []):
        image = c.get("image", "").rsplit("/", 1)[-1]
        if image.split(":")[0].split("@")[0] == "intel-gpu-plugin":
            return True
    return False


def can_share_a_node(a, b):
    sa = a["spec"]["template"]["spec"].get("nodeSelector", {}) or {}
    sb = b["spec"]["template"]["spec"].get("nodeSelector", {}) or {}
    return all(sb.get(k, v) == v for k, v in sa.items())


def name(k):
    return f"{k[1]} {k[2]}/{k[3]}" if k[2] else f"{k[1]} {k[3]}"


def main(old_path, new_path):
    old = {key(o): o for o in load(old_path)}
    new = {key(o): o for o in load(new_path)}
    problems = []
    for k, obj in new.items():
        if k in old and obj["kind"] == "DaemonSet":
            if obj["spec"]["selector"] != old[k]["spec"]["selector"]:
                problems.append(f"{name(k)}: spec.selector differs; apply is refused (immutable)")
            strategy = obj["spec"].get("updateStrategy", {})
            surge = strategy.get("rollingUpdate", {}).get("maxSurge", 0)
            if strategy.get("type", "RollingUpdate") == "RollingUpdate" and surge not in (0, "0", "0%"):
                problems.append(f"{name(k)}: maxSurge {surge} runs the old and the new pod together")
    cluster = dict(old)
    cluster.update(new)
    plugins = [(k, o) for k, o in cluster.items() if o["kind"] == "DaemonSet" and runs_gpu_plugin(o)]
    for i, (ka, a) in enumerate(plugins):
        for kb, b in plugins[i + 1:]:
            if can_share_a_node(a, b):
                problems.append(f"{name(ka)} and {name(kb)} both run the GPU plugin on a node")
    # Every DaemonSet, ours and those left as they were, still finds its
    # service account.
    for k, o in cluster.items():
        if o["kind"] != "DaemonSet":
            continue
        sa = o["spec"]["template"]["spec"].get("serviceAccountName")
        if sa and ("", "ServiceAccount", k[2], sa) not in cluster:
            problems.append(f"{name(k)}: service account {k[2]}/{sa} does not exist")
    # A shared object we replace must still serve those who share it: a
    # ServiceAccount that stops mounting tokens breaks pods that need one.
    for k, o in new.items():
        if k in old and o["kind"] == "ServiceAccount":
            users = [name(d) for d, v in cluster.items()
                     if v["kind"] == "DaemonSet" and d not in new and d[2] == k[2]
                     and v["spec"]["template"]["spec"].get("serviceAccountName") == k[3]]
            if users:
                print(f"shared with what stays: {name(k)} (used by {', '.join(users)})")
    replaced = sorted(name(k) for k in old if k in new)
    left = sorted(name(k) for k in old if k not in new)
    print("replaced in place: " + (", ".join(replaced) or "nothing"))
    print("left as they were: " + (", ".join(left) or "nothing"))
    for p in problems:
        print("problem: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
