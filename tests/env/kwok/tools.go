//go:build tools

// Package tools pins kwok (sigs.k8s.io/kwok), the fake kubelet whose Exec, Attach and
// PortForward resources give the test API server a real exec upstream without a node.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
