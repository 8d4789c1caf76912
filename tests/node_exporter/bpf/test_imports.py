"""The generic BPF layer (load, attach, maps, rings) knows nothing of its users: namespace
walking lives with the collectors (node_exporter/netns.py), which import the loader, not the
other way round. Checked in a fresh interpreter, so nothing imported by another test hides it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import node_exporter.bpf

_PROBE = """
import importlib, json, pkgutil, sys
import node_exporter.bpf as pkg
for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"node_exporter.bpf.{m.name}")
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] == "node_exporter")))
"""


def test_the_bpf_layer_imports_no_namespace_walking_and_no_collector() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    own = {f"node_exporter.bpf.{p.stem}" for p in Path(node_exporter.bpf.__file__).parent.glob("*.py")}
    assert own - {"node_exporter.bpf.__init__"} <= loaded, "every module of the layer was imported"
    assert not [n for n in loaded if "netns" in n], "namespace walking belongs to the collectors"
    assert loaded - own <= {"node_exporter", "node_exporter.bpf", "node_exporter.errors"}
