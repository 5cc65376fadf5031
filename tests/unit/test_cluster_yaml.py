"""cluster.yaml passes Ray's own cluster-launcher validation, and asks for what meta-training needs."""

from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(raw))  # raises on any schema or consistency error


def test_cluster_yaml_has_gpu_workers_with_the_cuda_torch_and_fsmeta_installed():
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5")) for t in workers)
    setup = "\n".join(raw["setup_commands"])
    assert 'pip install -q "torch==2.13.0"' in setup  # PyPI's Linux wheel: the CUDA build
    assert "-c /tmp/constraints-gpu.txt -e ~/fsmeta" in setup and "grep -v '^torch'" in setup
    assert "--dashboard-host=127.0.0.1" in "\n".join(raw["head_start_ray_commands"])


def test_validation_catches_a_broken_config():
    pytest.importorskip("jsonschema")
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["available_node_types"]["ray.worker.gpu"]["unknown_field"] = 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(raw))
