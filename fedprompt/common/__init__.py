"""What both the edge client and the aggregator need: wire codecs, privacy mechanisms and
accounting, method names and settings. Nothing here imports `edge_client` or `aggregator`."""
