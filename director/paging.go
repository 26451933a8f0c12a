package director

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"
)

// Pages of the list RPCs (ListExperiments, ListEnvoys, SearchDatasets).
// Every item's size is bounded by the protocol's limits, but not how many
// items there are, so a listing is cut into pages that hold at most the
// page size the caller asked for and at most maxPageBytes: no listing can
// exceed gRPC's 4 MiB message limit, however many or large the records.
const (
	defaultPageSize = 100
	// maxPageBytes leaves room under the 4 MiB limit for one item that is
	// large on its own (a plan may be 1 MiB): a page always holds at least
	// one item.
	maxPageBytes = 2 << 20
)

// page picks from cands (in any order) the page a request asks for: the
// items whose key sorts after the position token encodes, in key order,
// rendering each only once it is on the page. key must be unique and sort
// in listing order. next is the token of the following page, empty after
// the last. kind names the listing, so a token of another is refused.
func page[C any, M proto.Message](kind string, size int32, token string, cands []C, key func(C) string, render func(C) M) (items []M, next string, err error) {
	after, err := decodePageToken(kind, token)
	if err != nil {
		return nil, "", err
	}
	limit := int(size)
	if limit <= 0 {
		limit = defaultPageSize
	}
	type keyed struct {
		key string
		c   C
	}
	var rest []keyed
	for _, c := range cands {
		if k := key(c); k > after {
			rest = append(rest, keyed{k, c})
		}
	}
	slices.SortFunc(rest, func(a, b keyed) int { return strings.Compare(a.key, b.key) })
	bytes := 0
	for i, r := range rest {
		if len(items) == limit {
			return items, encodePageToken(kind, rest[i-1].key), nil
		}
		m := render(r.c)
		n := proto.Size(m) + 8 // with the field's tag and length
		if len(items) > 0 && bytes+n > maxPageBytes {
			return items, encodePageToken(kind, rest[i-1].key), nil
		}
		items = append(items, m)
		bytes += n
	}
	return items, "", nil
}

// A page token is the listing's kind and the key of the last item sent,
// base64url-encoded: opaque to clients, and still meaningful when that item
// is gone, since the next page starts after its key.
func encodePageToken(kind, key string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(kind + "\x00" + key))
}

func decodePageToken(kind, token string) (string, error) {
	if token == "" {
		return "", nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	k, key, ok := strings.Cut(string(raw), "\x00")
	if err != nil || !ok || k != kind || key == "" {
		return "", fmt.Errorf("page_token %.40q is not one this director handed out for %s: pass the next_page_token of the previous page, or none for the first: %w", token, kind, ErrInvalidArgument)
	}
	return key, nil
}
