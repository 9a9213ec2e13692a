"""The training order and the flips as pure NumPy functions of (seed, step), bit-identical to the TF ops they replace.

`index_shuffle` is TensorFlow's `tf.raw_ops.RandomIndexShuffle` (tensorflow/core/kernels/random_index_shuffle.cc):
a cycle-walking cipher (Black & Rogaway, "Ciphers with arbitrary finite domains") over a Simon-style Feistel
block (Beaulieu et al., eprint 2013/404) of B = max(16, bits of max_index rounded up to even) bits, keyed by
three uint32 words, `rounds` rounds. For a fixed key it is a bijection of [0, max_index]. One deliberate
difference: where max_index is a power of two >= 2**16 (a shard of 65,537, 131,073, ... images) TF's block is
one bit short and two indices collide; here it has max_index.bit_length() bits and stays a permutation.

`philox_uniform` is `tf.random.stateless_uniform(shape, seed, alg="philox")` for float32: the seed pair is mixed
into a Philox-4x32-10 key and counter (TF's GenerateKey, stateless_random_ops.cc), then sample i is the
(i mod 4)th word of Philox(counter + i // 4) mapped to [0, 1) through its 23 low bits (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011).

Keeping them bit-identical keeps every run's batches, and so a run's parameters, the same as under tf.data;
tests/test_data.py checks both against TF where it is installed, and against recorded TF outputs always.
"""

from __future__ import annotations

import functools

import numpy as np

_U32 = np.uint64(0xFFFFFFFF)


# ----------------------------------------------------------------------------- index shuffle (Simon cipher)


def _block_bits(max_index: int) -> int:
    """TF takes ceil(log2(max_index)) bits, one short where max_index is a power of two (>= 2**16): there its
    "permutation" maps two indices to one. max_index.bit_length() is the same number everywhere else."""
    bits = max_index.bit_length()
    return min(max(bits + bits % 2, 16), 64)


def _word_dtype(w: int):
    """The narrowest unsigned NumPy type that holds a w-bit word (uint8 for the digits' 16-bit block)."""
    return np.uint8 if w <= 8 else np.uint16 if w <= 16 else np.uint32 if w <= 32 else np.uint64


def _rotl(x: np.ndarray, r: int, w: int, mask) -> np.ndarray:
    """Rotates w-bit words left by r; mask keeps w bits where the array's type is wider (None: it is not)."""
    r %= w
    if r == 0:
        return x
    t = x.dtype.type
    out = (x << t(r)) | (x >> t(w - r))
    return out if mask is None else out & mask


def _simon_f(x: np.ndarray, w: int, mask) -> np.ndarray:
    return (_rotl(x, 1, w, mask) & _rotl(x, 8, w, mask)) ^ _rotl(x, 2, w, mask)


def _mask(w: int, dtype):
    """The w-bit mask in dtype, or None where dtype has exactly w bits."""
    return None if w == 8 * np.dtype(dtype).itemsize else np.dtype(dtype).type((1 << w) - 1)


def _round_keys(key: np.ndarray, w: int, rounds: int) -> list[np.ndarray]:
    """Simon's key schedule for word size w (TF's simon_key_schedule): key uint64 [n, 3] -> rounds x [n]."""
    mask = _mask(w, np.uint64)
    c = np.uint64(0xFFFFFFFC & ((1 << w) - 1))  # std::bitset<W>(0xfffffffc)
    z = 0x7369F885192C0EF5 & ((1 << w) - 1)
    rk = [key[:, j] & np.uint64((1 << w) - 1) for j in range(3)]
    for i in range(3, rounds):
        rr3 = _rotl(rk[i - 1], w - 3, w, mask)  # ROTR by 3 = ROTL by w - 3
        rr4 = _rotl(rk[i - 1], w - 4, w, mask)
        rk.append(c ^ np.uint64(z & 1) ^ rk[i - 3] ^ rr3 ^ rr4)
        z >>= 1
    return rk


def _encrypt(value: np.ndarray, rk: list[np.ndarray], w: int) -> np.ndarray:
    """One pass of the Feistel block (TF's simon_encrypt) on 2w-bit values: uint64 [n] -> uint64 [n]; rk: rounds
    x ([n] or scalar) round keys. The halves are computed in the narrowest type that holds w bits."""
    dtype = _word_dtype(w)
    mask = _mask(w, dtype)
    low = np.uint64((1 << w) - 1)
    left, right = ((value >> np.uint64(w)) & low).astype(dtype), (value & low).astype(dtype)
    rk = [np.asarray(k).astype(dtype) for k in rk]
    for i in range(0, len(rk), 2):
        left = left ^ _simon_f(right, w, mask) ^ rk[i]
        right = right ^ _simon_f(left, w, mask) ^ rk[i + 1]
    return (left.astype(np.uint64) << np.uint64(w)) | right.astype(np.uint64)


def _key_words(key, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(key, np.int64).astype(np.uint64) & _U32, (n, 3))


def index_shuffle(index, key, max_index: int, rounds: int = 4) -> np.ndarray:
    """tf.raw_ops.RandomIndexShuffle(index, seed=key, max_index, rounds): the position of each index in a
    pseudorandom permutation of [0, max_index] fixed by its key row (elementwise; see epoch_permutation).

    Args:
      index: int [n] in [0, max_index].
      key: int [n, 3] or [3] (each word taken modulo 2**32, as TF's static_cast<uint32_t>).
      max_index: the largest index (the permutation's size minus one).
      rounds: even, >= 4.

    Returns:
      int64 [n].
    """
    index = np.asarray(index, np.int64).astype(np.uint64)
    if max_index == 0:
        return np.zeros(len(index), np.int64)
    if np.ndim(key) == 1 and _block_bits(max_index) <= _TABLE_MAX_BITS:  # one key: the tabulated permutation
        words = tuple(int(k) & 0xFFFFFFFF for k in key)
        return epoch_permutation(words, max_index + 1, rounds)[index.astype(np.int64)]
    w = _block_bits(max_index) // 2
    rk = _round_keys(_key_words(key, len(index)), w, rounds)
    out = _encrypt(index, rk, w)
    todo = np.flatnonzero(out > np.uint64(max_index))
    while len(todo):  # cycle walking: encrypt again until the value is in range
        out[todo] = _encrypt(out[todo], [k[todo] for k in rk], w)
        todo = todo[out[todo] > np.uint64(max_index)]
    return out.astype(np.int64)


_TABLE_MAX_BITS = 24  # epoch_permutation tabulates block domains up to 2**24 values (uint32: 64 MB per array)


@functools.lru_cache(maxsize=4)
def epoch_permutation(key: tuple[int, int, int], n: int, rounds: int = 4) -> np.ndarray:
    """index_shuffle(arange(n), key, n - 1): int64 [n], one epoch's order (cached: a stream asks per step).

    The block encrypts every value of its domain [0, 2**B) once (2**B < 4n, or 2**16). The cycle walk is then
    pointer jumping on that table: T maps an out-of-range value to its encryption and keeps in-range values,
    so T^(2^k)(E(x)) for large enough k is the first in-range value on x's cycle, index_shuffle's answer;
    squaring T doubles the steps, so at most B + 1 rounds of gathers.
    """
    if n <= 1:
        return np.zeros(n, np.int64)
    max_index = n - 1
    bits = _block_bits(max_index)
    if bits > _TABLE_MAX_BITS:
        return index_shuffle(np.arange(n), key, max_index, rounds)
    w = bits // 2
    rk = [k[0] for k in _round_keys(_key_words(key, 1), w, rounds)]
    table = _encrypt(np.arange(2**bits, dtype=np.uint64), rk, w).astype(np.uint32)
    jump = table.copy()
    jump[:n] = np.arange(n, dtype=np.uint32)  # T: in range stays
    out = table[:n]
    while (out > max_index).any():
        out = jump[out]
        jump = jump[jump]
    out = out.astype(np.int64)
    out.flags.writeable = False  # shared by the cache
    return out


# ----------------------------------------------------------------------------- stateless philox uniforms

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox(counter: list, key: list, rounds: int = 10) -> list[np.ndarray]:
    """Philox-4x32: counter 4 and key 2 uint64 arrays (or scalars) holding uint32 words, broadcast together
    -> 4 uint64 arrays."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = _PHILOX_M[0] * c0, _PHILOX_M[1] * c2  # exact: < 2**64
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & _U32, p1 >> np.uint64(32), p1 & _U32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + np.uint64(_PHILOX_W[0])) & _U32, (k1 + np.uint64(_PHILOX_W[1])) & _U32
    return [c0, c1, c2, c3]


def _words(seed) -> tuple[np.ndarray, np.ndarray]:
    """The low and high uint32 words of int64 seeds (two's complement, as TF's static_cast<uint64>)."""
    s = np.asarray(seed, np.int64).astype(np.uint64)
    return s & _U32, s >> np.uint64(32)


def philox_uniform(n: int, seed0: int, seed1) -> np.ndarray:
    """tf.random.stateless_uniform([n], seed=[seed0, seed1], alg="philox"): float32 [n] in [0, 1).

    seed1 may be an int array [s] (say, s steps): then float32 [s, n], row i for seed [seed0, seed1[i]].
    """
    lo0, hi0 = _words(seed0)
    lo1, hi1 = _words(seed1)
    zero = np.zeros_like(lo1)
    # TF's GenerateKey: the seed pair, as a counter, scrambled by one Philox call under a fixed key, gives the
    # key (first two words) and the counter's upper half (last two); the counter's lower half starts at 0.
    mix = _philox([lo0 + zero, hi0 + zero, lo1, hi1], [np.uint64(0x3EC8F720), np.uint64(0x02461E29)])
    group = np.arange((n + 3) // 4, dtype=np.uint64) + zero[..., None]  # Philox block g: samples 4g .. 4g+3
    counter = [group, np.zeros_like(group), mix[2][..., None] + 0 * group, mix[3][..., None] + 0 * group]
    words = _philox(counter, [mix[0][..., None], mix[1][..., None]])  # counter (g, 0, c2, c3), 128-bit
    bits = np.stack(words, axis=-1).reshape(*np.shape(seed1), -1)[..., :n]  # n < 2**34: g never carries
    mantissa = ((bits & np.uint64(0x7FFFFF)) | np.uint64(127 << 23)).astype(np.uint32)
    return mantissa.view(np.float32) - np.float32(1.0)  # [1, 2) - 1: TF's Uint32ToFloat
