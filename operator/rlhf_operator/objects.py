"""The one shape every Kubernetes object takes in this package: a JSON-like dict."""

from __future__ import annotations

from typing import Any

# A Kubernetes object (or a part of one) as the API server sends and takes it.
Obj = dict[str, Any]
