"""The migration page's kustomization, rendered for real: dpkit in IBM's namespace, IBM's ConfigMap kept as is.

docs/cex.md ("Migrating from IBM's plugin") tells operators to wrap deploy/overlays/cex in this
kustomization; if kustomize stopped rendering it that way, the page would be wrong.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

OVERLAY = Path(__file__).resolve().parents[2] / "deploy" / "overlays" / "cex"
WRAPPER = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: cex-device-plugin
resources:
  - {overlay}
patches:
  - patch: |-
      $patch: delete
      apiVersion: v1
      kind: ConfigMap
      metadata:
        name: cex-resources-config
"""


def _render(path: Path) -> list[dict[str, Any]]:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl (which has kustomize built in) is installed")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_documented_wrapper_runs_dpkit_in_ibms_namespace_on_ibms_configmap(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cex.md").read_text()
    assert WRAPPER.format(overlay="../dpkit/deploy/overlays/cex") in docs   # the page shows exactly this
    (tmp_path / "kustomization.yaml").write_text(WRAPPER.format(overlay=os.path.relpath(OVERLAY, tmp_path)))
    objs = _render(tmp_path)
    assert {o["metadata"]["namespace"] for o in objs} == {"cex-device-plugin"}
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"
            and o["metadata"]["name"].startswith("cex-resources")] == []        # yours is never replaced
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "configMap" in v and v["configMap"]["name"].startswith("cex"))
    assert volume["configMap"]["name"] == "cex-resources-config"               # IBM's name, as it is
    [mount] = [m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/config" and "subPath" not in mount           # where IBM mounts it
