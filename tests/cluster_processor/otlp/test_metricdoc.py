"""docs/metrics.md is generated from the code (``metricdoc``), never edited by hand: the committed file
must be what the generator writes now, and the generator must cover every metric kscope exports."""

from __future__ import annotations

from pathlib import Path

from cluster_processor.otlp import metricdoc, pipeline, semconv
from cluster_processor.otlp.semconv import Instrument

DOC = Path(__file__).resolve().parents[3] / "docs" / "metrics.md"


def test_the_committed_list_is_the_generated_one() -> None:
    assert DOC.read_text() == metricdoc.render(), (
        "docs/metrics.md is stale: python -m cluster_processor.otlp.metricdoc > docs/metrics.md"
    )


def test_every_exported_metric_is_listed() -> None:
    exported = [v for v in vars(semconv).values() if isinstance(v, Instrument)] + [pipeline.AGENT_STAT]
    text = metricdoc.render()
    missing = [i.name for i in exported if f"| `{i.name}` |" not in text]
    assert not missing, missing
    assert "`http_server_request_duration_seconds_bucket`" in text
    assert "`traces_service_graph_request_total`" in text
