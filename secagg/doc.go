// Package secagg is the cryptographic core of secure aggregation: the
// protocol of Bonawitz et al., "Practical Secure Aggregation for
// Privacy-Preserving Machine Learning" (CCS 2017), with double masking, in
// its honest-but-curious form, as messages (Go structs with a deterministic
// binary encoding) and a per-round state machine for each party, Participant
// and Server. It knows nothing of gRPC; a later change wires it into the
// collaborator and the aggregator. docs/privacy.md, "Secure aggregation",
// says what it protects against and what it does not.
//
// It is a top-level package beside privacy, not inside it, because it is a
// concept of its own with its own dependencies (the privacy package is
// differential privacy: an accountant and a ledger), and both parties of a
// round import it: the collaborator to mask, the aggregator to sum and
// unmask. It depends only on tensor and the standard library.
//
// # The protocol
//
// Each participant u has, per round, two fresh X25519 key pairs: c_u to
// agree the keys that encrypt its shares to each peer, s_u to agree the seed
// of the mask it shares with each peer. The server relays everything.
//
//  0. Advertise: u sends c_u^PK, s_u^PK and its public weight. The server's
//     KeyList is U1, everyone who advertised (at least t).
//  1. ShareKeys: u draws a self-mask seed b_u, splits s_u^SK and b_u t-of-|U1|
//     (Shamir), and seals to each peer v its two shares with AES-256-GCM
//     under HKDF(X25519(c_u, c_v)). U2 is everyone whose shares arrived.
//  2. Masker: u opens the shares sealed to it and masks its input x_u:
//     y_u = encode(x_u) + PRG(b_u) + Σ_{v∈U2, u<v} PRG(s_uv) − Σ_{v∈U2, u>v} PRG(s_uv)
//     mod 2^32, with s_uv = HKDF(X25519(s_u, s_v)). The server folds the y_u
//     into a running sum chunk by chunk; U3 is everyone whose y_u is complete.
//  3. (The consistency check of the actively secure version, with
//     signatures, is not part of this honest-but-curious variant.)
//  4. Unmask: the server names U3 (survivors) and U2 \ U3 (dropped). Each
//     participant returns its shares of b_v for every survivor v and of s_v^SK
//     for every dropped v, never both for one v. From t answers the server
//     reconstructs them, subtracts the survivors' self masks and the
//     pairwise masks that survivors shared with the dropped (the masks
//     between survivors cancel in the sum), and decodes the mean.
//
// Every key is derived with HKDF-SHA256 from the X25519 secret with an info
// string that names the purpose, the experiment, the round and the pair,
// and every sealed share carries the experiment, round, sender and
// recipient as associated data: a share altered on the way, moved to another
// recipient or replayed from another round or experiment fails to open, and
// the error names the sender and the recipient. Every message carries its
// Session and is refused in another. A reconstructed s_v^SK is checked
// against v's advertised public key, and b_v against the commitment v sent
// with its shares, so a corrupt share is an error rather than a wrong sum.
//
// # Primitives
//
// X25519 is crypto/ecdh and HKDF is crypto/hkdf (Go 1.24): the same
// algorithms as golang.org/x/crypto's curve25519 and hkdf, from the standard
// library, so the package adds no dependency. Shares are sealed with
// AES-256-GCM (crypto/cipher). Shamir sharing is over GF(2^521 − 1) with
// math/big (shamir.go). The PRG is AES-256-CTR, seekable by element (prg.go
// says why it rather than ChaCha20). Randomness is crypto/rand; tests fix it
// with testing/cryptotest.
//
// # Fixed point
//
// Participant u encodes each element x of its update as
//
//	q = round(α_u · clip(x, −R, R) · 2^f) mod 2^32,   α_u = w_u / Σ_{v∈U1} w_v
//
// where w_u is u's public weight (its sample count; 1 for everyone gives the
// plain mean), R the plan's clipping range, and f = 30 − ⌈log2 R⌉, the most
// fractional bits with R·2^f ≤ 2^30. Since the α add up to at most 1, the
// true sum of the survivors' q lies within ±(2^30 + n/2), inside the signed
// range of 32 bits, so it never wraps, whatever n. The server decodes the
// unmasked sum S as int32(S)·2^-f·W(U1)/W(U3): the weighted FedAvg of the
// survivors, re-normalised to their own weight.
//
//   - Range: values beyond ±R are clipped to it (choose R above the
//     largest magnitude an update takes: it is not a privacy parameter).
//     R is any number in [2^-60, 2^30]; NaN and Inf are refused.
//   - Precision: each participant's rounding is at most 2^-(f+1), so the
//     mean is within n·2^-(f+1)·W(U1)/W(U3) of the exact weighted mean of
//     the clipped inputs: for R = 1 (f = 30), 4.7·10^-10 per participant,
//     4.7·10^-9 for ten, about float32's spacing near 0.1; each doubling
//     of R costs one bit. Tests check this bound for every dtype and n = 3…10.
//   - n: at most 1000 participants (a bound of the message encoding, far
//     above the tens of sites fx federates); the error bound grows with n.
//   - Size: a masked element is 4 bytes whatever the dtype: the same as
//     F32, twice F16 or BF16, half F64.
//
// Only float tensors are summed; integer tensors (step counters) leave the
// layout and are not sent under secure aggregation.
//
// # Streaming and memory
//
// Masker.MaskChunk masks a chunk from its position alone (tensor index and
// element offset), in blocks of 16 Ki elements, so a participant needs
// O(chunk) memory beyond its update and can mask chunks in any order and in
// parallel. Server.AddMaskedChunk folds a chunk into the sum (4 bytes per
// element, mod 2^32: exact and order-independent) under striped locks, and
// Result.MeanChunk removes the masks from a range of the sum and decodes it,
// so the mean can be streamed out chunk by chunk; Result.Model does every
// chunk on all cores. Memory at the server: the sum, one model at 4 bytes
// per element, whatever n, until Result.Release gives it back.
//
// # What the wiring must do
//
//   - Fold only inputs that will count: a participant whose masked input is
//     partly in the sum can be neither counted nor dropped (either would
//     unmask something), so UnmaskRequest fails the round naming it. Stage
//     an upload and fold it once whole, as tensor.Accumulator does; chunks
//     come in order per tensor, so a broken upload can resume.
//   - Mask one update per Masker: two different values masked at one
//     position give the server their difference. Resending the same chunk
//     is harmless.
//   - Carry the bytes of each message as they are, route ShareBundles and
//     the UnmaskRequest to each party, and close each phase under the
//     round's deadline: a participant that misses a phase is dropped from
//     the next.
package secagg
