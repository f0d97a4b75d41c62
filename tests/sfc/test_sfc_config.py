"""The vendor section: defaults, and a ConfigError naming the key for every kind of mistake."""

from __future__ import annotations

from typing import Any

import pytest

from dpkit.core.vendorapi.errors import ConfigError
from dpkit.sfc.config import DEFAULT_LIBRARY_PATH, Pool, parse_config
from dpkit.sfc.vendor import SfcVendor


def test_defaults() -> None:
    config = parse_config({})
    assert config.resource == "solarflare.com/sfc"
    assert config.resources == ("solarflare.com/sfc",)
    assert config.vendor_ids == ("0x1924",)
    assert config.drivers == ("sfc",)
    assert (config.sys_root, config.dev_root, config.udev_source) == ("/sys", "/dev", "udev")
    assert config.onload.library_path == DEFAULT_LIBRARY_PATH
    assert not config.onload.required and not config.onload.preload


def test_full_config() -> None:
    config = parse_config({
        "resource": "example.com/nic",
        "slots": 2,
        "vendor_ids": ["0X1924", "0x10ee"],
        "pools": [{"resource": "example.com/fast", "interfaces": ["ens1f*"], "slots": 4},
                  {"resource": "example.com/slow", "pci_addresses": ["0000:81:00.*"]}],
        "onload": {"required": True, "preload": True, "env": {"EF_POLL_USEC": 100000, "EF_NAME": "x,y"},
                   "library_path": "/host/onload/", "container_library_path": "/opt/onload/lib"},
        "udev_source": "kernel",
        "resync_interval": 5,
    })
    assert config.vendor_ids == ("0x1924", "0x10ee")
    assert config.pools == (Pool("example.com/fast", ("ens1f*",), (), 4),
                            Pool("example.com/slow", (), ("0000:81:00.*",), 1))
    assert config.resources == ("example.com/nic", "example.com/fast", "example.com/slow")
    assert config.onload.env == {"EF_POLL_USEC": "100000", "EF_NAME": "x,y"}
    assert config.onload.library_path == "/host/onload"
    assert config.resync_interval == 5.0


@pytest.mark.parametrize(("raw", "key"), [
    ({"colour": "blue"}, "vendor.colour: unknown key"),
    ({"resource": "nodomain"}, "vendor.resource"),
    ({"resource": "kubernetes.io/nic"}, "vendor.resource"),
    ({"slots": 0}, "vendor.slots"),
    ({"slots": True}, "vendor.slots"),
    ({"slots": "2"}, "vendor.slots"),
    ({"vendor_ids": "0x1924"}, "vendor.vendor_ids"),
    ({"vendor_ids": ["1924"]}, "vendor.vendor_ids[0]"),
    ({"vendor_ids": []}, "vendor.vendor_ids"),
    ({"drivers": []}, "vendor.drivers"),
    ({"drivers": [3]}, "vendor.drivers[0]"),
    ({"pools": {"resource": "a.com/b"}}, "vendor.pools"),
    ({"pools": ["x"]}, "vendor.pools[0]"),
    ({"pools": [{"interfaces": ["x"]}]}, "vendor.pools[0].resource"),
    ({"pools": [{"resource": "a.com/b"}]}, "vendor.pools[0]: a pool needs"),
    ({"pools": [{"resource": "a.com/b", "interfaces": ["x"], "slots": -1}]}, "vendor.pools[0].slots"),
    ({"pools": [{"resource": "a.com/b", "interface": ["x"]}]},
     "vendor.pools[0].interface: unknown key (did you mean 'interfaces'?)"),
    ({"pools": [{"resource": "solarflare.com/sfc", "interfaces": ["x"]}]}, "vendor.pools[0].resource"),
    ({"onload": []}, "vendor.onload"),
    ({"onload": {"required": "yes"}}, "vendor.onload.required"),
    ({"onload": {"preload": 1}}, "vendor.onload.preload"),
    ({"onload": {"library_path": "relative/lib"}}, "vendor.onload.library_path"),
    ({"onload": {"container_library_path": "/opt/../etc"}}, "vendor.onload.container_library_path"),
    ({"onload": {"container_library_path": "/../etc"}}, "vendor.onload.container_library_path"),
    ({"onload": {"library_path": "/.."}}, "vendor.onload.library_path"),
    ({"onload": {"env": {"LD_LIBRARY_PATH": "/x"}}}, "vendor.onload.env.LD_LIBRARY_PATH"),
    ({"onload": {"env": {"EF_POLL_USEC": [1]}}}, "vendor.onload.env.EF_POLL_USEC"),
    ({"onload": {"env": {"EF_X": "a\nb"}}}, "vendor.onload.env.EF_X"),
    ({"onload": {"env": "EF_X=1"}}, "vendor.onload.env"),
    ({"onload": {"lib": "/x"}}, "vendor.onload.lib: unknown key"),
    ({"sys_root": ""}, "vendor.sys_root"),
    ({"dev_root": 5}, "vendor.dev_root"),
    ({"udev_source": "netlink"}, "vendor.udev_source"),
    ({"resync_interval": 0}, "vendor.resync_interval"),
    ({"resync_interval": "fast"}, "vendor.resync_interval"),
])
def test_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_vendor_constructor_rejects_bad_config() -> None:
    """The core builds vendors from the vendor section and expects a ConfigError, not a crash."""
    with pytest.raises(ConfigError, match=r"vendor\.slots"):
        SfcVendor({"slots": "many", "sys_root": "/nonexistent"})


@pytest.mark.parametrize("path", ["/opt\n/../../etc", "/opt/lib\n", "/x\x00y"])
def test_paths_with_a_control_character_are_refused_before_any_check_is_fooled(path):
    with pytest.raises(ConfigError, match=r"vendor\.onload\.library_path"):
        parse_config({"onload": {"library_path": path}})
