"""``mode: onload``: AMD's Onload device plugin as a drop-in, fed every key and flag shape it has.

The documents are written for this project from the upstream reference, Xilinx-CNS/kubernetes-onload
(MIT): the flags and defaults of ``cmd/deviceplugin/main.go`` and ``pkg/deviceplugin/manager.go``
(``DefaultConfig``), the ``DevicePluginSpec`` keys of ``api/v1alpha1/onload_types.go`` (JSON name
``libMounthPath`` included, and the rule that setPreload and mountOnload exclude each other), the
sample CR ``config/samples/onload/base/onload_v1alpha1_onload.yaml``, the flag values the
operator's controller test passes through ("-maxPods=1", "-setPreload=false", ...), and the
mounts, device nodes and ``LD_PRELOAD`` of ``pkg/deviceplugin/mounts.go``. Go's ``flag`` package
syntax is that of the Go standard library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dpkit.core.tools.kubelet import Kubelet
from dpkit.core.vendorapi.errors import ConfigError
from dpkit.sfc import compat
from dpkit.sfc.compat import OnloadPluginConfig
from dpkit.sfc.config import parse_config
from dpkit.sfc.vendor import SfcVendor

DEFAULTS = OnloadPluginConfig()

ACCEPTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (what, vendor section without 'mode', expected settings that differ from AMD's defaults)
    ("nothing: AMD's defaults", {}, {}),
    ("the sample CR's devicePlugin block",
     {"devicePlugin": {"devicePluginImage": "onload/onload-device-plugin:3.0.0", "imagePullPolicy": "Always"}}, {}),
    ("CR maxPodsPerNode", {"devicePlugin": {"maxPodsPerNode": 1}}, {"max_pods": 1}),
    ("CR maxPodsPerNode 0 advertises nothing", {"devicePlugin": {"maxPodsPerNode": 0}}, {"max_pods": 0}),
    ("CR setPreload false", {"devicePlugin": {"setPreload": False}}, {"set_preload": False}),
    ("CR mountOnload false alone", {"devicePlugin": {"mountOnload": False}}, {}),
    ("CR script instead of preload", {"devicePlugin": {"setPreload": False, "mountOnload": True}},
     {"set_preload": False, "mount_onload": True}),
    ("CR defaults written out (hostOnloadPath with the CRD's trailing slash)",
     {"devicePlugin": {"maxPodsPerNode": 100, "setPreload": True, "mountOnload": False,
                       "hostOnloadPath": "/opt/onload/", "baseMountPath": "/opt/onload",
                       "binMountPath": "/usr/bin", "libMounthPath": "/usr/lib64"}},
     {"host_onload_path": "/opt/onload/"}),
    ("CR paths, the CR's libMounthPath spelling",
     {"devicePlugin": {"hostOnloadPath": "/srv/onload", "baseMountPath": "/onload", "binMountPath": "bin",
                       "libMounthPath": "lib"}},
     {"host_onload_path": "/srv/onload", "base_mount_path": "/onload", "bin_mount_path": "bin",
      "lib_mount_path": "lib"}),
    ("CR libMountPath spelling", {"devicePlugin": {"libMountPath": "/lib"}}, {"lib_mount_path": "/lib"}),
    ("CR explicit nulls are unset fields", {"devicePlugin": {"maxPodsPerNode": None, "setPreload": None}}, {}),
    ("flag -name=value", {"args": ["-maxPods=50"]}, {"max_pods": 50}),
    ("flag --name=value", {"args": ["--maxPods=50"]}, {"max_pods": 50}),
    ("flag -name value", {"args": ["-maxPods", "7"]}, {"max_pods": 7}),
    ("flag --name value", {"args": ["--hostOnloadPath", "/srv/onload"]}, {"host_onload_path": "/srv/onload"}),
    ("YAML number as the value", {"args": ["-maxPods", 7]}, {"max_pods": 7}),
    ("Go integer syntax: hex, octal, underscores, sign",
     {"args": ["-maxPods=0x10"]}, {"max_pods": 16}),
    ("Go octal", {"args": ["-maxPods=010"]}, {"max_pods": 8}),
    ("Go underscores", {"args": ["-maxPods=1_000"]}, {"max_pods": 1000}),
    ("Go plus sign", {"args": ["-maxPods=+3"]}, {"max_pods": 3}),
    ("bare bool flag is true", {"args": ["-setPreload=false", "-mountOnload"]},
     {"set_preload": False, "mount_onload": True}),
    ("Go bool spellings", {"args": ["-setPreload=F", "-mountOnload=TRUE", "-needNic=0"]},
     {"set_preload": False, "mount_onload": True, "need_nic": False}),
    ("needNic", {"args": ["-needNic=false"]}, {"need_nic": False}),
    ("every path flag", {"args": ["-hostOnloadPath=/srv/onload", "-baseMountPath=/onload", "-binMountPath=/bin",
                                  "-libMountPath=/lib"]},
     {"host_onload_path": "/srv/onload", "base_mount_path": "/onload", "bin_mount_path": "/bin",
      "lib_mount_path": "/lib"}),
    ("empty path flag: path.Join drops it", {"args": ["-baseMountPath=", "-libMountPath=/usr/lib64"]},
     {"base_mount_path": ""}),
    ("host Onload in the system directories", {"args": ["-hostOnloadPath="]}, {"host_onload_path": ""}),
    ("'..' cleaned as Go's path.Join does", {"args": ["-hostOnloadPath=/../srv/onload"]},
     {"host_onload_path": "/../srv/onload"}),
    ("the last of a repeated flag wins", {"args": ["-maxPods=1", "-maxPods=2"]}, {"max_pods": 2}),
    ("glog's flags are accepted", {"args": ["-logtostderr", "-v=4", "-stderrthreshold", "INFO",
                                            "-vmodule=manager=2", "-log_dir=/tmp", "-alsologtostderr=false",
                                            "-log_backtrace_at=main.go:1"]}, {}),
    ("'--' ends the flags", {"args": ["-maxPods=5", "--", "-maxPods=9"]}, {"max_pods": 5}),
    ("a bool flag does not take the next argument: it stays true, the rest is ignored",
     {"args": ["-setPreload", "false"]}, {}),
    ("the first non-flag ends the flags", {"args": ["serve", "-maxPods=3"]}, {}),
    ("CR and flags agreeing", {"devicePlugin": {"maxPodsPerNode": 4}, "args": ["-maxPods=4", "-needNic=false"]},
     {"max_pods": 4, "need_nic": False}),
    ("common dpkit keys still apply", {"args": ["-maxPods=2"], "vendor_ids": ["0x1924", "0x10ee"],
                                       "drivers": ["sfc"], "udev_source": "kernel", "resync_interval": 5},
     {"max_pods": 2}),
]

REJECTED: list[tuple[str, dict[str, Any], str]] = [
    # (what, vendor section, part of the error)
    ("mountOnload alone: setPreload defaults to true", {"args": ["-mountOnload"]},
     "mountOnload needs setPreload false"),
    ("CR mountOnload alone", {"devicePlugin": {"mountOnload": True}}, "devicePlugin.mountOnload"),
    ("CR both loaders", {"devicePlugin": {"setPreload": True, "mountOnload": True}}, "refuses both"),
    ("unknown flag", {"args": ["-maxPod=3"]}, "flag provided but not defined: -maxPod"),
    ("not an integer", {"args": ["-maxPods=ten"]}, "invalid value 'ten' for flag -maxPods"),
    ("float for an int flag", {"args": ["-maxPods=1.5"]}, "invalid value '1.5'"),
    ("not a Go bool", {"args": ["-setPreload=yes"]}, "invalid value 'yes' for flag -setPreload"),
    ("missing value", {"args": ["-maxPods"]}, "flag needs an argument: -maxPods"),
    ("three dashes", {"args": ["---maxPods=1"]}, "bad flag syntax"),
    ("empty name", {"args": ["-=1"]}, "bad flag syntax"),
    ("help", {"args": ["-help"]}, "usage"),
    ("glog -v is an int", {"args": ["-v=high"]}, "invalid value 'high' for flag -v"),
    ("args as one string", {"args": "-maxPods=3"}, "vendor.args: expected a list"),
    ("non-string argument", {"args": [["-maxPods=3"]]}, "vendor.args[0]: expected a string"),
    ("CR maxPodsPerNode as text", {"devicePlugin": {"maxPodsPerNode": "10"}}, "devicePlugin.maxPodsPerNode"),
    ("CR setPreload as text", {"devicePlugin": {"setPreload": "false"}}, "expected true or false"),
    ("CR path as a number", {"devicePlugin": {"baseMountPath": 1}}, "devicePlugin.baseMountPath"),
    ("CR unknown key", {"devicePlugin": {"maxPods": 3}},
     "vendor.devicePlugin.maxPods: unknown key (did you mean 'maxPodsPerNode'?)"),
    ("CR misspelt key", {"devicePlugin": {"setPreLoad": False}},
     "vendor.devicePlugin.setPreLoad: unknown key (did you mean 'setPreload'?)"),
    ("CR key path and type", {"devicePlugin": {"maxPodsPerNode": "10"}},
     "vendor.devicePlugin.maxPodsPerNode: expected an integer or null, got str '10'"),
    ("CR DaemonSet key of the wrong type", {"devicePlugin": {"imagePullPolicy": 3}},
     "vendor.devicePlugin.imagePullPolicy: expected a string or null, got int 3"),
    ("a bool as an argument", {"args": [True]}, "vendor.args[0]: expected a string, got bool True"),
    ("needNic is a flag, not a CR key", {"devicePlugin": {"needNic": False}}, "needNic is a command-line flag"),
    ("CR block not a mapping", {"devicePlugin": ["maxPodsPerNode"]}, "spec.devicePlugin mapping"),
    ("CR spellings disagree", {"devicePlugin": {"libMounthPath": "/a", "libMountPath": "/b"}}, "disagree"),
    ("CR and flags disagree", {"devicePlugin": {"maxPodsPerNode": 4}, "args": ["-maxPods=5"]}, "give it once"),
    # deliberate differences (docs/sfc.md): upstream accepts these and misbehaves
    ("negative maxPods", {"args": ["-maxPods=-1"]}, "0 to 10000"),
    ("absurd maxPods", {"args": ["-maxPods=1000000"]}, "0 to 10000"),
    ("relative hostOnloadPath", {"devicePlugin": {"hostOnloadPath": "foo"}}, "not an absolute path"),
    ("relative baseMountPath", {"args": ["-baseMountPath=bar"]}, "-baseMountPath"),
    # mode checks
    ("dpkit keys in onload mode", {"resource": "amd.com/onload"}, "belong(s) to mode dpkit"),
    ("dpkit pools in onload mode", {"pools": []}, "vendor.devicePlugin"),
]


def onload_section(section: dict[str, Any]) -> dict[str, Any]:
    return {"mode": "onload", **section}


@pytest.mark.parametrize(("what", "section", "expected"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_upstream_documents_are_accepted(what: str, section: dict[str, Any], expected: dict[str, Any]) -> None:
    config = parse_config(onload_section(section))
    assert config.resources == ("amd.com/onload",)
    settings = config.onload_plugin
    assert settings is not None
    changed = {k: getattr(settings, k) for k in vars(DEFAULTS) if getattr(settings, k) != getattr(DEFAULTS, k)}
    assert changed == expected


@pytest.mark.parametrize(("what", "section", "error"), REJECTED, ids=[r[0] for r in REJECTED])
def test_upstream_rejections_are_rejected(what: str, section: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(onload_section(section))
    assert error in str(caught.value)
    assert str(caught.value).startswith("vendor")  # the key path comes first


def test_defaults_are_amds() -> None:
    assert DEFAULTS == OnloadPluginConfig(max_pods=100, need_nic=True, set_preload=True, mount_onload=False,
                                          host_onload_path="/opt/onload", base_mount_path="/opt/onload",
                                          bin_mount_path="/usr/bin", lib_mount_path="/usr/lib64")
    assert DEFAULTS.host_lib_dir == "/opt/onload/usr/lib64"
    assert DEFAULTS.container_lib_dir == "/opt/onload/usr/lib64"
    assert DEFAULTS.container_script == "/opt/onload/usr/bin/onload"


def test_ignored_arguments_and_daemonset_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    parse_config(onload_section({"args": ["-setPreload", "false"],
                                 "devicePlugin": {"imagePullPolicy": "IfNotPresent"}}))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "arguments after the flags are ignored" in text and "-setPreload=false" in text
    assert "devicePlugin.imagePullPolicy" in text


@pytest.mark.parametrize(("section", "error"), [
    ({"mode": "amd"}, "vendor.mode: expected one of dpkit, onload, solarflare"),
    ({"devicePlugin": {}}, "add 'mode: onload'"),
    ({"mode": "solarflare", "args": []}, "add 'mode: onload'"),
    ({"mode": "solarflare", "resource": "example.com/nic"}, "keeps the resource solarflare.com/sfc"),
])
def test_mode_mistakes(section: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match="vendor") as caught:
        parse_config(section)
    assert error in str(caught.value)


def test_default_and_solarflare_modes_are_unchanged() -> None:
    assert parse_config({}).resources == ("solarflare.com/sfc",) and parse_config({}).onload_plugin is None
    legacy = parse_config({"mode": "solarflare", "pools": [{"resource": "solarflare.com/fast",
                                                            "interfaces": ["ens1*"]}]})
    assert legacy.resources == ("solarflare.com/sfc", "solarflare.com/fast")


# -- resulting devices and specs ----------------------------------------------------------------

def onload_vendor(host: Any, *args: str, **device_plugin: Any) -> SfcVendor:
    section = {k: v for k, v in host.config().items() if k != "onload"}
    section.update(mode="onload", args=["-hostOnloadPath=" + str(host.root / "opt" / "onload"), *args])
    if device_plugin:
        section["devicePlugin"] = device_plugin
    return SfcVendor(section)


def test_slots_specs_and_numa_as_amds_plugin(host: Any) -> None:
    host.add_nic("0000:03:00.0", numa="1")
    host.add_nic("0000:81:00.0", {"ens129f0": "down"}, numa="0")  # link state does not matter upstream
    host.install_onload("8.1.2.26")
    vendor = onload_vendor(host, "-maxPods=3")
    devices = vendor.discover()["amd.com/onload"]
    assert [d.id for d in devices] == ["sfc-0", "sfc-1", "sfc-2"]
    assert all(d.healthy and d.numa_nodes == (0, 1) for d in devices)
    spec = vendor.container_spec("amd.com/onload", devices[:2])
    assert spec.env == {"LD_PRELOAD": "/opt/onload/usr/lib64/libonload.so"}
    assert {(n.host_path, n.container_path, n.permissions) for n in spec.devices} == {
        (f"{host.dev}/{n}", f"/dev/{n}", "mrw") for n in ("onload", "onload_epoll", "sfc_char")}
    assert {(m.host_path, m.container_path, m.read_only) for m in spec.mounts} == {
        (f"{host.lib}/{n}", f"/opt/onload/usr/lib64/{n}", True)
        for n in ("libonload.so", "libonload.so.1", "libonload_ext.so.2")}  # not unrelated.so
    assert vendor.preferred_allocation("amd.com/onload", devices, (), 2) is None


def test_mount_onload_and_paths(host: Any) -> None:
    host.add_nic("0000:03:00.0")
    host.install_onload()
    script = host.root / "opt" / "onload" / "usr" / "bin" / "onload"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    vendor = onload_vendor(host, "-setPreload=false", "-mountOnload", "-baseMountPath=/onload",
                           "-binMountPath=bin", "-libMountPath=lib")
    [device] = vendor.discover()["amd.com/onload"][:1]
    spec = device.spec
    assert device.healthy and "LD_PRELOAD" not in spec.env
    mounts = {m.container_path: m.host_path for m in spec.mounts}
    assert mounts["/onload/bin/onload"] == str(script)
    assert mounts["/onload/lib/libonload.so"] == f"{host.lib}/libonload.so"


@pytest.mark.parametrize(("args", "reason"), [
    (("-needNic=true",), "no Solarflare interface"),
    (("-needNic=false", "-setPreload=false", "-mountOnload"), "onload script"),
])
def test_what_upstream_would_fail_on_is_unhealthy(host: Any, args: tuple[str, ...], reason: str) -> None:
    host.install_onload()
    devices = onload_vendor(host, *args).discover()["amd.com/onload"]
    assert devices and all(not d.healthy and reason in d.reason for d in devices)


def test_without_onload_or_with_no_nic_allowed(host: Any) -> None:
    devices = onload_vendor(host, "-needNic=false").discover()["amd.com/onload"]
    assert all(not d.healthy and "/onload missing" in d.reason for d in devices)
    host.install_onload()
    vendor = onload_vendor(host, "-needNic=false", "-maxPods=0")
    assert vendor.discover() == {"amd.com/onload": ()}
    checks = {c.name: c for c in onload_vendor(host, "-needNic=false").doctor()}
    assert checks["Solarflare NICs present"].ok and "needNic is false" in checks["Solarflare NICs present"].detail
    assert checks["onload libraries"].ok and str(host.lib) in checks["onload libraries"].detail


def test_allocate_through_the_kubelet(host: Any, kubelet: Kubelet, run_manager: Any) -> None:
    host.add_nic("0000:03:00.0", numa="0")
    host.install_onload()
    run_manager(onload_vendor(host, "-maxPods=4"))
    assert kubelet.wait_for(lambda k: k.allocatable("amd.com/onload") == 4)
    ids, response = kubelet.allocate("amd.com/onload", 2)
    assert len(ids) == 2 and all(i.startswith("sfc-") for i in ids)
    assert dict(response.envs) == {"LD_PRELOAD": "/opt/onload/usr/lib64/libonload.so"}
    assert sorted(d.container_path for d in response.devices) == ["/dev/onload", "/dev/onload_epoll", "/dev/sfc_char"]
    assert {d.permissions for d in response.devices} == {"mrw"}
    assert len(response.mounts) == 3 and all(m.read_only for m in response.mounts)


def test_go_helpers() -> None:
    assert compat.go_join("/opt/onload/", "/usr/lib64") == "/opt/onload/usr/lib64"
    assert compat.go_join("", "/usr/lib64", "libonload.so") == "/usr/lib64/libonload.so"
    assert compat.go_join("//a/./b/", "../c") == "/a/c"
    assert compat.go_join("", "") == ""
    assert [compat.go_int(t) for t in ("0x1f", "0o17", "0b11", "017", "-017", "1_0", " 1", "\u0661", "08")] == [
        31, 15, 3, 15, -15, 10, None, None, None]
    assert [compat.go_bool(t) for t in ("t", "True", "0", "yes", "")] == [True, True, False, None, None]


def test_slot_ids_match_upstream_for_the_kubelet_checkpoint(tmp_path: Path) -> None:
    assert compat.slot_ids(3) == ("sfc-0", "sfc-1", "sfc-2") and compat.slot_ids(0) == ()
