"""The wire contract: fedprompt.proto and the code generated from it by protos/generate.py."""
