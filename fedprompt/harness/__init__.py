"""Orchestration that runs client and server halves together: the demo and the experiment harness."""
