// CoreDNS with only the plugins the local cluster's DNS uses: cluster names from the
// Kubernetes API (kubernetes, and podhosts for the pods of headless Services, which the API
// cannot publish as EndpointSlices on loopback addresses: see podhosts/), on a loopback
// address (bind), with health/readiness endpoints, a cache, and error and query logs. Nothing is forwarded: names outside the cluster's zones
// are refused, so no query ever leaves the machine.
//
// hack/build-binaries.sh builds it against github.com/coredns/coredns at COREDNS_VERSION
// (hack/versions.env) as the module local/coredns; hack/cluster.sh runs it.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"

	_ "local/coredns/podhosts"
)

// The plugin chain, in CoreDNS's own order (its plugin.cfg) for these plugins.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "podhosts", "kubernetes"}
}

func main() { coremain.Run() }
