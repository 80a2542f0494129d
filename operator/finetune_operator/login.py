"""Kopf logs in with the credentials kr8s found, so both clients talk to the same server.

Kopf's built-in service-account login hardcodes `https://kubernetes.default.svc`, which needs
cluster DNS and a serving certificate naming that host. kr8s, like client-go and every kubelet-run
client, finds the API server through KUBERNETES_SERVICE_HOST/PORT and the mounted token and CA.
Registering this handler replaces Kopf's defaults; with a kubeconfig it gives the same
credentials they would (kr8s reads KUBECONFIG). Kopf calls it again on a 401, and the token is
re-read then, so rotated projected tokens are picked up.
"""

from __future__ import annotations

from typing import Any

import kopf

from . import kube


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    api = await kube.client()
    auth = api.auth
    await auth.reauthenticate()
    return kopf.ConnectionInfo(
        server=auth.server,
        ca_path=str(auth.server_ca_file) if auth.server_ca_file else None,
        insecure=bool(getattr(auth, "_insecure_skip_tls_verify", False)) or None,
        token=auth.token or None,
        certificate_path=str(auth.client_cert_file) if auth.client_cert_file else None,
        private_key_path=str(auth.client_key_file) if auth.client_key_file else None,
        default_namespace=auth.namespace or None,
    )
