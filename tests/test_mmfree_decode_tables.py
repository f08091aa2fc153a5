"""The persistent decode kernel's host side without a GPU: its argument tables (backends/cuda/mmfree.py
decode_step_tables, the A entries named by kernels/mmfree_decode.cu's MD_* defines) and its split of every phase's
rows over the blocks (md_job: contiguous rows, chunks of a ring slot, code bytes copied as aligned 16-byte words),
walked in NumPy over the CPU model's own arrays (the addresses in the table are dereferenced). One decode step so
walked gives the CPU model's decode step: every pointer, layer stride, scale index and row lands where it should.
The kernel's arithmetic against the per-op GPU kernels, bit for bit, is tests/test_cuda_mmfree_decode.py's."""
import ctypes
import re

import numpy as np
import pytest

from dev.mmfree_decode_step import random_packed

from llmpy.backends import get_backend
from llmpy.backends.cuda import mmfree as M
from llmpy.backends.cuda.runtime import KERNELS
from llmpy.config import config_from_name
from llmpy.layers.bitlinear import unpack_codes
from llmpy.models.decode import decoder

F32 = np.float32
MD = {k: int(v) for k, v in re.findall(r"#define MD_(\w+) (\d+)", (KERNELS / "mmfree_decode.cu").read_text())}
GRID = 132  # an H100's SMs


def view(ptr, dtype, n):
    """n elements of dtype at host address ptr (a table entry), writable."""
    return np.frombuffer((ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(int(ptr)), dtype)


class Host:
    """A host array as the plan sees a device one (its address in .data.ptr)."""

    def __init__(self, x):
        self.x, self.dtype, self.size, self.shape, self.ndim = x, x.dtype, x.size, x.shape, x.ndim
        self.flags, self.strides = x.flags, x.strides
        self.data = type("Mem", (), {"ptr": x.ctypes.data})()


def md_job(kind, b, d, I, Vl, nbd, nbi, S):
    """The kernel's md_job: (weight, first row, rows, rows a chunk) of block b in phase kind."""
    groups, idx, N, nb, w = GRID, b, d, nbd, 0
    if kind == 0:
        groups = GRID // 3
        w, idx = b // groups, b % groups
        if w > 2:
            w, idx = 2, groups
    N = {2: I, 4: Vl}.get(kind, N)
    nb = nbi if kind == 3 else nb
    per = -(-N // groups)
    u0 = min(N, idx * per)
    return w, u0, min(N, u0 + per) - u0, (S // 2 - 16) // nb if kind == 2 else (S - 16) // nb


def walk(A, F):
    """One decode step as mmfree_decode_step computes it, phase by phase, through the tables (fp32 model)."""
    L, d, I, Vl, nbd, nbi, per, S, ps = (int(A[MD[k]]) for k in ("L", "D", "I", "VL", "NBD", "NBI", "PER", "SLOT",
                                                                  "PSTRIDE"))
    eps, packing = F[0], "base3" if per == 5 else "2bit"
    at = lambda name, n, off=0: view(A[MD[name]] + 4 * off, F32, n)  # noqa: E731
    row = lambda name, l, n: view(A[MD[name]] + 4 * l * ps, F32, n)  # noqa: E731  (a layer's gain)
    sig = lambda x: F32(1) / (F32(1) + np.exp(-x))  # noqa: E731

    def rstd(x, K):
        return F32(1) / np.sqrt(F32((x.astype(np.float64) ** 2).sum()) / F32(K) + eps)

    def quantize(x, g):
        r = rstd(x, x.size)
        s = F32(127) / max(np.abs(x * r * g).max(), F32(1e-5))
        y = x * r * g * s
        return np.clip(np.sign(y) * np.floor(np.abs(y) + F32(0.5)), -128, 127).astype(np.int32), s

    hn = None
    for l in range(L + 1):
        for kind in ([4] if l == L else range(4)):
            K, nb = (I, nbi) if kind == 3 else (d, nbd)
            if kind in (0, 4):
                x = at("ENC" if l == 0 else "R2", d).copy()
                if l > 0:
                    x = (x + at("PD", d)).astype(F32)
                if kind == 0:
                    at("R1", d)[:] = x  # block 0's copy
                x = x * rstd(x, d) * (at("LNF", d) if kind == 4 else row("LN1", l, d))
                gains = [at("HEADN", d)] if kind == 4 else [view(A[MD["GAIN"] + w] + 4 * l * ps, F32, d)
                                                            for w in range(3)]
            elif kind == 1:
                ai, af, ag = (view(A[MD["AI"] + i], F32, d) for i in range(3))
                lam, h0 = at("LAM", d, l * d), at("H", d, l * d).copy()
                f = lam + (F32(1) - lam) * sig(af)
                hn = (f * h0 + ai * sig(ai) * (F32(1) - f)).astype(F32)
                x = ag * rstd(ag, d) * row("GNORM", l, d) * (hn * sig(hn))
                gains = [view(A[MD["GAIN"] + 3] + 4 * l * ps, F32, d)]
            elif kind == 2:
                hs = -(-d // GRID)
                for b in range(GRID):  # each block its slice of the new state
                    at("H", d, l * d)[b * hs:(b + 1) * hs] = hn[b * hs:(b + 1) * hs]
                x = (at("R1", d) + at("PO", d)).astype(F32)
                at("R2", d)[:] = x
                x = x * rstd(x, d) * row("LN2", l, d)
                gains = [view(A[MD["GAIN"] + 4] + 4 * l * ps, F32, d)]
            else:
                x = at("SW", I).copy()
                gains = [view(A[MD["GAIN"] + 5] + 4 * l * ps, F32, I)]
            q = [quantize(x.astype(F32), g) for g in gains]
            writes = []  # a phase writes only what the next one reads
            for b in range(GRID):
                w, u0, nu, cap = md_job(kind, b, d, I, Vl, nbd, nbi, S)
                qx, sx = q[w]
                sw = F[1] if kind == 4 else F[2 + 6 * l + (w if kind == 0 else kind + 2)]
                out = A[MD["AI"] + w] if kind == 0 else A[MD[{1: "PO", 2: "SW", 3: "PD", 4: "LOGITS"}[kind]]]
                for r0 in range(u0, u0 + nu, cap):
                    r1 = min(u0 + nu, r0 + cap)
                    rows = []
                    for p in range(2 if kind == 2 else 1):  # gate/up: the up rows, then the gate rows
                        codes = A[MD["CODES"] + (w if kind == 0 else kind + 2)]
                        first = r0 + (I if p else 0)
                        base = codes + (0 if kind == 4 else l * (2 * I if kind == 2 else d) * nb)
                        src, n = base + first * nb, (r1 - r0) * nb
                        a = src & ~15
                        words = -(-(src + n - a) // 16)
                        assert words * 16 <= (S // 2 if kind == 2 else S)  # the slot holds the chunk
                        slot = np.zeros(words * 16, np.uint8)
                        slot[:src + n - a] = view(a, np.uint8, src + n - a)
                        rows.append(slot[src - a:src - a + n].reshape(r1 - r0, nb))
                    for i in range(r1 - r0):
                        v = [F32(int(unpack_codes(r[i:i + 1], K, packing)[0].astype(np.int32) @ qx) / (sx * sw))
                             for r in rows]
                        y = v[0] if kind != 2 else F32(v[0] * (v[1] / (F32(1) + np.exp(-v[1]))))
                        writes.append((out, r0 + i, y))
            n = {2: I, 4: Vl}.get(kind, d)
            for o, i, y in writes:
                view(o, F32, n)[i] = y


@pytest.mark.parametrize("name, packing, fields", [
    ("mmfree:l2d200i520v1000t64", "base3", False),  # 40 code bytes a row: packs and rows unaligned
    ("mmfree:l2d200i520v1000t64", "2bit", False),
    ("mmfree:l2d256i512v1000t64", "base3", True)])  # transcribed to 2-bit, read by fields
def test_the_tables_and_the_row_split_give_the_cpu_decode_step(name, packing, fields):
    cfg = config_from_name(name)
    m = decoder(cfg, random_packed(cfg, packing, seed=3), get_backend("cpu"))
    state = m.new_decode_state(8)
    L, d, I, per = cfg.num_layers, cfg.channels, cfg.ffn_hidden, {"base3": 5, "2bit": 4}[packing]
    codes = tuple(m.packed[w][0] for w in m.TERNARY[1:] + m.TERNARY[:1])
    if fields:
        codes, per = tuple(M.base3_to_2bit(c, K, np) for c, K in zip(codes, (d,) * 5 + (I, d))), 4
    nbd, nbi = -(-d // per), -(-I // per)
    S = (M._MAX_SMEM - M.decode_step_smem(d, I, nbd, nbi, per, 2, 0)) // 3 // 32 * 32
    for tok in (5, 17, 3):
        h = state.h.copy()
        ref = m.decode_step(np.array([[tok]]), state)  # leaves this token's embedding and lam in the model
        p, logits = m.params, np.zeros(m.Vl, F32)
        arrays = {"enc": m.acts["encoded"], "logits": logits, "h": h, "ln1": p["ln1w"], "ln2": p["ln2w"],
                  "gnorm": p["gnormw"], "lnf": p["lnfw"], "headn": p["lm_headn"],
                  "gains": tuple(p[w[:-1] + "n"] for w in m.TERNARY[1:]),
                  "codes": codes}
        host = {k: tuple(map(Host, v)) if isinstance(v, tuple) else Host(v) for k, v in arrays.items()}
        assert M._decode_step_unfit(np.dtype(F32), L, d, I, m.Vl, nbd, nbi, GRID, S, host, False) == ""
        scratch = {k: np.zeros(n, F32) for k, n in (("r1", d), ("r2", d), ("po", d), ("pd", d), ("ai", d),
                                                    ("af", d), ("ag", d), ("sw", I))}
        lam = m.stats["lam"].reshape(-1).copy()
        A, F = M.decode_step_tables(dict(L=L, d=d, I=I, Vl=m.Vl, per=per), host,
                                    {k: Host(v) for k, v in scratch.items()}, Host(lam), S,
                                    [[float(m.packed[w][1][l]) for w in m.TERNARY[1:]] for l in range(L)],
                                    float(m.packed["lm_head"][1][0]), cfg.norm_eps, fields)
        assert len(A) == MD["NARGS"] and A[MD["FIELDS"]] == fields
        walk(A, F)
        assert np.abs(logits[:cfg.vocab_size] - ref).max() <= 1e-5 * np.abs(ref).max()
        assert np.abs(h - state.h).max() <= 1e-5 * np.abs(state.h).max()


def test_the_fields_inner_loop_takes_the_code_dot_product():
    """md_quantize's q_x words for the fields loop (word 4 w + f: columns 16 w + 4 k + f) and md_dot_fields' bit
    arithmetic (low and high bits of 4 fields a word, dp4a each), in NumPy uint32: the trits' dot product."""
    from llmpy.formats.ternary import pack
    r = np.random.default_rng(0)
    for K in (16, 208, 2048):
        q, x = r.integers(-1, 2, (2, K)), r.integers(-128, 128, K)
        codes = pack(q, "2bit")  # (2, K / 4), whole 4-byte words
        cols = 16 * np.arange(K // 16)[:, None, None] + 4 * np.arange(4)[None, None, :] + np.arange(4)[None, :, None]
        xs = (x[cols].astype(np.int8).view(np.uint8).astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))).sum(
            -1).astype(np.uint32).reshape(-1)  # (K / 16 words, f) -> one uint32 each

        def dp4a(a, b):  # per word: sum of the 4 int8 products
            return (a.view(np.int8).reshape(-1, 4).astype(np.int64) * b.view(np.int8).reshape(-1, 4)).sum(-1)

        for n in range(2):
            W = codes[n].view(np.uint32)
            lo = sum(dp4a((W >> np.uint32(2 * f)) & np.uint32(0x01010101), xs[f::4].copy()).sum() for f in range(4))
            hi = sum(dp4a((W >> np.uint32(2 * f + 1)) & np.uint32(0x01010101), xs[f::4].copy()).sum()
                     for f in range(4))
            assert lo - 2 * hi == int(q[n] @ x)
