"""`dpkit run` as a real process with every integration on: files, metrics, status, clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from dpkit.core.cdi import spec_file_name
from dpkit.core.control import query

WIDGET = "example.com/widget"


def test_run_with_cdi_metrics_and_pod_view_then_sigterm(kubelet, plugin_dir, short_tmp):
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": "a", "numa": 0}, {"id": "b", "numa": 0}]}}))
    cdi_dir, state = short_tmp / "cdi", short_tmp / "st"
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "plugin_dir": str(plugin_dir), "state_dir": str(state), "log_format": "json",
        "pod_resources_socket": str(kubelet.pod_resources_socket), "cdi_dir": str(cdi_dir), "cdi_allocate": True,
        "nfd_features_dir": str(short_tmp / "nfd"),
        "metrics_address": "127.0.0.1:0", "vendor": {"devices_file": str(devices), "script": False},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "dpkit.core.cli", "run", "sim", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 20)
        ids, response = kubelet.allocate(WIDGET, 1, pod="web-0", container="app")
        assert [c.name for c in response.cdi_devices] == [f"{WIDGET}={ids[0]}"]
        spec = json.loads((cdi_dir / spec_file_name("sim", WIDGET)).read_text())
        assert {d["name"] for d in spec["devices"]} == {"a", "b"}
        status = query(state)["status"]
        assert status["resources"][0]["holders"] == {ids[0]: "default/web-0/app"}
        port = int(status["metrics"]["address"].rpartition(":")[2])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        held = [s.labels for s in families["dpkit_device_allocated"].samples]
        assert held == [{"resource": WIDGET, "device": ids[0], "namespace": "default", "pod": "web-0",
                         "container": "app"}]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert list(Path(cdi_dir).iterdir()) == [], "CDI specs are removed on shutdown"
