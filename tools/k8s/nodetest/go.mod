// The real node's self-test program (standard library only), packaged by
// tools/k8s/build-node as a one-file image from scratch.
module evalrunner/tools/k8s/nodetest

go 1.25.0
