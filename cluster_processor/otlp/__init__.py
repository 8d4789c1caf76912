"""OTLP export of what the processor aggregates: the records it hands over (``model``), their
semantic-convention names (``semconv``), cumulative streams with bounded cardinality
(``cumulative``), protobuf encoding (``encode``), the async OTLP/gRPC exporter (``exporter``) and
the glue between them (``pipeline``)."""
