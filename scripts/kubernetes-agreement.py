"""Checks that rendered Kubernetes manifests agree with the edge's code:

- the probes ask for /healthz or /readyz on the port the edge's admin
  listener has in the ConfigMap; the container's ports and the advertised
  peer address are the listeners' ports;
- the ConfigMap's edge.toml is a configuration the edge accepts
  (relay-edge --check-config, unknown keys being errors), with the values
  the Deployment's Secrets would give;
- every environment variable the Deployment sets is one the edge reads
  (its --help lists them; RELAY_LOG is read by its log filter).

    python3 kubernetes-agreement.py rendered.yaml path/to/relay-edge
"""
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml


def fail(message):
    sys.exit(f"kubernetes-agreement: {message}")


def main(rendered_path, edge):
    documents = [d for d in yaml.safe_load_all(open(rendered_path)) if d]
    deployments = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "relay-edge"]
    if len(deployments) != 1:
        fail("expected one relay-edge Deployment")
    pod = deployments[0]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "edge"]
    config_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    configmaps = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_name]
    if len(configmaps) != 1:
        fail(f"the ConfigMap {config_name} the Deployment mounts is not rendered")
    edge_toml = configmaps[0]["data"]["edge.toml"]
    config = tomllib.loads(edge_toml)

    # Probes: the admin listener's port, the paths the edge serves.
    admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports.get("admin") != admin_port:
        fail(f"the container's admin port {ports.get('admin')} is not the edge's {admin_port}")
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
        get = container[probe]["httpGet"]
        port = ports.get(get["port"], get["port"])
        if port != admin_port or get["path"] not in ("/healthz", "/readyz"):
            fail(f"{probe} asks for {get['path']} on {port}")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("readiness must be /readyz (it fails from the start of a drain)")
    public = {"wss": config["public"]["listen"], "tunnel": config["tunnel"]["listen"]}
    if "mqtts_listen" in config["public"]:
        public["mqtts"] = config["public"]["mqtts_listen"]
    elif "mqtts" in ports:
        fail("the container has an mqtts port, but the edge serves no mqtts_listen")
    if "peer_listen" in config.get("cluster", {}):
        public["peer"] = config["cluster"]["peer_listen"]
        peer_address = next((v.get("value", "") for v in container.get("env", []) if v["name"] == "RELAY_PEER_ADDRESS"), "")
        if not peer_address.endswith(":" + config["cluster"]["peer_listen"].rsplit(":", 1)[1]):
            fail(f"RELAY_PEER_ADDRESS {peer_address!r} is not on the peer listener's port")
    for name, listen in public.items():
        if ports.get(name) != int(listen.rsplit(":", 1)[1]):
            fail(f"the container's {name} port is not the edge's {listen}")

    # Environment: only what the edge reads.
    help_text = subprocess.run([edge, "--help"], capture_output=True, text=True, check=True).stdout
    known = set(re.findall(r"env: (RELAY_[A-Z_]+)", help_text)) | {"RELAY_LOG"}
    # A variable only other variables refer to, as $(NAME), is the pod's
    # (the downward API), not the edge's.
    referenced = set()
    for variable in container.get("env", []):
        referenced |= set(re.findall(r"\$\(([A-Z_]+)\)", variable.get("value", "")))
    for variable in container.get("env", []):
        if variable["name"] not in known and variable["name"] not in referenced:
            fail(f"the Deployment sets {variable['name']}, which the edge does not read")

    # The ConfigMap, as the edge reads it, with stand-ins for the Secrets.
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "edge.toml")
        open(path, "w").write(edge_toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        # Stand-ins for what the cluster fills in.
        stand_ins = {"metadata.name": "relay-edge-6d4f9-x2kq7", "status.podIP": "10.1.2.3"}
        for variable in container.get("env", []):
            source = variable.get("valueFrom", {})
            if "fieldRef" in source:
                value = stand_ins[source["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in source:
                value = "a stand-in for the secret " + source["secretKeyRef"]["name"]
            else:
                value = re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1), ""), variable.get("value", ""))
            env[variable["name"]] = value
        env["RELAY_DATABASE_URL"] = "postgres://check@localhost/relay"
        # The certificate files come from the TLS Secret's mount.
        for name in ("tls_cert", "tls_key"):
            stand_in = os.path.join(scratch, name)
            open(stand_in, "w").write("stand-in\n")
            env["RELAY_" + name.upper()] = stand_in
        args = [edge, "--check-config"] + container.get("args", [])
        args[args.index("--config") + 1] = path
        checked = subprocess.run(args, capture_output=True, text=True, env=env)
        if checked.returncode != 0:
            fail(f"the ConfigMap is not a valid edge configuration:\n{checked.stderr}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
