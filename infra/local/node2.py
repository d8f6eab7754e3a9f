"""Start a second Ray node on this machine, joined to the local head, on 127.0.0.1 only.

`ray start --address` refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(which keeps every Ray port on loopback), and with it set to 1 it resolves the head to
the machine's external address. This does what `ray start --address` does after those
checks, as Ray's own `ray.cluster_utils.Cluster.add_node` does for multi-node tests on
one machine: a non-head `Node` with its address pinned to 127.0.0.1.

    python infra/local/node2.py GCS_PORT CPUS NODE_MANAGER_PORT
"""
import sys

from ray._private.node import Node
from ray._private.parameter import RayParams


def main() -> None:
    gcs_port, cpus, manager_port = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    params = RayParams(node_ip_address="127.0.0.1", gcs_address=f"127.0.0.1:{gcs_port}", num_cpus=cpus,
                       resources={"node2": 1}, node_manager_port=manager_port, object_store_memory=500_000_000,
                       include_log_monitor=False, min_worker_port=0, max_worker_port=0,
                       # its own runtime_env folder: both nodes share this machine's session folder, and
                       # this node's agent would otherwise delete a job's working_dir under the driver
                       runtime_env_dir_name="runtime_resources_node2")
    params.dashboard_agent_listen_port = None  # a free one, not the head agent's
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(f"node 2 joined 127.0.0.1:{gcs_port}: {node.node_id}", flush=True)


if __name__ == "__main__":
    main()
