"""The standard gRPC health service (`grpc.health.v1.Health`, `grpcio-health-checking`), so that
load balancers, Kubernetes probes and `grpc_health_probe` can ask the daemon whether it serves.

Only `Check` is registered. `Watch` keeps a call open for as long as the watcher likes and would
sit outside the door's bounds (`aggregator.door`) on places that enrolled clients need; probes
poll `Check`, which answers at once.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import OVERALL_HEALTH, SERVICE_NAME, HealthServicer

__all__ = ["HealthServicer", "add_health"]


def add_health(server: grpc.Server, service: str) -> HealthServicer:
    """Register `Check` on `server`, SERVING for the whole server ("") and for `service`; the
    daemon calls `enter_graceful_shutdown()` (NOT_SERVING) when it stops or its driver fails."""
    servicer = HealthServicer()
    for name in (OVERALL_HEALTH, service):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": check}),))
    return servicer
