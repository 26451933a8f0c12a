// Package envoy is a data site's agent.
package envoy
