// A test OCI registry: go-containerregistry's in-memory registry (pkg/registry), served on a
// loopback address only. Prints the address it listens on, then serves until killed.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	address := flag.String("address", "127.0.0.1:0", "host:port to listen on (port 0: any free port)")
	flag.Parse()
	listener, err := net.Listen("tcp", *address)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(listener.Addr().String())
	os.Stdout.Sync()
	log.Fatal(http.Serve(listener, registry.New(registry.Logger(log.New(os.Stderr, "registry: ", log.LstdFlags)))))
}
