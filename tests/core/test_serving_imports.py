"""A serving `dpkit run` loads no module it only needed by accident (issue 13: RSS <= 45 MB).

A real `dpkit run sim` in a fresh interpreter registers with the in-process kubelet emulator; once
the kubelet sees its devices, the test asks it (through a trigger file its runner thread waits for)
to write the modules it has loaded and stop itself with SIGTERM, as the kubelet's pod would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dpkit.core.tools.kubelet import Kubelet

WIDGET = "example.com/widget"

#: stdlib and third-party modules a serving process must not hold (each costs resident memory for
#: nothing it serves): ctypes.util drags in shutil (bz2, lzma), tempfile (random) and termios;
#: argparse's own help formatter imports shutil; zmq is for probes, and the sim has none.
FORBIDDEN_WHILE_SERVING = ("tempfile", "shutil", "configparser", "inotify_simple", "ctypes.util", "termios",
                           "bz2", "lzma", "random", "zmq")

# `dpkit ARGS...` whose helper thread, once TRIGGER exists, writes sorted(sys.modules) to OUT and
# sends the process SIGTERM (the normal shutdown path); it gives up after 60 s
RUNNER = """
import json, os, signal, sys, threading, time
trigger, out = sys.argv[1], sys.argv[2]
def dump():
    deadline = time.monotonic() + 60
    while not os.path.exists(trigger):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    with open(out, "w") as handle:
        json.dump(sorted(sys.modules), handle)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=dump, name="dump-modules", daemon=True).start()
from dpkit.core.tools.cli import main
sys.exit(main(sys.argv[3:]))
"""


def forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_WHILE_SERVING))


def _serving_modules(short_tmp: Path, kubelet: Kubelet, plugin_dir: Path) -> set[str]:
    devices = short_tmp / "devices.yaml"
    devices.write_text(yaml.safe_dump({"resources": {WIDGET: [{"id": i, "numa": 0} for i in ("a", "b")]}}))
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "plugin_dir": str(plugin_dir), "state_dir": str(short_tmp / "st"), "log_format": "json",
        "cdi_dir": str(short_tmp / "cdi"), "nfd_features_dir": str(short_tmp / "nfd"),
        "pod_resources_socket": str(short_tmp / "pr" / "kubelet.sock"),
        "vendor": {"devices_file": str(devices), "script": False},
    }))
    trigger, out = short_tmp / "dump", short_tmp / "modules.json"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(trigger), str(out), "run", "sim", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert kubelet.wait_for(lambda k: k.allocatable(WIDGET) == 2, 30), "the plugin never registered"
        deadline = time.monotonic() + 15
        while not (short_tmp / "st" / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the control socket never appeared"
            time.sleep(0.02)
        trigger.touch()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return set(json.loads(out.read_text()))


def test_a_serving_process_loads_none_of_the_incidental_modules(short_tmp: Path, kubelet: Kubelet,
                                                                plugin_dir: Path) -> None:
    modules = _serving_modules(short_tmp, kubelet, plugin_dir)
    assert "dpkit.core.engine.registration" in modules and "grpc" in modules  # it really served
    assert forbidden(modules) == []
