// Package python holds fx's Python SDK. To Go it exports the part a data
// site's runner needs — fx.site and the numpy-only modules it imports —
// so that every envoy hands its runners the site library of its own
// version: a plan's `from fx import site` works at any site without the
// site installing anything but numpy (and PyTorch for PyTorch code).
package python

import "embed"

// SiteLibrary is the fx Python package without the notebook client (which
// needs grpc): fx/__init__.py imports the client lazily, so these files
// are a complete package for a runner.
//
//go:embed fx/__init__.py fx/site.py fx/safetensors.py fx/errors.py fx/archive.py fx/metrics.py fx/profile.py
var SiteLibrary embed.FS
