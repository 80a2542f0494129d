"""A minimal kubelet for one node that runs each pod's container command as a local process.

`python -m process_node --help` (with PYTHONPATH=hack). See docs/process-node.md.
"""
