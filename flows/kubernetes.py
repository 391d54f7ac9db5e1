"""The Kubernetes work pool's base job template: prefect-kubernetes's own default, plus what a GPU
flow run needs. A flow run is one pod (prefect-kubernetes renders a single-pod Job whose container
is named prefect-job); multi-node training is a separate Indexed Job (multitag/distributed.py).

Added job variables: ``gpus`` (the container's ``nvidia.com/gpu`` limit: a string, as Kubernetes'
resource quantities are), ``node_selector`` and ``tolerations`` (GPU nodes), ``shm_size`` (``/dev/shm``
as a memory-backed emptyDir, for DataLoader workers), ``aws_secret_name`` (AWS credentials only
through ``envFrom`` a Secret), with CPU and memory requests; the pod runs as the image's non-root
user under the Pod Security "restricted" profile, with infra/kubernetes/rbac.yaml's ServiceAccount.
``infra/kubernetes/base-job-template.json`` is this template written out for ``prefect work-pool create --base-job-template`` (a test keeps the
two equal).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from multitag.distributed import CONTAINER_SECURITY, GPU_NODE_SELECTOR, GPU_TOLERATIONS, POD_SECURITY

TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "infra" / "kubernetes" / "base-job-template.json"

VARIABLES = {
    "gpus": {"type": "string", "pattern": "^[0-9]+$", "default": "1", "title": "GPUs",
             "description": "GPUs for the flow-run pod (the container's nvidia.com/gpu limit)."},
    "node_selector": {"type": "object", "additionalProperties": {"type": "string"}, "title": "Node selector",
                      "default": GPU_NODE_SELECTOR,
                      "description": "Labels of the nodes the pod may run on (GPU nodes)."},
    "tolerations": {"type": "array", "items": {"type": "object"}, "title": "Tolerations",
                    "default": GPU_TOLERATIONS,
                    "description": "Tolerations for the GPU nodes' taints."},
    "shm_size": {"type": "string", "default": "8Gi", "title": "Shared memory",
                 "description": "Size of /dev/shm, a memory-backed emptyDir (DataLoader workers share batches there)."},
    "aws_secret_name": {"type": "string", "default": "multitag-aws", "title": "AWS credentials Secret",
                        "description": "A Kubernetes Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and "
                                       "AWS_ENDPOINT_URL for MinIO), passed to the pod with envFrom."},
}
# service_account_name: infra/kubernetes/rbac.yaml's, which may run the multi-node training Job
DEFAULTS = {"cpu_request": "4", "memory_request": "16Gi", "memory_limit": "32Gi", "service_account_name": "multitag-flow"}


def base_job_template() -> dict:
    """prefect-kubernetes's default base job template with the GPU variables and manifest parts."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    props.update(copy.deepcopy(VARIABLES))
    for key, value in DEFAULTS.items():
        props[key]["default"] = value
    job = template["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    for key in ("completions", "parallelism"):  # Job fields, misplaced in the pod spec by the default
        job["spec"][key] = pod.pop(key, 1)
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    # Pod Security "restricted"; the root file system stays writable: the deployment's pull step
    # clones the project into the working directory
    pod["securityContext"] = copy.deepcopy(POD_SECURITY)
    container = pod["containers"][0]
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY)
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    container["envFrom"] = [{"secretRef": {"name": "{{ aws_secret_name }}"}}]
    return template


def write_template(path: Path = TEMPLATE_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base_job_template(), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_template())
