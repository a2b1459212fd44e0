// hcl1json decodes HCL from stdin with HCL 1 (github.com/hashicorp/hcl v1, the parser Nomad reads
// its agent configuration with) and prints the result as JSON. Built by tests/nomad in GOPATH mode
// against Debian's golang-github-hashicorp-hcl-dev.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/hashicorp/hcl"
)

func main() {
	src, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var out map[string]interface{}
	if err := hcl.Decode(&out, string(src)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
