"""A keel client in pure Python 3 (standard library only), written from keel's documentation.

Specification used, and nothing else:
  docs/transactions.md       transaction/vote bytes, signing hashes, worked examples
  docs/rpc.md                JSON-RPC methods, fields and error codes
  proto/keel/v1/keel.proto   the protobuf schema
  state/README.md            state tree hashing and proof verification

Contents:
  BLAKE3 (hash, keyed_hash, derive_key), Ed25519 (RFC 8032 sign, cofactored verify),
  a minimal proto3 encoder/decoder, transaction building and signing, state proof
  verification and a JSON-RPC 2.0 client over urllib.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable

# =============================================================================================
# BLAKE3 (https://github.com/BLAKE3-team/BLAKE3-specs), written from the specification.
# =============================================================================================

_M32 = 0xFFFFFFFF
_IV = (
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
    0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
)
_MSG_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_CHUNK_LEN = 1024
_BLOCK_LEN = 64
_CHUNK_START = 1 << 0
_CHUNK_END = 1 << 1
_PARENT = 1 << 2
_ROOT = 1 << 3
_KEYED_HASH = 1 << 4
_DERIVE_KEY_CONTEXT = 1 << 5
_DERIVE_KEY_MATERIAL = 1 << 6


def _g(s: list[int], a: int, b: int, c: int, d: int, x: int, y: int) -> None:
    s[a] = (s[a] + s[b] + x) & _M32
    t = s[d] ^ s[a]
    s[d] = ((t >> 16) | (t << 16)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    t = s[b] ^ s[c]
    s[b] = ((t >> 12) | (t << 20)) & _M32
    s[a] = (s[a] + s[b] + y) & _M32
    t = s[d] ^ s[a]
    s[d] = ((t >> 8) | (t << 24)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    t = s[b] ^ s[c]
    s[b] = ((t >> 7) | (t << 25)) & _M32


def _compress(cv: tuple[int, ...], block: bytes, counter: int, block_len: int, flags: int) -> list[int]:
    """The BLAKE3 compression function: 16 output words (the first 8 are the new CV)."""
    m = list(struct.unpack("<16I", block.ljust(_BLOCK_LEN, b"\0")))
    s = list(cv) + list(_IV[:4]) + [counter & _M32, (counter >> 32) & _M32, block_len, flags]
    for rnd in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if rnd < 6:
            m = [m[i] for i in _MSG_PERMUTATION]
    return [s[i] ^ s[i + 8] for i in range(8)] + [s[i + 8] ^ cv[i] for i in range(8)]


# An "output" is the not yet compressed last step of a node: (cv, block, counter, len, flags).
_Output = tuple[tuple[int, ...], bytes, int, int, int]


def _chaining_value(out: _Output) -> tuple[int, ...]:
    cv, block, counter, block_len, flags = out
    return tuple(_compress(cv, block, counter, block_len, flags)[:8])


def _chunk_output(key: tuple[int, ...], chunk: bytes, chunk_counter: int, flags: int) -> _Output:
    cv = key
    blocks = [chunk[i:i + _BLOCK_LEN] for i in range(0, len(chunk), _BLOCK_LEN)] or [b""]
    for i, block in enumerate(blocks):
        f = flags | (_CHUNK_START if i == 0 else 0)
        if i == len(blocks) - 1:
            return (cv, block, chunk_counter, len(block), f | _CHUNK_END)
        cv = tuple(_compress(cv, block, chunk_counter, _BLOCK_LEN, f)[:8])
    raise AssertionError("unreachable")


def _subtree_output(key: tuple[int, ...], chunks: list[bytes], first: int, flags: int) -> _Output:
    if len(chunks) == 1:
        return _chunk_output(key, chunks[0], first, flags)
    # The left subtree holds the largest power of two of chunks that leaves at least one
    # chunk on the right.
    left_n = 1 << ((len(chunks) - 1).bit_length() - 1)
    left = _chaining_value(_subtree_output(key, chunks[:left_n], first, flags))
    right = _chaining_value(_subtree_output(key, chunks[left_n:], first + left_n, flags))
    return (key, struct.pack("<16I", *left, *right), 0, _BLOCK_LEN, flags | _PARENT)


def _blake3(data: bytes, key: tuple[int, ...], flags: int, out_len: int) -> bytes:
    chunks = [data[i:i + _CHUNK_LEN] for i in range(0, len(data), _CHUNK_LEN)] or [b""]
    cv, block, _counter, block_len, f = _subtree_output(key, chunks, 0, flags)
    out = bytearray()
    t = 0
    while len(out) < out_len:
        out += struct.pack("<16I", *_compress(cv, block, t, block_len, f | _ROOT))
        t += 1
    return bytes(out[:out_len])


def blake3(data: bytes, out_len: int = 32) -> bytes:
    """BLAKE3 in its plain hash mode."""
    return _blake3(bytes(data), _IV, 0, out_len)


def blake3_keyed(key: bytes, data: bytes, out_len: int = 32) -> bytes:
    """BLAKE3 in its keyed hash mode (`key` is 32 bytes)."""
    if len(key) != 32:
        raise ValueError("blake3 key must be 32 bytes")
    return _blake3(bytes(data), struct.unpack("<8I", key), _KEYED_HASH, out_len)


def blake3_derive_key(context: str, material: bytes, out_len: int = 32) -> bytes:
    """BLAKE3 in its key derivation mode: `derive_key(context, material)`."""
    context_key = _blake3(context.encode("utf-8"), _IV, _DERIVE_KEY_CONTEXT, 32)
    return _blake3(bytes(material), struct.unpack("<8I", context_key), _DERIVE_KEY_MATERIAL, out_len)


# =============================================================================================
# Ed25519 (RFC 8032, pure), written from the RFC. Verification is the cofactored equation
# keel documents (state/README.md "Signature verification").
# =============================================================================================

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z
_IDENTITY: _Point = (0, 1, 1, 0)


def _pt_add(p: _Point, q: _Point) -> _Point:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _pt_neg(p: _Point) -> _Point:
    x, y, z, t = p
    return ((-x) % _P, y, z, (-t) % _P)


def _pt_mul(k: int, p: _Point) -> _Point:
    acc = _IDENTITY
    while k > 0:
        if k & 1:
            acc = _pt_add(acc, p)
        p = _pt_add(p, p)
        k >>= 1
    return acc


def _pt_equal(p: _Point, q: _Point) -> bool:
    x1, y1, z1, _ = p
    x2, y2, z2, _ = q
    return (x1 * z2 - x2 * z1) % _P == 0 and (y1 * z2 - y2 * z1) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _pt_encode(p: _Point) -> bytes:
    x, y, z, _ = p
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _pt_decode(b: bytes) -> _Point | None:
    if len(b) != 32:
        return None
    n = int.from_bytes(b, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


_BY = 4 * pow(5, _P - 2, _P) % _P
_BX = _recover_x(_BY, 0)
assert _BX is not None
_B: _Point = (_BX, _BY, 1, _BX * _BY % _P)


def _sha512_int(*parts: bytes) -> int:
    h = hashlib.sha512()
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest(), "little")


def _expand_secret(secret: bytes) -> tuple[int, bytes]:
    if len(secret) != 32:
        raise ValueError("an Ed25519 secret key is 32 bytes")
    h = hashlib.sha512(secret).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def ed25519_public_key(secret: bytes) -> bytes:
    """RFC 8032 5.1.5: the public key of a 32-byte secret key."""
    a, _ = _expand_secret(secret)
    return _pt_encode(_pt_mul(a, _B))


def ed25519_sign(secret: bytes, message: bytes) -> bytes:
    """RFC 8032 5.1.6: a 64-byte signature."""
    a, prefix = _expand_secret(secret)
    public = _pt_encode(_pt_mul(a, _B))
    r = _sha512_int(prefix, message) % _L
    big_r = _pt_encode(_pt_mul(r, _B))
    k = _sha512_int(big_r, public, message) % _L
    s = (r + k * a) % _L
    return big_r + s.to_bytes(32, "little")


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Cofactored verification: s < l, R and A decode, A not of small order,
    [8]([s]B - R - [k]A) == identity."""
    if len(signature) != 64 or len(public) != 32:
        return False
    a_pt = _pt_decode(public)
    r_pt = _pt_decode(signature[:32])
    if a_pt is None or r_pt is None:
        return False
    if _pt_equal(_pt_mul(8, a_pt), _IDENTITY):
        return False  # small-order key: keel refuses these
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    k = _sha512_int(signature[:32], public, message) % _L
    check = _pt_add(_pt_add(_pt_mul(s, _B), _pt_neg(r_pt)), _pt_neg(_pt_mul(k, a_pt)))
    return _pt_equal(_pt_mul(8, check), _IDENTITY)


# =============================================================================================
# Minimal proto3 encoding (docs/transactions.md "protobuf": fields in field-number order,
# defaults omitted).
# =============================================================================================


def pb_varint(n: int) -> bytes:
    if n < 0 or n >= 1 << 64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_uint(num: int, value: int) -> bytes:
    """A varint field (uint64/uint32/bool), omitted at 0."""
    return b"" if value == 0 else pb_varint(num << 3) + pb_varint(value)


def pb_bytes(num: int, value: bytes) -> bytes:
    """A length-delimited field (bytes/string), omitted when empty."""
    return b"" if len(value) == 0 else pb_len(num, value)


def pb_len(num: int, value: bytes) -> bytes:
    """A length-delimited field written even when empty (a set message field)."""
    return pb_varint((num << 3) | 2) + pb_varint(len(value)) + value


def pb_string(num: int, value: str) -> bytes:
    return pb_bytes(num, value.encode("utf-8"))


def pb_decode(data: bytes) -> list[tuple[int, int, Any]]:
    """Splits a message into (field number, wire type, value): an int for varints and fixed
    fields, bytes for length-delimited ones. Raises ValueError on malformed input."""
    fields = []
    i = 0

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            if i >= len(data):
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise ValueError("varint too long")
        if n >= 1 << 64:
            raise ValueError("varint over 64 bits")
        return n

    while i < len(data):
        key = varint()
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wire == 0:
            fields.append((num, wire, varint()))
        elif wire == 1:
            if i + 8 > len(data):
                raise ValueError("truncated fixed64")
            fields.append((num, wire, int.from_bytes(data[i:i + 8], "little")))
            i += 8
        elif wire == 2:
            n = varint()
            if i + n > len(data):
                raise ValueError("truncated length-delimited field")
            fields.append((num, wire, data[i:i + n]))
            i += n
        elif wire == 5:
            if i + 4 > len(data):
                raise ValueError("truncated fixed32")
            fields.append((num, wire, int.from_bytes(data[i:i + 4], "little")))
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return fields


# ---- keel messages -------------------------------------------------------------------------


@dataclass
class Unbonding:
    amount: int = 0
    release_height: int = 0

    def encode(self) -> bytes:
        return pb_uint(1, self.amount) + pb_uint(2, self.release_height)


@dataclass
class Account:
    balance: int = 0
    nonce: int = 0
    stake: int = 0
    unbonding: list[Unbonding] = field(default_factory=list)
    jailed: bool = False

    def encode(self) -> bytes:
        out = pb_uint(1, self.balance) + pb_uint(2, self.nonce) + pb_uint(3, self.stake)
        for u in self.unbonding:
            out += pb_len(4, u.encode())  # repeated message: every element is written
        return out + pb_uint(5, int(self.jailed))

    @staticmethod
    def decode(data: bytes) -> "Account":
        acc = Account()
        for num, wire, value in pb_decode(data):
            if num in (1, 2, 3, 5) and wire != 0 or num == 4 and wire != 2:
                raise ValueError(f"Account field {num} has wire type {wire}")
            if num == 1:
                acc.balance = value
            elif num == 2:
                acc.nonce = value
            elif num == 3:
                acc.stake = value
            elif num == 4:
                u = Unbonding()
                for n2, w2, v2 in pb_decode(value):
                    if w2 != 0:
                        raise ValueError("Unbonding field with a non-varint wire type")
                    if n2 == 1:
                        u.amount = v2
                    elif n2 == 2:
                        u.release_height = v2
                acc.unbonding.append(u)
            elif num == 5:
                acc.jailed = value != 0
        return acc


def encode_tx_body(chain_id: str, nonce: int, fee: int, kind: str, amount: int, to: bytes = b"") -> bytes:
    """`message Tx` with one of transfer {to, amount}, bond {amount}, unbond {amount}."""
    if kind == "transfer":
        if len(to) != 20:
            raise ValueError("a transfer's `to` is 20 address bytes")
        inner, num = pb_bytes(1, to) + pb_uint(2, amount), 4
    elif kind == "bond":
        inner, num = pb_uint(1, amount), 5
    elif kind == "unbond":
        inner, num = pb_uint(1, amount), 6
    else:
        raise ValueError(f"unknown transaction kind {kind!r}")
    # The oneof member is a message: written even when all its fields are default.
    return pb_string(1, chain_id) + pb_uint(2, nonce) + pb_uint(3, fee) + pb_len(num, inner)


def encode_signed_tx(body: bytes, public_key: bytes, signature: bytes) -> bytes:
    return pb_bytes(1, body) + pb_bytes(2, public_key) + pb_bytes(3, signature)


def decode_signed_tx(data: bytes) -> tuple[bytes, bytes, bytes]:
    body = public_key = signature = b""
    for num, wire, value in pb_decode(data):
        if wire != 2:
            raise ValueError("SignedTx fields are length-delimited")
        if num == 1:
            body = value
        elif num == 2:
            public_key = value
        elif num == 3:
            signature = value
    return body, public_key, signature


# =============================================================================================
# Keys, transactions and votes (docs/transactions.md)
# =============================================================================================

TX_CONTEXT = "keel 2026-11 transaction signing v1"
VOTE_CONTEXT = "keel 2026-11 vote signing v1"
MAX_TX_BYTES = 64 * 1024


def u64le(n: int) -> bytes:
    return struct.pack("<Q", n)


def address_of(public_key: bytes) -> bytes:
    """The first 20 bytes of blake3(public key)."""
    return blake3(public_key)[:20]


def tx_signing_hash(chain_id: str, body: bytes) -> bytes:
    cid = chain_id.encode("utf-8")
    return blake3_derive_key(TX_CONTEXT, u64le(len(cid)) + cid + body)


def vote_signing_hash(chain_id: str, block_hash: bytes, height: int, round_: int) -> bytes:
    cid = chain_id.encode("utf-8")
    return blake3_derive_key(
        VOTE_CONTEXT, u64le(len(cid)) + cid + block_hash + u64le(height) + u64le(round_)
    )


def tx_hash(signed_tx: bytes) -> bytes:
    return blake3(signed_tx)


class Key:
    """An Ed25519 key pair and its keel address."""

    def __init__(self, secret: bytes):
        if len(secret) != 32:
            raise ValueError("a secret key is 32 bytes")
        self.secret = bytes(secret)
        self.public = ed25519_public_key(self.secret)
        self.address = address_of(self.public)

    @staticmethod
    def generate() -> "Key":
        return Key(os.urandom(32))

    @staticmethod
    def from_hex(text: str) -> "Key":
        return Key(parse_hex(text.strip(), 32, require_0x=False))

    @property
    def address_hex(self) -> str:
        return "0x" + self.address.hex()

    def sign(self, message: bytes) -> bytes:
        return ed25519_sign(self.secret, message)


@dataclass
class SignedTransaction:
    body: bytes
    signing_hash: bytes
    signature: bytes
    bytes: bytes
    hash: bytes

    @property
    def hex(self) -> str:
        return "0x" + self.bytes.hex()

    @property
    def hash_hex(self) -> str:
        return "0x" + self.hash.hex()


def sign_tx(key: Key, chain_id: str, nonce: int, fee: int, kind: str, amount: int,
            to: bytes = b"") -> SignedTransaction:
    body = encode_tx_body(chain_id, nonce, fee, kind, amount, to)
    sh = tx_signing_hash(chain_id, body)
    sig = key.sign(sh)
    raw = encode_signed_tx(body, key.public, sig)
    return SignedTransaction(body, sh, sig, raw, tx_hash(raw))


# ---- header commitments NOT in the docs ------------------------------------------------------
# docs/rpc.md and keel.proto name `tx_root` ("Merkle root of the block's transactions") and
# `validators_hash` ("Hash of the validator set of the block's epoch") without their rules.
# The two functions below follow keel's Rust code (types/src/block.rs `merkle_root`,
# consensus/src/validators.rs `ValidatorSet::new`), read after the gap was noted.

VALIDATOR_SET_CONTEXT = "keel 2026-11 validator set v1"


def tx_merkle_root(tx_hashes: list[bytes]) -> bytes:
    """Leaves blake3(0x00 || tx hash); each level pairs neighbours as
    blake3(0x01 || left || right), an odd last node carried up unchanged; no leaves: zeros."""
    if not tx_hashes:
        return bytes(32)
    level = [blake3(b"\x00" + h) for h in tx_hashes]
    while len(level) > 1:
        nxt = [blake3(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def validator_set_hash(validators: list[tuple[bytes, bytes, int]]) -> bytes:
    """`validators` as (address, public key, stake): derive_key(VALIDATOR_SET_CONTEXT,
    concatenation over the set sorted by address of public key || u64le(stake))."""
    material = b"".join(pk + u64le(stake) for _, pk, stake in sorted(validators))
    return blake3_derive_key(VALIDATOR_SET_CONTEXT, material)


# =============================================================================================
# State proofs (state/README.md "Hashing rules" and "Proof format")
# =============================================================================================

LEAF_KEY = b"keel state tree leaf hash  v1.0 "
INTERNAL_KEY = b"keel state tree inner hash v1.0 "
ZERO_HASH = bytes(32)
assert len(LEAF_KEY) == 32 and len(INTERNAL_KEY) == 32


def leaf_hash(key: bytes, value_hash: bytes) -> bytes:
    return blake3_keyed(LEAF_KEY, key + value_hash)


def internal_hash(left: bytes, right: bytes) -> bytes:
    return blake3_keyed(INTERNAL_KEY, left + right)


def key_bit(key: bytes, i: int) -> int:
    return (key[i // 8] >> (7 - i % 8)) & 1


def account_key(address: bytes) -> bytes:
    return blake3(address)


class ProofError(Exception):
    pass


@dataclass
class Proof:
    leaf: tuple[bytes, bytes] | None  # (key, value_hash)
    siblings: list[bytes]

    @staticmethod
    def from_json(obj: Any) -> "Proof":
        if not isinstance(obj, dict) or "siblings" not in obj:
            raise ProofError(f"proof is not an object with siblings: {obj!r}")
        leaf = obj.get("leaf")
        parsed_leaf = None
        if leaf is not None:
            parsed_leaf = (parse_hex(leaf["key"], 32), parse_hex(leaf["value_hash"], 32))
        siblings = [parse_hex(s, 32) for s in obj["siblings"]]
        return Proof(parsed_leaf, siblings)


def verify_proof(root: bytes, key: bytes, value: bytes | None, proof: Proof) -> None:
    """Raises ProofError unless `proof` links `key` to `value` (None: absent) under `root`."""
    n = len(proof.siblings)
    if n > 256:
        raise ProofError("more than 256 siblings")
    if value is not None:
        if proof.leaf is None:
            raise ProofError("a membership proof needs a leaf")
        lkey, lvh = proof.leaf
        if lkey != key:
            raise ProofError("the proof's leaf is for another key")
        if lvh != blake3(value):
            raise ProofError("the leaf's value hash is not blake3(value)")
        acc = leaf_hash(lkey, lvh)
    elif proof.leaf is not None:
        lkey, lvh = proof.leaf
        if lkey == key:
            raise ProofError("absence proof whose leaf is the key itself")
        if any(key_bit(lkey, i) != key_bit(key, i) for i in range(n)):
            raise ProofError("the leaf does not share the path's prefix with the key")
        acc = leaf_hash(lkey, lvh)
    else:
        acc = ZERO_HASH
    for i, sib in enumerate(proof.siblings):
        if key_bit(key, n - 1 - i):
            acc = internal_hash(sib, acc)
        else:
            acc = internal_hash(acc, sib)
    if acc != root:
        raise ProofError(f"computed root 0x{acc.hex()} != 0x{root.hex()}")


# =============================================================================================
# Hex helpers
# =============================================================================================


def parse_hex(text: Any, length: int | None = None, require_0x: bool = True) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a hex string, got {text!r}")
    digits = text
    if text[:2] in ("0x", "0X"):
        digits = text[2:]
    elif require_0x:
        raise ValueError(f"hex without 0x: {text!r}")
    try:
        raw = bytes.fromhex(digits)
    except ValueError as e:
        raise ValueError(f"bad hex {text!r}: {e}") from None
    if length is not None and len(raw) != length:
        raise ValueError(f"expected {length} bytes, got {len(raw)}: {text!r}")
    return raw


def to_hex(raw: bytes) -> str:
    return "0x" + raw.hex()


# =============================================================================================
# JSON-RPC 2.0 over HTTP (docs/rpc.md)
# =============================================================================================

ERROR_CODES = {
    -32700: "parse error",
    -32600: "invalid request",
    -32601: "unknown method",
    -32602: "invalid params",
    -32000: "internal error",
    -32001: "invalid signature",
    -32002: "bad nonce",
    -32003: "insufficient funds",
    -32004: "mempool full",
    -32005: "fee too low",
    -32006: "wrong chain id",
    -32007: "already known",
    -32008: "too large",
    -32010: "not found",
    -32011: "pruned",
}


class RpcError(Exception):
    def __init__(self, code: Any, message: Any, data: Any = None):
        super().__init__(f"JSON-RPC error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class TransportError(Exception):
    """No JSON-RPC answer came back (connection refused, HTTP error without a JSON-RPC body,
    a body that is not a JSON-RPC response)."""


@dataclass
class RawResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise TransportError(f"HTTP {self.status}: body is not JSON: {self.body[:200]!r}") from e


class RpcClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url
        self.timeout = timeout
        self._id = 0

    def post_raw(self, body: bytes) -> RawResponse:
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return RawResponse(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return RawResponse(e.code, e.read())
        except (urllib.error.URLError, OSError) as e:
            raise TransportError(f"POST {self.url}: {e}") from e

    def get(self, path: str) -> RawResponse:
        url = self.url.rstrip("/") + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return RawResponse(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return RawResponse(e.code, e.read())
        except (urllib.error.URLError, OSError) as e:
            raise TransportError(f"GET {url}: {e}") from e

    def envelope(self, method: Any, params: Any = None, *, omit_params: bool = False) -> dict:
        """Sends one request; returns the response object (with `result` or `error`)."""
        self._id += 1
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": self._id, "method": method}
        if not omit_params:
            req["params"] = [] if params is None else params
        resp = self.post_raw(json.dumps(req).encode())
        v = resp.json()
        if not isinstance(v, dict) or ("result" in v) == ("error" in v):
            raise TransportError(f"{method}: HTTP {resp.status}: not a JSON-RPC response: {v!r}")
        if v.get("jsonrpc") != "2.0":
            raise TransportError(f"{method}: response lacks jsonrpc 2.0: {v!r}")
        if v.get("id") != self._id:
            raise TransportError(f"{method}: response id {v.get('id')!r} != request id {self._id}")
        return v

    def call(self, method: str, params: Any = None) -> Any:
        v = self.envelope(method, params)
        if "error" in v:
            e = v["error"]
            if not isinstance(e, dict):
                raise TransportError(f"{method}: error is not an object: {e!r}")
            raise RpcError(e.get("code"), e.get("message"), e.get("data"))
        return v["result"]

    # ---- typed helpers ---------------------------------------------------------------------

    def chain_status(self) -> dict:
        return self.call("chain_status", [])

    def header(self, block: int | str) -> dict:
        return self.call("chain_getHeader", [block])

    def account(self, address: str, height: int | None = None) -> dict:
        return self.call("state_getAccount", [address] if height is None else [address, height])

    def proof(self, address: str, height: int | None = None) -> dict:
        return self.call("state_getProof", [address] if height is None else [address, height])

    def submit(self, tx: bytes) -> str:
        return self.call("tx_submit", {"tx": to_hex(tx)})

    def tx_status(self, h: str) -> str:
        return self.call("tx_status", [h])

    def transaction(self, h: str) -> dict:
        return self.call("chain_getTransaction", [h])


def amount(v: Any, what: str) -> int:
    """An amount field: a JSON string of a decimal u64 (docs/rpc.md)."""
    if not isinstance(v, str) or not v.isdigit():
        raise ValueError(f"{what}: amount is not a decimal JSON string: {v!r}")
    n = int(v)
    if n >= 1 << 64:
        raise ValueError(f"{what}: amount over u64: {v!r}")
    return n


def number(v: Any, what: str) -> int:
    """A height/round/nonce/timestamp field: a JSON number (docs/rpc.md)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what}: not a non-negative JSON number: {v!r}")
    return v


def chunks_of(seq: bytes, n: int) -> Iterable[bytes]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
