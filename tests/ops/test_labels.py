"""Node-feature-discovery labels: the feature file NFD's local source reads."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path

import pytest
from scripted_vendor import RES, ScriptedVendor, widget

from dpkit.core.integrations.labels import MAX_FILE_BYTES, check_label, label_value, render, valid_labels
from dpkit.core.vendorapi.device import Device, Health, Snapshot
from dpkit.core.vendorapi.errors import ValidationError

FILE = "dpkit-scripted"


class LabelVendor(ScriptedVendor):
    """Labels like the GPU feature discovery's, plus some that nfd-master would refuse."""

    broken = False

    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        if self.broken:
            raise RuntimeError("NVML went away")
        devices: tuple[Device, ...] = snapshot.get(RES, ())
        return {
            "example.com/widget.count": str(len(devices)),
            "example.com/widget.healthy": str(sum(1 for d in devices if d.healthy)),
            "example.com/widget.product": label_value("Widget 3000 (rev B)"),
            "widget-present": "true",
            "kubernetes.io/hostname": "spoofed",
            "example.com/widget.note": "has spaces",
        }


def parse_feature_file(path: Path) -> dict[str, str]:
    """How NFD's local source reads a file: comments skipped, name=value per line."""
    labels = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            labels[key] = value
    return labels


def test_labels_written_atomically_refused_ones_reported(kubelet, run_ops, short_tmp):
    features = short_tmp / "features.d"
    manager = run_ops(LabelVendor(), nfd_features_dir=str(features))
    labels = parse_feature_file(features / FILE)
    assert labels == {
        "example.com/widget.count": "4",
        "example.com/widget.healthy": "4",
        "example.com/widget.product": "Widget-3000-rev-B",
        "widget-present": "true",
    }
    assert sorted(p.name for p in features.iterdir()) == [FILE], "no temporary file left behind"
    assert stat.S_IMODE((features / FILE).stat().st_mode) == 0o644
    refused = manager.status()["node_labels"]["refused"]
    assert any("kubernetes.io" in r for r in refused) and any("has spaces" in r for r in refused)


def test_labels_follow_devices_and_go_at_shutdown(kubelet, run_ops, short_tmp, eventually):
    features = short_tmp / "features.d"
    vendor = LabelVendor()
    manager = run_ops(vendor, nfd_features_dir=str(features))
    vendor.set_health("w1", Health.UNHEALTHY, "ECC")
    eventually(lambda: parse_feature_file(features / FILE)["example.com/widget.healthy"] == "3")
    vendor.push({RES: (*vendor.current[RES], widget(4))})
    eventually(lambda: parse_feature_file(features / FILE)["example.com/widget.count"] == "5")
    manager.stop()
    assert not (features / FILE).exists()


def test_vendor_failure_keeps_the_last_good_file(kubelet, run_ops, short_tmp, eventually):
    features = short_tmp / "features.d"
    vendor = LabelVendor()
    manager = run_ops(vendor, nfd_features_dir=str(features))
    vendor.broken = True
    vendor.push({RES: vendor.current[RES][:2]})
    eventually(lambda: "NVML went away" in manager.status()["node_labels"]["error"])
    assert parse_feature_file(features / FILE)["example.com/widget.count"] == "4"


def test_features_dir_that_cannot_be_created_is_an_error_not_a_crash(kubelet, run_ops, short_tmp):
    blocker = short_tmp / "file"
    blocker.write_text("")
    manager = run_ops(LabelVendor(), nfd_features_dir=str(blocker / "features.d"))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    assert "cannot write" in manager.status()["node_labels"]["error"]


@pytest.mark.parametrize(("key", "value"), [
    ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-40GB"),
    ("feature.node.kubernetes.io/cpu-model", "x"),
    ("sub.feature.node.kubernetes.io/x", ""),
    ("plain", "true"),
])
def test_publishable_labels(key, value):
    check_label(key, value)


@pytest.mark.parametrize(("key", "value"), [
    ("kubernetes.io/arch", "amd64"),
    ("node.kubernetes.io/x", "y"),
    ("k8s.io/x", "y"),
    ("sigs.k8s.io/x", "y"),
    ("Example.com/x", "y"),
    ("example.com/", "y"),
    ("example.com/" + "n" * 64, "y"),
    ("example.com/x", "v" * 64),
    ("example.com/x", "-leading"),
    ("example.com/x", "a=b"),
    ("example.com/x", "line\nbreak"),
])
def test_refused_labels(key, value):
    with pytest.raises(ValidationError):
        check_label(key, value)


def test_label_value_sanitises_hardware_text():
    assert label_value("NVIDIA A100-SXM4-40GB") == "NVIDIA-A100-SXM4-40GB"
    assert label_value("  (x) ") == "x"
    assert len(label_value("a" * 100)) == 63
    check_label("example.com/x", label_value("  ~weird//text!! " * 10))


def test_non_mapping_and_oversized_answers():
    assert valid_labels(["not", "a", "mapping"])[0] == {}
    many = {f"example.com/label-{i}": "v" * 60 for i in range(1200)}
    assert len(render(many, "x").encode()) > MAX_FILE_BYTES


class FloodVendor(ScriptedVendor):
    def node_labels(self, snapshot: Snapshot) -> Mapping[str, str]:
        return {f"example.com/label-{i}": "v" * 60 for i in range(1200)}


def test_oversized_file_is_refused(kubelet, run_ops, short_tmp):
    features = short_tmp / "features.d"
    manager = run_ops(FloodVendor(), nfd_features_dir=str(features))
    assert "NFD reads at most" in manager.status()["node_labels"]["error"]
    assert not (features / FILE).exists()


def test_no_labels_no_file(kubelet, run_ops, short_tmp, eventually):
    features = short_tmp / "features.d"
    vendor = LabelVendor()
    manager = run_ops(vendor, nfd_features_dir=str(features))
    assert (features / FILE).exists()
    vendor.node_labels = lambda snapshot: {}  # type: ignore[method-assign]
    vendor.push({RES: vendor.current[RES][:1]})
    eventually(lambda: not (features / FILE).exists())
    assert manager.status()["node_labels"]["labels"] == {}


def test_unwritten_file_is_retried_without_a_device_change(kubelet, run_ops, short_tmp, eventually):
    blocker = short_tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    features = blocker / "features.d"
    manager = run_ops(LabelVendor(), nfd_features_dir=str(features))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    status = manager.status()["node_labels"]
    assert "cannot write" in status["error"] and status["retry_in_s"] is not None
    blocker.unlink()
    blocker.mkdir()
    eventually(lambda: (features / FILE).exists(), timeout=15)  # first retries after 1 s, 2 s, 4 s
    assert parse_feature_file(features / FILE)["example.com/widget.count"] == "4"
    status = manager.status()["node_labels"]
    assert status["error"] == "" and status["retry_in_s"] is None


def test_hard_link_at_the_old_temp_name_is_never_written_through(kubelet, run_ops, short_tmp):
    import os

    features = short_tmp / "features.d"
    features.mkdir()
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    os.link(victim, features / f".{FILE}.{os.getpid()}.tmp")
    run_ops(LabelVendor(), nfd_features_dir=str(features))
    assert parse_feature_file(features / FILE)["widget-present"] == "true"
    assert victim.read_text() == "precious\n"
