// Command etcd is upstream etcd's server, started through its etcdmain
// package exactly as etcd's own main does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
