"""attach_observers wiring and the atomic file writes CDI and NFD rely on."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from dpkit.core.integrations.cdi import CdiWriter
from dpkit.core.integrations.labels import NodeLabelWriter
from dpkit.core.integrations.metrics import Metrics
from dpkit.core.integrations.observers import attach_observers, remove_quietly, write_atomic
from dpkit.core.integrations.podresources import PodResourcesView


def test_each_key_attaches_its_integration(make_config, short_tmp):
    def host(config):  # type: ignore[no-untyped-def]
        return SimpleNamespace(config=config, calls=None, observers=[], rpc_observer=None, cdi_spec=None,
                               current_state=lambda timeout=1.0: None)

    bare = host(make_config(pod_resources_socket="", cdi_dir="", nfd_features_dir=""))
    assert attach_observers(bare) == []
    assert bare.rpc_observer is None and bare.cdi_spec is None
    full = host(make_config(cdi_dir=str(short_tmp / "cdi"), nfd_features_dir=str(short_tmp / "nfd"),
                            metrics_address="127.0.0.1:0"))
    attached = attach_observers(full)
    try:
        assert [type(o) for o in attached] == [PodResourcesView, CdiWriter, NodeLabelWriter, Metrics]
        assert full.observers == attached
        metrics = attached[-1]
        assert isinstance(metrics, Metrics)
        assert metrics.pod_view is attached[0], "metrics reuse the pod-resources view"
        assert full.rpc_observer is metrics and full.cdi_spec == attached[1].cdi_spec, "the servers' side doors"
    finally:
        attached[-1].close()


def test_write_atomic_replaces_whole_files_only(short_tmp):
    path = short_tmp / "spec.json"
    write_atomic(path, "old\n")
    inode = path.stat().st_ino
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_ino != inode, "a new file renamed over the old one"
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "half written \udcff")
    assert path.read_text() == "new\n", "a failed write leaves the previous file intact"
    assert sorted(p.name for p in short_tmp.iterdir()) == ["spec.json"], "no temporary file left behind"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_remove_quietly_logs_instead_of_raising(short_tmp):
    logger = logging.getLogger("dpkit.observers")  # own handler: CLI tests may stop propagation
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        remove_quietly(short_tmp / "never-existed")
        assert handler.records == []
        (short_tmp / "a-dir").mkdir()
        remove_quietly(short_tmp / "a-dir")  # unlink on a directory fails: shutdown must go on
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in handler.records] == ["cannot remove file"]
