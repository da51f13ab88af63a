"""kpr: a Kubernetes Service proxy with an eBPF datapath.

Layering (enforced by import-linter, see pyproject.toml): sources -> tracker/translate
-> model <- sync -> datapaths. Datapaths see only the model, never Kubernetes objects.
"""

__version__ = "0.1.0"
