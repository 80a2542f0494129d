"""A pod's name service files, as the kubelet writes them: resolv.conf from its dnsPolicy and
dnsConfig, /etc/hosts with its own hostname, and the hostname itself.

The kubelet's rules (pkg/kubelet/network/dns, kubelet_pods.go), for a node whose pods all share
the node's IP:
- ClusterFirst: the cluster DNS (--cluster-dns) with the search path `<ns>.svc.<domain>
  svc.<domain> <domain>` (then the host's own search domains) and `options ndots:5`; a
  hostNetwork pod, or a node without cluster DNS, gets the host's resolv.conf instead.
- ClusterFirstWithHostNet: the cluster DNS whether or not the pod uses the host network.
- Default: the host's resolv.conf. None: only spec.dnsConfig.
- spec.dnsConfig adds nameservers and searches, and options that override same-named ones.
- The hostname is spec.hostname or the pod's name (at most 63 characters); with spec.subdomain
  its FQDN is `<hostname>.<subdomain>.<ns>.svc.<domain>` (an Indexed Job's pods get hostname
  `<job>-<index>` and the Job's headless Service as subdomain).
- /etc/hosts: localhost, the pod's IP with its FQDN and hostname, then spec.hostAliases; a
  hostNetwork pod gets the host's /etc/hosts plus its hostAliases (and keeps the host's name).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")
MAX_NAMESERVERS = 3       # kubelet: validation.MaxDNSNameservers
MAX_SEARCHES = 32         # kubelet: validation.MaxDNSSearchPaths
HOSTNAME_MAX = 63


@dataclass(frozen=True)
class ResolvConf:
    nameservers: list[str]
    searches: list[str]
    options: list[str]

    @classmethod
    def parse(cls, text: str) -> "ResolvConf":
        nameservers: list[str] = []
        searches: list[str] = []
        options: list[str] = []
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split(";", 1)[0].split()
            if not fields:
                continue
            if fields[0] == "nameserver" and len(fields) > 1:
                nameservers.append(fields[1])
            elif fields[0] in ("search", "domain"):
                searches = fields[1:]   # the last one wins, as in the resolver
            elif fields[0] == "options":
                options.extend(fields[1:])
        return cls(nameservers, searches, options)

    def render(self) -> str:
        lines = [f"nameserver {ns}" for ns in self.nameservers]
        if self.searches:
            lines.append("search " + " ".join(self.searches))
        if self.options:
            lines.append("options " + " ".join(self.options))
        return "\n".join(lines) + "\n"


def _unique(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in items if not (i in seen or seen.add(i))]


def _merge_options(base: list[str], extra: list[Obj]) -> list[str]:
    """dnsConfig.options override same-named options of the policy's (kubelet: mergeDNSOptions)."""
    merged: dict[str, str] = {}
    for opt in base:
        name, _, value = opt.partition(":")
        merged[name] = opt
    for opt in extra:
        name, value = opt.get("name", ""), opt.get("value")
        if name:
            merged[name] = f"{name}:{value}" if value else name
    return list(merged.values())


def pod_hostname(pod: Obj) -> str:
    meta, spec = pod["metadata"], pod.get("spec") or {}
    return (spec.get("hostname") or meta["name"])[:HOSTNAME_MAX].rstrip("-.")


def pod_domain(pod: Obj, cluster_domain: str) -> str | None:
    spec = pod.get("spec") or {}
    if not spec.get("subdomain"):
        return None
    return f"{spec['subdomain']}.{pod['metadata']['namespace']}.svc.{cluster_domain}"


def pod_fqdn(pod: Obj, cluster_domain: str) -> str | None:
    domain = pod_domain(pod, cluster_domain)
    return f"{pod_hostname(pod)}.{domain}" if domain else None


def uts_hostname(pod: Obj, cluster_domain: str) -> str | None:
    """The hostname the pod's processes see; None for hostNetwork pods (the host's own)."""
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return None
    if spec.get("setHostnameAsFQDN"):
        return pod_fqdn(pod, cluster_domain) or pod_hostname(pod)
    return pod_hostname(pod)


def uses_cluster_dns(pod: Obj, cluster_dns: list[str]) -> bool:
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if policy == "ClusterFirstWithHostNet":
        return bool(cluster_dns)
    if policy == "ClusterFirst":
        return bool(cluster_dns) and not spec.get("hostNetwork")
    return False


def resolv_conf(pod: Obj, cluster_dns: list[str], cluster_domain: str, host: ResolvConf) -> ResolvConf:
    spec = pod.get("spec") or {}
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if policy == "None":
        config = ResolvConf([], [], [])
    elif uses_cluster_dns(pod, cluster_dns):
        namespace = pod["metadata"]["namespace"]
        zones = [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain] if cluster_domain else []
        config = ResolvConf(list(cluster_dns), _unique(zones + host.searches), ["ndots:5"])
    else:   # Default, or ClusterFirst without cluster DNS / on the host network
        config = ResolvConf(list(host.nameservers), list(host.searches), list(host.options))
    extra = spec.get("dnsConfig") or {}
    return ResolvConf(
        _unique(config.nameservers + list(extra.get("nameservers") or []))[:MAX_NAMESERVERS],
        _unique(list(extra.get("searches") or []) + config.searches)[:MAX_SEARCHES],
        _merge_options(config.options, extra.get("options") or []))


def _aliases(pod: Obj) -> list[str]:
    aliases = (pod.get("spec") or {}).get("hostAliases") or []
    if not aliases:
        return []
    lines = ["", "# Entries added by HostAliases."]
    for alias in aliases:
        lines += [f"{alias['ip']}\t{name}" for name in alias.get("hostnames") or []]
    return lines


def hosts_file(pod: Obj, pod_ip: str, cluster_domain: str, host_hosts: str) -> str:
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        lines = ["# Kubernetes-managed hosts file (host network).", host_hosts.rstrip("\n")]
    else:
        hostname, fqdn = pod_hostname(pod), pod_fqdn(pod, cluster_domain)
        lines = ["# Kubernetes-managed hosts file.",
                 "127.0.0.1\tlocalhost",
                 "::1\tlocalhost ip6-localhost ip6-loopback",
                 "fe00::0\tip6-localnet",
                 "fe00::0\tip6-mcastprefix",
                 "fe00::1\tip6-allnodes",
                 "fe00::2\tip6-allrouters",
                 f"{pod_ip}\t{fqdn}\t{hostname}" if fqdn else f"{pod_ip}\t{hostname}"]
    return "\n".join(lines + _aliases(pod)) + "\n"


@dataclass(frozen=True)
class PodNames:
    """What the node writes for one pod: the files to bind over /etc/resolv.conf and /etc/hosts
    and the hostname of its UTS namespace (None: the host's)."""
    resolv_conf: str
    hosts: str
    hostname: str | None
    env_hostname: str


def pod_names(pod: Obj, pod_ip: str, cluster_dns: list[str], cluster_domain: str,
              host_resolv: str | None = None, host_hosts: str | None = None) -> PodNames:
    if host_resolv is None:
        host_resolv = HOST_RESOLV_CONF.read_text() if HOST_RESOLV_CONF.exists() else ""
    if host_hosts is None:
        host_hosts = HOST_HOSTS.read_text() if HOST_HOSTS.exists() else ""
    hostname = uts_hostname(pod, cluster_domain)
    return PodNames(
        resolv_conf=resolv_conf(pod, cluster_dns, cluster_domain, ResolvConf.parse(host_resolv)).render(),
        hosts=hosts_file(pod, pod_ip, cluster_domain, host_hosts),
        hostname=hostname,
        env_hostname=hostname or socket.gethostname())
