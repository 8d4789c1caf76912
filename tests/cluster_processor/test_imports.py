"""What resolving a flow yields (cluster_processor/resolved.py) belongs to no consumer: resolve,
aggregation and OTLP export import it, it imports none of them (nor the Kubernetes index). Checked in
a fresh interpreter, so nothing imported by another test hides it."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import cluster_processor.resolved
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] == "cluster_processor")))
"""


def test_the_resolved_model_imports_nothing_of_its_users() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == ["cluster_processor", "cluster_processor.resolved"]
