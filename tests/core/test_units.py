"""Validation, spec merging and the default NUMA packing policy."""

from __future__ import annotations

import pickle

import pytest

from dpkit.core.vendorapi.allocation import is_valid_choice, pack_numa
from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode, Health, Mount
from dpkit.core.vendorapi.errors import ValidationError
from dpkit.core.vendorapi.validation import check_device_id, check_resource_name, socket_name_for


@pytest.mark.parametrize("name", ["nvidia.com/gpu", "devices.kubevirt.io/kvm", "cex.s390.ibm.com/set-1",
                                  "example.com/a.b_c-d"])
def test_valid_resource_names(name):
    assert check_resource_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("gpu", "domain-prefixed"), ("kubernetes.io/gpu", "reserved"), ("node.kubernetes.io/x", "reserved"),
    ("Example.com/gpu", "DNS subdomain"), ("example.com/", "1-63"), ("example.com/a/b", "more than one"),
    ("requests.example.com/x", "quota"), ("example.com/" + "x" * 64, "1-63"), ("example.com/-x", "1-63"),
    ("x.notkubernetes.io/a", "reserved"), ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 60 + "/x", "244"),
])
def test_invalid_resource_names(name, why):
    with pytest.raises(ValidationError, match=why):
        check_resource_name(name)


@pytest.mark.parametrize("bad", ["", "a" * 64, "../etc", "a b", "a/b", "-x", "x\n"])
def test_invalid_device_ids(bad):
    with pytest.raises(ValidationError):
        check_device_id(bad)


def test_container_spec_rejects_untrusted_values():
    for bad in ("1ABC", "A B", "A=B", "", "X\n"):
        with pytest.raises(ValidationError, match="environment variable name"):
            ContainerSpec(env={bad: "x"})
    # Kubernetes accepts '-' and '.' in env names, and KubeVirt's PCI_RESOURCE_* relies on it
    assert ContainerSpec(env={"PCI_RESOURCE_INTEL_COM_QAT-VF": "0000:3b:00.1"}).env
    with pytest.raises(ValidationError, match="absolute"):
        DeviceNode("dev/nvidia0")
    with pytest.raises(ValidationError, match=r"'\.\.'"):
        Mount("/usr/lib/../../etc/shadow", "/x")
    with pytest.raises(ValidationError, match="permissions"):
        DeviceNode("/dev/x", permissions="rwx")
    with pytest.raises(ValidationError, match="CDI"):
        ContainerSpec(cdi_devices=("not-qualified",))


def test_merge_dedups_nodes_and_joins_env_lists():
    a = ContainerSpec(devices=(DeviceNode("/dev/nvidiactl"), DeviceNode("/dev/nvidia0")),
                      env={"VISIBLE": "GPU-a", "MODE": "x"}, mounts=(Mount("/lib/a", "/lib/a"),),
                      cdi_devices=("nvidia.com/gpu=0",))
    b = ContainerSpec(devices=(DeviceNode("/dev/nvidiactl"), DeviceNode("/dev/nvidia1")),
                      env={"VISIBLE": "GPU-b", "MODE": "x"}, cdi_devices=("nvidia.com/gpu=1",))
    merged = a.merge(b)
    assert [d.host_path for d in merged.devices] == ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1"]
    assert merged.env == {"VISIBLE": "GPU-a,GPU-b", "MODE": "x"}
    assert merged.cdi_devices == ("nvidia.com/gpu=0", "nvidia.com/gpu=1")
    assert len(merged.mounts) == 1


def test_specs_are_immutable_hashable_and_picklable():
    spec = ContainerSpec(env={"A": "1"})
    with pytest.raises(TypeError):
        spec.env["A"] = "2"  # type: ignore[index]
    device = Device("d0", numa_nodes=(1, 0, 1), spec=spec, attributes={"model": "x"})
    assert device.numa_nodes == (0, 1)
    assert pickle.loads(pickle.dumps(device)) == device
    assert hash(device) == hash(pickle.loads(pickle.dumps(device)))
    sick = device.with_health(Health.UNHEALTHY, "why")
    assert not sick.healthy and sick.reason == "why" and device.healthy


def devs(spec: dict[str, int]) -> list[Device]:
    return [Device(name, numa_nodes=(numa,)) for name, numa in spec.items()]


def test_pack_numa_best_fit_single_node():
    available = devs({"a": 0, "b": 0, "c": 0, "d": 1, "e": 1})
    assert pack_numa(available, [], 2) == ["d", "e"]
    assert pack_numa(available, [], 3) == ["a", "b", "c"]


def test_pack_numa_must_include_keeps_its_node():
    available = devs({"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 1})
    must = [d for d in available if d.id == "e"]
    assert pack_numa(available, must, 3) == ["e", "d", "f"]


def test_pack_numa_spans_fewest_nodes_when_needed():
    available = devs({"a": 0, "b": 1, "c": 1, "d": 2, "e": 2, "f": 2})
    choice = pack_numa(available, [], 5)
    assert choice[:3] == ["d", "e", "f"] and set(choice[3:]) == {"b", "c"}


def test_pack_numa_answer_is_always_valid():
    import itertools
    import random

    rng = random.Random(7)
    for _ in range(200):
        available = devs({f"x{i}": rng.randrange(4) for i in range(rng.randrange(1, 12))})
        size = rng.randrange(1, len(available) + 1)
        must = rng.sample(available, rng.randrange(0, size + 1))
        choice = pack_numa(available, must, size)
        assert is_valid_choice(choice, [d.id for d in available], [d.id for d in must], size)
        assert choice[: len(must)] == [d.id for d in must]
    assert list(itertools.islice(pack_numa(devs({"a": 0}), [], 3), 5)) == ["a"]


def test_socket_names_are_safe_path_components():
    assert socket_name_for("cex.s390.ibm.com/set_1") == "dpkit-cex.s390.ibm.com_set_1.sock"


def test_status_and_discover_fold_alike_devices():
    from dpkit.core.engine.control import collapse

    devices = [{"id": f"kvm{i}", "health": "Healthy", "numa": [], "reason": "", "attributes": {}} for i in range(1000)]
    devices[500] = {**devices[500], "health": "Unhealthy", "reason": "gone"}
    devices += [{"id": "x", "health": "Healthy", "numa": [0], "reason": "", "attributes": {}}]
    rows = collapse(devices, {"kvm7": "default/vm"})
    assert [(first, last, count) for first, last, count, _ in rows] == [
        ("kvm0", "kvm6", 7), ("kvm7", "kvm7", 1), ("kvm8", "kvm499", 492), ("kvm500", "kvm500", 1),
        ("kvm501", "kvm999", 499), ("x", "x", 1)]
    assert sum(count for _, _, count, _ in rows) == len(devices)


def test_doctor_defers_nodes_a_pre_start_hook_makes(short_tmp):
    from scripted_vendor import RES, ScriptedVendor

    from dpkit.core.tools.doctor import vendor_checks
    from dpkit.core.vendorapi.device import ContainerSpec, Device, DeviceNode

    later = Device("z0", spec=ContainerSpec(devices=(DeviceNode(str(short_tmp / "zcrypt-0"), "/dev/z90crypt"),)))

    class MakesNodesAtStart(ScriptedVendor):
        def pre_start(self, resource, devices):  # type: ignore[no-untyped-def]
            pass

    def node_check(vendor):  # type: ignore[no-untyped-def]
        return next(c for c in vendor_checks(vendor) if c.name == "container device nodes present and accessible")

    deferred = node_check(MakesNodesAtStart(snapshot={RES: (later,)}))
    assert deferred.ok and "1 more made at container start" in deferred.detail
    missing = node_check(ScriptedVendor(snapshot={RES: (later,)}))
    assert not missing.ok and "zcrypt-0" in missing.detail


@pytest.mark.parametrize("numa", [-1, 1024, 99999999999999999999999])
def test_device_rejects_implausible_numa_nodes(numa):
    with pytest.raises(ValidationError, match="NUMA node"):
        Device("d0", numa_nodes=(numa,))
