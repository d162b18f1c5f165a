"""fedprompt: federated prompt learning for CLIP on edge devices, with honest differential privacy.

This package holds the `fedprompt` command line (`fedprompt.cli`), the orchestration that runs
both halves together (`fedprompt.harness`), and `fedprompt.common`: the one small place for
what both `edge_client` and `aggregator` need. Those two never import each other.
"""

__version__ = "0.1.0"
