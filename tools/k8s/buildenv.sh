# Sourced by build and build-node, after versions.env: where the cache is, the
# Go toolchain and its settings, and Kubernetes' version ldflags.
# shellcheck shell=bash

cache="${EVALRUNNER_CACHE:-$HOME/.cache/evalrunner}"

go_bin="$(command -v go || true)"
[[ -n "$go_bin" ]] || go_bin=/usr/local/go/bin/go
[[ -x "$go_bin" ]] || { echo "build: no Go toolchain found (need Go >= 1.26)" >&2; exit 1; }

# Go downloads and build cache live under the same cache root, so a fresh
# clone on the same machine (or a CI cache of that directory) reuses them.
export GOPATH="$cache/go"
export GOMODCACHE="$cache/go/mod"
export GOCACHE="$cache/go/build"
export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0   # upstream builds these binaries statically too
jobs="${EVALRUNNER_BUILD_JOBS:-$(nproc)}"

# Same ldflags as upstream's hack/lib/version.sh, so /version is truthful.
# The module zip carries no git metadata: the tree state is "archive", as
# upstream reports for builds from a source tarball.
k8s_major="${K8S_VERSION#v}"; k8s_major="${k8s_major%%.*}"
k8s_minor="${K8S_VERSION#v*.}"; k8s_minor="${k8s_minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=${K8S_VERSION}"
  k8s_ldflags+=" -X $pkg.gitMajor=${k8s_major} -X $pkg.gitMinor=${k8s_minor}"
  k8s_ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=${K8S_BUILD_DATE}"
  k8s_ldflags+=" -X $pkg.gitCommit="
done
