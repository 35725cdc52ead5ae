"""The randomness protocol without NumPy: the exact bits of `numpy.random.default_rng(seed)` for the three
draws the sampler makes (docs/randomness.md explains every line). Plain Python integers; a port to C, Rust
or Swift is line for line. minidiff itself draws with NumPy; tests/test_portable_rng.py checks this file
against NumPy bit for bit.
"""

M32, M64, M128 = (1 << 32) - 1, (1 << 64) - 1, (1 << 128) - 1


def seed_sequence(seed: int, words: int = 8) -> list[int]:
    """NumPy's SeedSequence(seed).generate_state(words, uint32): the seed hashed into a 4-word pool."""
    entropy = [(seed >> (32 * i)) & M32 for i in range(max(1, (seed.bit_length() + 31) // 32))]
    h = 0x43B0D7E5

    def hashmix(v):
        nonlocal h
        v = ((v ^ h) * (h := h * 0x931E8875 & M32)) & M32
        return v ^ (v >> 16)

    def mix(x, y):
        r = (0xCA01F9DD * x - 0x4973F715 * y) & M32
        return r ^ (r >> 16)

    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for e in entropy[4:]:
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(e))
    out, h = [], 0x8B51F9DD
    for i in range(words):
        v = ((pool[i % 4] ^ h) * (h := h * 0x58F38DED & M32)) & M32
        out.append(v ^ (v >> 16))
    return out


class PCG64:
    """NumPy's PCG64 (XSL-RR 128/64) with its buffered 32-bit half, seeded as default_rng(seed) seeds it."""
    MULT = 0x2360ED051FC65DA44385DF649FCCF645

    def __init__(self, seed: int):
        w = seed_sequence(seed)
        v = [w[2 * i] | w[2 * i + 1] << 32 for i in range(4)]      # generate_state(4, uint64)
        init_state, init_seq = v[0] << 64 | v[1], v[2] << 64 | v[3]
        self.inc, self.state, self.half = (init_seq << 1 | 1) & M128, 0, None
        self._step()
        self.state = (self.state + init_state) & M128
        self._step()

    def _step(self):
        self.state = (self.state * self.MULT + self.inc) & M128

    def next64(self) -> int:
        self._step()
        hi, lo = self.state >> 64, self.state & M64
        x, rot = hi ^ lo, hi >> 58                                 # XSL, then a random rotation
        return ((x >> rot) | (x << (64 - rot))) & M64

    def next32(self) -> int:
        if self.half is not None:                                  # the high half of the last 64-bit draw
            x, self.half = self.half, None
            return x
        x = self.next64()
        self.half = x >> 32
        return x & M32

    def random(self, n: int) -> list[float]:
        """rng.random(n): 53 high bits of each 64-bit draw, times 2^-53 (the buffered half is untouched)."""
        return [(self.next64() >> 11) * (1.0 / 9007199254740992.0) for _ in range(n)]

    def integers(self, high: int, n: int) -> list[int]:
        """rng.integers(0, high, n) for 1 < high <= 2^32: Lemire's multiply-shift on 32-bit draws, with rejection."""
        out, threshold = [], (2 ** 32 - high) % high
        for _ in range(n):
            m = self.next32() * high
            while (m & M32) < threshold:
                m = self.next32() * high
            out.append(m >> 32)
        return out
