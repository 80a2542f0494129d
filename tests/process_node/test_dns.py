"""The process node's name service files: what a kubelet writes for each dnsPolicy."""

from __future__ import annotations

import pytest

from process_node import dns
from process_node.cli import parse_args

HOST_RESOLV = "nameserver 10.0.0.53\nsearch corp.example\noptions edns0\n"
HOST_HOSTS = "127.0.0.1 localhost\n127.0.0.1 vm\n"
DNS = ["127.0.0.10"]


def pod(name="p", ns="team-a", **spec) -> dict:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"containers": [{"name": "c"}], **spec}}


def names(p: dict, cluster_dns=DNS) -> dns.PodNames:
    return dns.pod_names(p, "127.0.0.2", list(cluster_dns), "cluster.local", HOST_RESOLV, HOST_HOSTS)


def test_cluster_first_uses_cluster_dns_with_the_search_path() -> None:
    assert names(pod()).resolv_conf == (
        "nameserver 127.0.0.10\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        "options ndots:5\n")
    # ClusterFirst is the default policy
    assert names(pod(dnsPolicy="ClusterFirst")).resolv_conf == names(pod()).resolv_conf


def test_host_network_and_default_get_the_hosts_resolv_conf() -> None:
    host = "nameserver 10.0.0.53\nsearch corp.example\noptions edns0\n"
    assert names(pod(hostNetwork=True)).resolv_conf == host            # ClusterFirst on the host network
    assert names(pod(dnsPolicy="Default")).resolv_conf == host
    assert names(pod(), cluster_dns=[]).resolv_conf == host             # a node without cluster DNS
    with_host_net = names(pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")).resolv_conf
    assert with_host_net.startswith("nameserver 127.0.0.10\nsearch team-a.svc.cluster.local ")


def test_dns_config_merges_and_none_uses_only_it() -> None:
    config = {"nameservers": ["127.0.0.53"], "searches": ["extra.local"],
              "options": [{"name": "ndots", "value": "2"}, {"name": "single-request"}]}
    conf = dns.ResolvConf.parse(names(pod(dnsConfig=config)).resolv_conf)
    assert conf.nameservers == ["127.0.0.10", "127.0.0.53"]
    assert conf.searches[:2] == ["extra.local", "team-a.svc.cluster.local"]
    assert conf.options == ["ndots:2", "single-request"]
    none = names(pod(dnsPolicy="None", dnsConfig={"nameservers": ["127.0.0.53"]})).resolv_conf
    assert none == "nameserver 127.0.0.53\n"


def test_hosts_file_names_the_pod_and_its_fqdn_under_the_subdomain() -> None:
    # An Indexed Job's pod: hostname <job>-<index>, subdomain = the headless Service
    p = pod("train-0-abcde", hostname="train-0", subdomain="train",
            hostAliases=[{"ip": "127.0.0.9", "hostnames": ["alias"]}])
    n = names(p)
    assert n.hostname == n.env_hostname == "train-0"
    lines = n.hosts.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "127.0.0.2\ttrain-0.train.team-a.svc.cluster.local\ttrain-0" in lines
    assert lines[-1] == "127.0.0.9\talias"
    plain = names(pod("solo"))
    assert plain.hostname == "solo" and "127.0.0.2\tsolo" in plain.hosts.splitlines()
    assert names(pod("x", hostname="h", subdomain="s", setHostnameAsFQDN=True)).hostname == "h.s.team-a.svc.cluster.local"


def test_host_network_pods_keep_the_hosts_name_and_hosts_file() -> None:
    n = names(pod("hn", hostNetwork=True, hostAliases=[{"ip": "127.0.0.9", "hostnames": ["a", "b"]}]))
    assert n.hostname is None
    assert n.hosts.startswith("# Kubernetes-managed hosts file (host network).\n" + HOST_HOSTS)
    assert n.hosts.rstrip().endswith("127.0.0.9\ta\n127.0.0.9\tb")


def test_long_names_are_cut_like_the_kubelets() -> None:
    assert dns.pod_hostname(pod("a" * 62 + "-b")) == "a" * 62


def test_cluster_dns_flags(tmp_path) -> None:
    config, _, _ = parse_args(["--state-dir", str(tmp_path), "--cluster-dns", "127.0.0.10, 127.0.0.11",
                               "--cluster-domain", "example.local."])
    assert config.cluster_dns == ("127.0.0.10", "127.0.0.11") and config.cluster_domain == "example.local"
    assert parse_args(["--state-dir", str(tmp_path)])[0].cluster_dns == ()
    with pytest.raises(SystemExit):
        parse_args(["--state-dir", str(tmp_path), "--cluster-dns", "10.0.0.10"])
