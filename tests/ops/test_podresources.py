"""Which pod holds which device: the pod-resources client, `dpkit status`, and a kubelet that cannot say."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from scripted_vendor import RES, ScriptedVendor

from dpkit.core.api.podresources_v1 import api_pb2 as pr_pb2
from dpkit.core.api.podresources_v1 import api_pb2_grpc as pr_grpc
from dpkit.core.engine.control import format_status, query
from dpkit.core.integrations.podresources import Holder, PodResourcesClient, PodResourcesError
from dpkit.core.tools import cli


def test_client_lists_holders_and_allocatable(kubelet, run_ops, short_tmp):
    run_ops(ScriptedVendor())
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    a, _ = kubelet.allocate(RES, 2, pod="pod-a", container="main")
    b, _ = kubelet.allocate(RES, 1, pod="pod-b", container="side", namespace="team")
    client = PodResourcesClient(kubelet.pod_resources_socket)
    holders = client.holders([RES])
    assert {i: holders[RES][i] for i in a} == {i: [Holder("default", "pod-a", "main")] for i in a}
    assert holders[RES][b[0]] == [Holder("team", "pod-b", "side")]
    assert client.holders(["other.com/thing"]) == {}
    assert client.allocatable()[RES] == {"w0", "w1", "w2", "w3"}
    kubelet.release("pod-a")
    assert set(client.holders([RES])[RES]) == set(b)


def test_status_table_and_json_say_who_holds_each_device(kubelet, run_ops, short_tmp, capsys):
    manager = run_ops(ScriptedVendor())
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    ids, _ = kubelet.allocate(RES, 1, pod="trainer-0", container="cuda", namespace="ml")
    status = query(manager.config.state_dir)["status"]  # over the real control socket
    resource = status["resources"][0]
    assert resource["holders"] == {ids[0]: "ml/trainer-0/cuda"}
    assert status["pod_resources"]["ok"] is True
    assert status["pod_resources"]["kubelet_allocatable"] == {RES: 4}
    table = format_status(status)
    assert "HELD BY" in table
    row = next(line for line in table.splitlines() if line.strip().startswith(ids[0]))
    assert "ml/trainer-0/cuda" in row
    free = next(line for line in table.splitlines() if line.strip().startswith("w") and ids[0] not in line)
    assert "ml/" not in free
    assert cli.main(["status", "--state-dir", manager.config.state_dir]) == 0
    assert "ml/trainer-0/cuda" in capsys.readouterr().out


def test_missing_socket_is_reported_once_not_fatal(kubelet, run_ops, short_tmp, caplog):
    caplog.set_level(logging.INFO, logger="dpkit")  # an earlier CLI test may have raised the level
    socket = short_tmp / "nowhere" / "kubelet.sock"
    manager = run_ops(ScriptedVendor(), pod_resources_socket=str(socket))
    assert kubelet.wait_for(lambda k: k.allocatable(RES) == 4, 10)
    first = manager.status()
    manager.status()
    assert first["pod_resources"]["ok"] is False
    assert "mounted into the pod" in first["pod_resources"]["error"]
    assert first["resources"][0]["holders"] == {}
    warnings = [e for e in manager.status()["errors"] if "which pods hold" in e["msg"]]
    assert len(warnings) == 1, "logged once per distinct error, not once per status call"
    with pytest.raises(PodResourcesError, match=str(socket)):
        PodResourcesClient(socket).holders()


class _OldKubelet(pr_grpc.PodResourcesListerServicer):
    """A kubelet without GetAllocatableResources, returning odd names in List."""

    def List(self, request, context):  # type: ignore[no-untyped-def]
        response = pr_pb2.ListPodResourcesResponse()
        pod = response.pod_resources.add(name="p\x1b[31m", namespace="n" * 400)
        container = pod.containers.add(name="c")
        container.devices.add(resource_name=RES, device_ids=["w0"])
        return response


@pytest.fixture
def old_kubelet(short_tmp: Path) -> Iterator[Path]:
    path = short_tmp / "old.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pr_grpc.add_PodResourcesListerServicer_to_server(_OldKubelet(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    yield path
    server.stop(0).wait(2)


def test_old_kubelet_and_odd_names(old_kubelet):
    client = PodResourcesClient(old_kubelet)
    with pytest.raises(PodResourcesError, match=r"UNIMPLEMENTED.*feature gate"):
        client.allocatable()
    (holder,) = client.holders()[RES]["w0"]
    assert holder.pod == "p?[31m", "control characters never reach a terminal or a metric label"
    assert len(holder.namespace) == 253


def test_status_without_allocatable_still_shows_holders(kubelet, run_ops, old_kubelet):
    manager = run_ops(ScriptedVendor(), pod_resources_socket=str(old_kubelet))
    status = manager.status()
    assert status["pod_resources"]["ok"] is True
    assert status["resources"][0]["holders"]["w0"].startswith("nnn")
