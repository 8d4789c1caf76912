"""Debian's ``prometheus`` for a test: a temporary config and data directory, scraping one target on
127.0.0.1 every second with ``honor_labels`` (each series names its own job and instance, as the
chart's ServiceMonitor keeps them), its HTTP API read with urllib. Stopped, and its directory
removed, by ``close`` whatever happened."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, target: str, scrape_interval_s: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ks-prom-"))
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{scrape_interval_s}s", "evaluation_interval": f"{scrape_interval_s}s"},
            "scrape_configs": [{"job_name": "kscope", "honor_labels": True, "static_configs": [{"targets": [target]}]}],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with self._opener.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout_s}s: {self.log_tail()}")

    def api(self, path: str, **params: Any) -> Any:
        """``/api/v1/<path>``'s ``data``; a PromQL error raises with Prometheus' own message."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with self._opener.open(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def label_names(self, metric: str, start: float, end: float) -> set[str]:
        return set(self.api("labels", **{"match[]": metric, "start": f"{start:.3f}", "end": f"{end:.3f}"}))

    def label_values(self, label: str, match: str, start: float, end: float) -> set[str]:
        path = f"label/{label}/values"
        return set(self.api(path, **{"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"}))

    def log_tail(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()[-2000:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class PromQLError(Exception):
    """Prometheus refused a query (bad syntax, unknown function)."""
