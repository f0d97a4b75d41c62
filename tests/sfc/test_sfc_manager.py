"""The sfc vendor under the real manager and the kubelet emulator, over real unix sockets.

The devices live in a sysfs-shaped temp tree, so changes are found by polling (resync_interval
0.05 s); the uevent path is exercised under umockdev in test_sfc_udev.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpkit.core.tools.cli import main as dpkit_main
from dpkit.core.tools.kubelet import Kubelet
from dpkit.sfc.vendor import SfcVendor

RESOURCE = "solarflare.com/sfc"


def healthy(kubelet: Kubelet, resource: str, device: str) -> bool:
    state = kubelet.devices(resource).get(device)
    return state is not None and state.health == "Healthy"


def test_allocate_gives_an_onload_app_what_it_needs(host: Any, kubelet: Kubelet, run_manager: Any) -> None:
    host.add_nic("0000:03:00.0", numa="0")
    host.add_nic("0000:03:00.1", numa="0")
    host.add_nic("0000:81:00.0", numa="1")
    host.install_onload()
    vendor = SfcVendor(host.config(onload={"preload": True, "env": {"EF_POLL_USEC": "100000"}}))
    run_manager(vendor)
    assert kubelet.wait_for(lambda k: k.allocatable(RESOURCE) == 3)
    assert kubelet.devices(RESOURCE)["0000:81:00.0"].numa == (1,)

    ids, response = kubelet.allocate(RESOURCE, 2)
    assert sorted(ids) == ["0000:03:00.0", "0000:03:00.1"]  # one card, via GetPreferredAllocation
    assert sorted(response.envs["SFC_INTERFACES"].split(",")) == ["ens3f0", "ens3f1"]
    assert sorted(response.envs["SFC_PCI_ADDRESSES"].split(",")) == ["0000:03:00.0", "0000:03:00.1"]
    assert response.envs["LD_PRELOAD"] == "/opt/onload/usr/lib64/libonload.so"
    assert response.envs["EF_POLL_USEC"] == "100000"
    assert {(d.host_path, d.container_path) for d in response.devices} == {
        (f"{host.dev}/{n}", f"/dev/{n}") for n in ("onload", "onload_epoll", "sfc_char")}
    assert {(m.container_path, m.read_only) for m in response.mounts} == {
        (f"/opt/onload/usr/lib64/{n}", True) for n in ("libonload.so", "libonload.so.1", "libonload_ext.so.2")}


def test_health_and_hotplug_by_polling(host: Any, kubelet: Kubelet, run_manager: Any) -> None:
    host.add_nic("0000:03:00.0", {"ens3f0": "up"})
    run_manager(SfcVendor(host.config()))
    assert kubelet.wait_for(lambda k: healthy(k, RESOURCE, "0000:03:00.0"))

    host.set_link("0000:03:00.0", "ens3f0", "down")
    assert kubelet.wait_for(lambda k: k.allocatable(RESOURCE) == 0 and k.capacity(RESOURCE) == 1)
    host.set_link("0000:03:00.0", "ens3f0", "up")
    assert kubelet.wait_for(lambda k: healthy(k, RESOURCE, "0000:03:00.0"))

    host.add_nic("0000:04:00.0")  # hotplug: appears without a restart
    assert kubelet.wait_for(lambda k: k.allocatable(RESOURCE) == 2)
    host.remove("0000:04:00.0")
    assert kubelet.wait_for(lambda k: k.allocatable(RESOURCE) == 1 and k.capacity(RESOURCE) == 2)


def test_pools_register_separately_and_slots_share_health(host: Any, kubelet: Kubelet, run_manager: Any) -> None:
    host.add_nic("0000:03:00.0", {"trade0": "up"})
    host.add_nic("0000:04:00.0", {"ens4f0": "up"})
    config = host.config(pools=[{"resource": "solarflare.com/trading", "interfaces": ["trade*"], "slots": 4}])
    run_manager(SfcVendor(config))
    assert kubelet.wait_for(lambda k: k.allocatable("solarflare.com/trading") == 4 and k.allocatable(RESOURCE) == 1)
    ids, response = kubelet.allocate("solarflare.com/trading", 2)
    assert len(ids) == 2 and response.envs["SFC_INTERFACES"] == "trade0"
    assert "LD_PRELOAD" not in response.envs and not response.devices  # no Onload on this host
    host.set_link("0000:03:00.0", "trade0", "down")
    assert kubelet.wait_for(lambda k: k.allocatable("solarflare.com/trading") == 0)
    assert kubelet.allocatable(RESOURCE) == 1


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """The CLI points the dpkit logger at pytest's captured stderr; put it back afterwards."""
    logger = logging.getLogger("dpkit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("cli_logging")
def test_cli_discover_and_doctor(host: Any, tmp_path: Path, capsys: Any) -> None:
    host.add_nic("0000:03:00.0")
    host.add_nic("0000:03:00.1", {}, driver="vfio-pci")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"vendor": host.config()}))
    assert dpkit_main(["discover", "sfc", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in report["resources"][0]["devices"]] == ["0000:03:00.0"]
    findings = {f["subject"]: f for f in report["findings"]}
    assert findings["0000:03:00.1"]["reason"] == "bound to vfio-pci, not sfc"
    assert "serving plain NICs" in findings["onload"]["reason"]

    assert dpkit_main(["doctor", "sfc", "--config", str(config)]) == 1  # no kubelet, no Onload here
    out = capsys.readouterr().out
    assert "[ok  ] Solarflare NICs present: 1 of 2 function(s) bound to the driver" in out
    assert "[FAIL] onload libraries" in out


@pytest.mark.usefixtures("cli_logging")
def test_bad_vendor_config_is_a_clean_cli_error(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"vendor": {"pools": [{"resource": "bad"}]}}))
    assert dpkit_main(["discover", "sfc", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    # the key path, whether the CLI writes it "vendor.pools[0]..." or "<file>: vendor: pools[0]..."
    assert "pools[0].resource" in err and "vendor" in err
