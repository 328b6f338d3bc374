// nodetest is the one binary of the real node's self-test image. Each
// subcommand exercises one thing a kubelet must get right; the tests in
// tests/cluster/test_real_node.py run it in pods.
//
//	nodetest exit CODE MESSAGE   print MESSAGE, write it to /dev/termination-log, exit CODE
//	nodetest print WORDS...      print WORDS and exit 0
//	nodetest cat FILE            print a file of the container
//	nodetest sleep               sleep until killed
//	nodetest alloc MIB           allocate and touch MIB MiB, 8 MiB at a time, then sleep
//	nodetest serve PORT TEXT     answer every HTTP request with TEXT and the pod's hostname
//	nodetest get URL             HTTP GET; print the status code and body
//	nodetest api PATH            GET PATH from the API server through the kubernetes
//	                             Service, with the pod's service-account token
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// held keeps alloc's memory reachable (and so resident) until the process ends.
var held [][]byte

func main() {
	if len(os.Args) < 2 {
		fail("usage: nodetest exit|print|cat|sleep|alloc|serve|get|api ...")
	}
	cmd, args := os.Args[1], os.Args[2:]
	switch {
	case cmd == "exit" && len(args) == 2:
		code, err := strconv.Atoi(args[0])
		check(err)
		fmt.Println(args[1])
		check(os.WriteFile("/dev/termination-log", []byte(args[1]), 0o644))
		os.Exit(code)
	case cmd == "print":
		fmt.Println(strings.Join(args, " "))
	case cmd == "cat" && len(args) == 1:
		data, err := os.ReadFile(args[0])
		check(err)
		os.Stdout.Write(data)
	case cmd == "sleep":
		select {}
	case cmd == "alloc" && len(args) == 1:
		alloc(args[0])
	case cmd == "serve" && len(args) == 2:
		serve(args[0], args[1])
	case cmd == "get" && len(args) == 1:
		client := &http.Client{Timeout: 10 * time.Second}
		printResponse(client.Get(args[0]))
	case cmd == "api" && len(args) == 1:
		api(args[0])
	default:
		fail("nodetest: unknown command or wrong arguments: " + strings.Join(os.Args[1:], " "))
	}
}

// alloc touches every page it allocates, so the memory is really charged to
// the container's cgroup and the kernel's OOM killer acts at the limit.
func alloc(mib string) {
	n, err := strconv.Atoi(mib)
	check(err)
	for total := 0; total < n; total += 8 {
		chunk := make([]byte, 8<<20)
		for i := 0; i < len(chunk); i += 4096 {
			chunk[i] = 1
		}
		held = append(held, chunk)
		fmt.Printf("allocated %d MiB\n", total+8)
	}
	fmt.Println("done")
	select {}
}

func serve(port, text string) {
	host, _ := os.Hostname()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s from %s\n", text, host)
	})
	fmt.Printf("listening on :%s\n", port)
	check(http.ListenAndServe(net.JoinHostPort("", port), nil))
}

// api talks to the API server the way in-cluster clients do: the address from
// KUBERNETES_SERVICE_HOST/PORT (the kubernetes Service), the cluster CA and
// the bound token from the projected service-account volume.
func api(path string) {
	token, err := os.ReadFile(serviceAccountDir + "/token")
	check(err)
	caPEM, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	check(err)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		fail("no certificate in ca.crt")
	}
	host := net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	req, err := http.NewRequest("GET", "https://"+host+path, nil)
	check(err)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	printResponse(client.Do(req))
}

func printResponse(resp *http.Response, err error) {
	check(err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	check(err)
	fmt.Printf("%d\n%s", resp.StatusCode, body)
	if resp.StatusCode >= 400 {
		os.Exit(1)
	}
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(2)
}
