package secagg

import (
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
)

// Shamir t-of-n secret sharing of 32-byte secrets (the X25519 private key
// s^SK and the self-mask seed b) over GF(p) with p = 2^521 − 1, the Mersenne
// prime of NIST P-521's field: one field element holds a whole secret, so a
// secret needs no splitting into pieces, and a share is a fixed 66 bytes.
// math/big is chosen for correctness over speed: a round shares 2n secrets
// n ways, microseconds each for the tens of sites fx federates. Its
// arithmetic is not constant-time; the polynomial's coefficients are
// evaluated only on the site's own machine, where an observer of its timing
// is already inside the site.

// shareSize is the encoded length of a share value: ⌈521/8⌉ bytes.
const shareSize = 66

// secretSize is the length of every shared secret.
const secretSize = 32

var fieldP = func() *big.Int {
	p := new(big.Int).Lsh(big.NewInt(1), 521)
	return p.Sub(p, big.NewInt(1))
}()

// splitSecret returns shares of secret at x = 1 … n: f(x) for a random
// polynomial f of degree t−1 with f(0) = secret. Any t of them give the
// secret back; t−1 of them are uniformly distributed whatever the secret.
func splitSecret(secret []byte, t, n int) ([][]byte, error) {
	if len(secret) != secretSize {
		return nil, fmt.Errorf("shamir: secret of %d bytes, want %d", len(secret), secretSize)
	}
	if t < 1 || t > n {
		return nil, fmt.Errorf("shamir: threshold %d of %d shares", t, n)
	}
	coef := make([]*big.Int, t)
	coef[0] = new(big.Int).SetBytes(secret)
	for i := 1; i < t; i++ {
		c, err := rand.Int(rand.Reader, fieldP)
		if err != nil {
			return nil, fmt.Errorf("shamir: random coefficient: %w", err)
		}
		coef[i] = c
	}
	shares := make([][]byte, n)
	for x := 1; x <= n; x++ {
		bx := big.NewInt(int64(x))
		y := new(big.Int)
		for i := t - 1; i >= 0; i-- { // Horner
			y.Mul(y, bx).Add(y, coef[i]).Mod(y, fieldP)
		}
		shares[x-1] = y.FillBytes(make([]byte, shareSize))
	}
	return shares, nil
}

// combineShares interpolates f(0) from shares at the distinct x-coordinates
// xs (1-based). With more than t consistent shares the answer is the same;
// with a corrupt share it is garbage, which callers detect by checking the
// secret against a commitment.
func combineShares(xs []int, ys [][]byte) ([]byte, error) {
	if len(xs) != len(ys) || len(xs) == 0 {
		return nil, errors.New("shamir: no shares, or x and y counts differ")
	}
	seen := make(map[int]bool, len(xs))
	for i, x := range xs {
		if x < 1 || seen[x] {
			return nil, fmt.Errorf("shamir: x-coordinate %d is zero, negative or repeated", x)
		}
		seen[x] = true
		if len(ys[i]) != shareSize {
			return nil, fmt.Errorf("shamir: share of %d bytes, want %d", len(ys[i]), shareSize)
		}
	}
	secret := new(big.Int)
	num, den, term := new(big.Int), new(big.Int), new(big.Int)
	for i, xi := range xs {
		yi := new(big.Int).SetBytes(ys[i])
		if yi.Cmp(fieldP) >= 0 {
			return nil, fmt.Errorf("shamir: share at x = %d is not a field element", xi)
		}
		// Lagrange basis at 0: Π_{j≠i} x_j / (x_j − x_i).
		num.SetInt64(1)
		den.SetInt64(1)
		for j, xj := range xs {
			if j == i {
				continue
			}
			num.Mul(num, big.NewInt(int64(xj))).Mod(num, fieldP)
			den.Mul(den, big.NewInt(int64(xj-xi))).Mod(den, fieldP)
		}
		den.ModInverse(den, fieldP)
		term.Mul(yi, num).Mod(term, fieldP).Mul(term, den).Mod(term, fieldP)
		secret.Add(secret, term).Mod(secret, fieldP)
	}
	if secret.BitLen() > 8*secretSize {
		return nil, errors.New("shamir: the shares do not interpolate to a 32-byte secret: one of them is corrupt")
	}
	return secret.FillBytes(make([]byte, secretSize)), nil
}
