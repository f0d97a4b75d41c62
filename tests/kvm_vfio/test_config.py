"""The vendor section is validated up front; each mistake names its key."""

from __future__ import annotations

import re
from typing import Any

import pytest

from dpkit.core.tools.registry import load_vendor_class
from dpkit.core.vendorapi.errors import ConfigError
from dpkit.kvm_vfio.config import DEFAULT_SLOTS, Selector, parse_config
from dpkit.kvm_vfio.vendor import KvmVfioVendor


def test_defaults_match_kubevirt() -> None:
    config = parse_config({})
    assert (config.sys_root, config.dev_root) == ("/sys", "/dev")
    assert config.kvm_slots == config.vhost_net_slots == config.tun_slots == DEFAULT_SLOTS == 1000
    assert config.selectors == () and config.uevent_source == "udev"


def test_selector_is_normalised() -> None:
    config = parse_config({"pci_host_devices": [
        {"pci_vendor_selector": "10DE:1EB8", "class": "0x0302", "addresses": ["0000:3B:00.0"],
         "resource_name": "nvidia.com/T4"}]})
    assert config.selectors == (Selector("10de", "1eb8", "nvidia.com/T4", "0302", ("0000:3b:00.0",)),)
    selector = config.selectors[0]
    assert selector.matches("10de", "1eb8", "030200", "0000:3b:00.0")
    assert not selector.matches("10de", "1eb8", "030000", "0000:3b:00.0")  # other class
    assert not selector.matches("10de", "1eb8", "030200", "0000:5e:00.0")  # not listed


@pytest.mark.parametrize(("raw", "key"), [
    ({"kvm_slot": 3}, "vendor.kvm_slot: unknown key (did you mean 'kvm_slots'?)"),
    ({"kvm_slots": -1}, "vendor.kvm_slots"),
    ({"tun_slots": "8"}, "vendor.tun_slots"),
    ({"vhost_net_slots": True}, "vendor.vhost_net_slots"),
    ({"sys_root": "sys"}, "vendor.sys_root"),
    ({"dev_root": "/dev/../etc"}, "vendor.dev_root"),
    ({"health_interval": 0}, "vendor.health_interval"),
    ({"uevent_source": "netlink"}, "vendor.uevent_source"),
    ({"pci_ids": ""}, "vendor.pci_ids"),
    ({"pci_host_devices": {"pci_vendor_selector": "10de:1eb8"}}, "vendor.pci_host_devices"),
    ({"pci_host_devices": ["10de:1eb8"]}, "vendor.pci_host_devices[0]"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de-1eb8"}]}, "vendor.pci_host_devices[0].pci_vendor_selector"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:zzzz"}]}, "vendor.pci_host_devices[0].pci_vendor_selector"),
    ({"pci_host_devices": [{}]}, "vendor.pci_host_devices[0].pci_vendor_selector"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "resourceName": "x"}]},
     "vendor.pci_host_devices[0].resourceName: unknown key (did you mean 'resource_name'?)"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "resource_name": "gpu"}]},
     "vendor.pci_host_devices[0].resource_name"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "resource_name": "devices.kubevirt.io/kvm"}]},
     "vendor.pci_host_devices[0].resource_name"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "class": "display"}]},
     "vendor.pci_host_devices[0].class"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "addresses": ["3b:00.0"]}]},
     "vendor.pci_host_devices[0].addresses"),
    ({"pci_host_devices": [{"pci_vendor_selector": "10de:1eb8", "addresses": "0000:3b:00.0"}]},
     "vendor.pci_host_devices[0].addresses"),
])
def test_bad_config_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        KvmVfioVendor(raw)


def test_vendor_is_found_through_its_entry_point() -> None:
    assert load_vendor_class("kvm_vfio") is KvmVfioVendor
