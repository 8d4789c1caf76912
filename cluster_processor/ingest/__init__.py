"""Flow ingest: the processor's gRPC endpoint for ``kscope.v1.FlowIngest/ExportFlows``. Pure batch checks
(``validate``), the ``grpc.aio`` server with its bounded queue in front of a ``BatchSink`` (``server``)."""

from cluster_processor.ingest.errors import IngestConfigError, IngestError, IngestListenError
from cluster_processor.ingest.server import BatchSink, IngestConfig, IngestServer, ServerTls
from cluster_processor.ingest.validate import Limits

__all__ = [
    "BatchSink",
    "IngestConfig",
    "IngestConfigError",
    "IngestError",
    "IngestListenError",
    "IngestServer",
    "Limits",
    "ServerTls",
]
