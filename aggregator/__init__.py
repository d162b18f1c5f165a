"""The aggregator daemon: enrolment, rounds and deadlines, per-method server strategies, central DP,
secure aggregation, persistent state and auth.

Never imports `edge_client`; shared pieces come from `fedprompt.common` and `protos`."""
