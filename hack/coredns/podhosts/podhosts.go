// Package podhosts answers the names a headless Service gives its pods,
// <hostname>.<subdomain>.<namespace>.svc.<zone>, from the Pods themselves (spec.hostname,
// spec.subdomain, status.podIP) and the Service (clusterIP None, its selector,
// publishNotReadyAddresses).
//
// In a cluster these records come from the EndpointSlices the endpointslice controller
// publishes, which the kubernetes plugin serves. The API server refuses EndpointSlice
// addresses in 127.0.0.0/8, and loopback addresses are the only pod IPs the local cluster
// has (its nodes never put traffic outside loopback), so the controller cannot publish them
// there. This plugin applies the controller's rules to the same objects instead; every other
// name goes on to the kubernetes plugin.
//
//	podhosts [ZONES...] {
//	    kubeconfig KUBECONFIG [CONTEXT]
//	    ttl SECONDS
//	}
package podhosts

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/coredns/caddy"
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/plugin"
	clog "github.com/coredns/coredns/plugin/pkg/log"
	"github.com/coredns/coredns/request"
	"github.com/miekg/dns"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

const name = "podhosts"
const byName = "hostname.subdomain.namespace"

var log = clog.NewWithPlugin(name)

func init() { plugin.Register(name, setup) }

// PodHosts is the plugin.
type PodHosts struct {
	Next       plugin.Handler
	Zones      []string
	TTL        uint32
	kubeconfig string
	context    string
	pods       cache.Indexer
	services   listersv1.ServiceLister
	synced     atomic.Bool
}

func setup(c *caddy.Controller) error {
	p := &PodHosts{TTL: 5}
	for c.Next() {
		p.Zones = plugin.OriginsFromArgsOrServerBlock(c.RemainingArgs(), c.ServerBlockKeys)
		for c.NextBlock() {
			switch c.Val() {
			case "kubeconfig":
				args := c.RemainingArgs()
				if len(args) == 0 || len(args) > 2 {
					return plugin.Error(name, c.ArgErr())
				}
				p.kubeconfig = args[0]
				if len(args) == 2 {
					p.context = args[1]
				}
			case "ttl":
				args := c.RemainingArgs()
				if len(args) != 1 {
					return plugin.Error(name, c.ArgErr())
				}
				ttl, err := strconv.ParseUint(args[0], 10, 32)
				if err != nil {
					return plugin.Error(name, c.Errf("bad ttl %q", args[0]))
				}
				p.TTL = uint32(ttl)
			default:
				return plugin.Error(name, c.Errf("unknown property %q", c.Val()))
			}
		}
	}
	stop := make(chan struct{})
	c.OnStartup(func() error { return p.start(stop) })
	c.OnShutdown(func() error { close(stop); return nil })
	dnsserver.GetConfig(c).AddPlugin(func(next plugin.Handler) plugin.Handler { p.Next = next; return p })
	return nil
}

func (p *PodHosts) start(stop chan struct{}) error {
	rules := &clientcmd.ClientConfigLoadingRules{ExplicitPath: p.kubeconfig}
	overrides := &clientcmd.ConfigOverrides{CurrentContext: p.context}
	config, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides).ClientConfig()
	if err != nil {
		return plugin.Error(name, err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return plugin.Error(name, err)
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	pods := factory.Core().V1().Pods().Informer()
	if err := pods.AddIndexers(cache.Indexers{byName: func(obj interface{}) ([]string, error) {
		pod, ok := obj.(*corev1.Pod)
		if !ok || pod.Spec.Hostname == "" || pod.Spec.Subdomain == "" {
			return nil, nil
		}
		return []string{key(pod.Spec.Hostname, pod.Spec.Subdomain, pod.Namespace)}, nil
	}}); err != nil {
		return plugin.Error(name, err)
	}
	p.pods = pods.GetIndexer()
	p.services = factory.Core().V1().Services().Lister()
	factory.Start(stop)
	go func() {
		for _, ok := range factory.WaitForCacheSync(stop) {
			if !ok {
				return
			}
		}
		p.synced.Store(true)
		log.Infof("watching pods and services")
	}()
	return nil
}

func key(hostname, subdomain, namespace string) string {
	return strings.ToLower(hostname + "." + subdomain + "." + namespace)
}

// Ready is for the ready plugin: the caches have synced.
func (p *PodHosts) Ready() bool { return p.synced.Load() }

// Name implements plugin.Handler.
func (p *PodHosts) Name() string { return name }

// ServeDNS implements plugin.Handler.
func (p *PodHosts) ServeDNS(ctx context.Context, w dns.ResponseWriter, r *dns.Msg) (int, error) {
	state := request.Request{W: w, Req: r}
	qname := state.Name()
	zone := plugin.Zones(p.Zones).Matches(qname)
	if zone == "" || !p.synced.Load() {
		return plugin.NextOrFailure(p.Name(), p.Next, ctx, w, r)
	}
	parts := dns.SplitDomainName(strings.TrimSuffix(qname, zone))
	if len(parts) != 4 || parts[3] != "svc" {
		return plugin.NextOrFailure(p.Name(), p.Next, ctx, w, r)
	}
	ips := p.lookup(parts[0], parts[1], parts[2])
	if len(ips) == 0 {
		return plugin.NextOrFailure(p.Name(), p.Next, ctx, w, r)
	}
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	header := func(t uint16) dns.RR_Header {
		return dns.RR_Header{Name: qname, Rrtype: t, Class: dns.ClassINET, Ttl: p.TTL}
	}
	for _, ip := range ips {
		switch {
		case ip.To4() != nil && state.QType() == dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{Hdr: header(dns.TypeA), A: ip.To4()})
		case ip.To4() == nil && state.QType() == dns.TypeAAAA:
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: header(dns.TypeAAAA), AAAA: ip})
		}
	}
	// The name exists: other types get an empty answer (NODATA), not NXDOMAIN.
	if err := w.WriteMsg(m); err != nil {
		return dns.RcodeServerFailure, fmt.Errorf("podhosts: %w", err)
	}
	return dns.RcodeSuccess, nil
}

// lookup applies the endpointslice controller's rules: a headless Service named like the pod's
// subdomain selects the pod; the pod has an IP and has not finished; it is ready, or the
// Service publishes addresses that are not.
func (p *PodHosts) lookup(hostname, subdomain, namespace string) []net.IP {
	svc, err := p.services.Services(namespace).Get(subdomain)
	if err != nil || svc.Spec.ClusterIP != corev1.ClusterIPNone || len(svc.Spec.Selector) == 0 {
		return nil
	}
	selector := labels.SelectorFromSet(svc.Spec.Selector)
	objs, err := p.pods.ByIndex(byName, key(hostname, subdomain, namespace))
	if err != nil {
		return nil
	}
	var ips []net.IP
	for _, obj := range objs {
		pod := obj.(*corev1.Pod)
		if pod.Status.PodIP == "" || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		if !selector.Matches(labels.Set(pod.Labels)) || (!svc.Spec.PublishNotReadyAddresses && !ready(pod)) {
			continue
		}
		if ip := net.ParseIP(pod.Status.PodIP); ip != nil {
			ips = append(ips, ip)
		}
	}
	return ips
}

func ready(pod *corev1.Pod) bool {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
