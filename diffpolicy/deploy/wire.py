"""The wire schema of the policy server: msgpack maps with numpy arrays as raw bytes, never pickle.

Every message is one msgpack map, checked field by field on arrival (unknown fields, wrong types,
wrong versions are refused with a `WireError` naming the field):

    request  {"v": 1, "id": int, "op": "health" | "metadata" | "sample", "body": {...}}
    reply    {"v": 1, "id": int, "ok": true,  "body": {...}, "timing": {"queue_ms": f, "infer_ms": f}}
             {"v": 1, "id": int, "ok": false, "error": {"type": str, "message": str}, "timing": {...}}

    sample body    {"obs": {key: array (B, To, ...)}, "steps": int | nil, "x_init": array (B, Tp, Da) | nil,
                    "t_start": float | array (B,) or (B, Tp) | nil, "normalized": bool, "rng_state": uint8 array | nil,
                    "guidance": nil | {"kind": "prefix", "prefix": array (B, P, Da)}
                              | {"kind": "guided", "target": array (B, Tp, Da), "weights": array, "max_weight": f}}
    sample reply   {"chunk": array (B, Tp, Da), "rng_state": uint8 array | nil}
                   (data units; normalized units when "normalized"; the generator's state after sampling)

An array is the map {"dtype": name, "shape": [int, ...], "data": bytes} (little-endian, C order);
its dtype is one of `DTYPES` (object, string and void dtypes are refused) and `data` must hold
exactly prod(shape) * itemsize bytes. msgpack extension types are refused. Decoding never runs code
from the message: msgpack yields only maps, lists, strings, bytes and numbers, and arrays are built
with `np.frombuffer` on a dtype from the fixed list.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from diffpolicy.deploy.errors import WireError

VERSION = 1
OPS = ("health", "metadata", "sample")
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")
MAX_DIMS = 8
MAX_ID = 2 ** 63 - 1
WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}  # name -> little-endian dtype
NATIVE_DTYPES = {name: np.dtype(name) for name in DTYPES}
NAMES = {dtype: name for name, dtype in NATIVE_DTYPES.items()}  # dtype -> name (dtype.name is a slow property)
GUIDANCE_FIELDS = {"prefix": {"kind", "prefix"}, "guided": {"kind", "target", "weights", "max_weight"}}
SAMPLE_FIELDS = {"obs", "steps", "x_init", "t_start", "normalized", "rng_state", "guidance"}


# ---------------------------------------------------------------------------- arrays
def encode_array(value: Any) -> dict[str, Any]:
    """A numpy array (or anything `np.asarray` takes) -> {"dtype", "shape", "data"}."""
    array = np.asarray(value)
    name = NAMES.get(array.dtype) or NAMES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise WireError(f"array dtype {array.dtype} cannot go on the wire; expected one of {list(DTYPES)}")
    if array.ndim > MAX_DIMS:
        raise WireError(f"array with {array.ndim} dimensions cannot go on the wire; at most {MAX_DIMS}")
    if array.dtype != WIRE_DTYPES[name]:  # big-endian (or native on a big-endian host): little-endian bytes
        array = array.astype(WIRE_DTYPES[name])
    return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}  # tobytes: C order, a copy


def decode_array(value: Any, where: str) -> np.ndarray:
    """{"dtype", "shape", "data"} -> a writable numpy array in native byte order."""
    fields = _fields(value, where, {"dtype", "shape", "data"})
    dtype, shape, data = fields["dtype"], fields["shape"], fields["data"]
    if type(dtype) is not str or dtype not in WIRE_DTYPES:
        raise WireError(f"{where}.dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_DIMS or not all(type(n) is int and 0 <= n < 2 ** 31 for n in shape):
        raise WireError(f"{where}.shape: expected a list of at most {MAX_DIMS} integers in [0, 2^31), got {_brief(shape)}")
    if type(data) is not bytes:
        raise WireError(f"{where}.data: expected bytes, got {type(data).__name__}")
    wire_dtype = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * wire_dtype.itemsize
    if len(data) != expected:
        raise WireError(f"{where}.data: shape {shape} of {dtype} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=wire_dtype).reshape(shape).astype(NATIVE_DTYPES[dtype], copy=True)  # writable


# ---------------------------------------------------------------------------- messages
def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Bytes -> a msgpack map (no schema check yet). Raises `WireError` for anything else."""
    if len(raw) > max_bytes:
        raise WireError(f"message of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                                  ext_hook=_refuse_ext, timestamp=0)
    except WireError:
        raise
    except Exception as err:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError, ...)
        raise WireError(f"message is not one valid msgpack value: {type(err).__name__}: {_brief(str(err))}") from None
    if not isinstance(message, dict):
        raise WireError(f"message: expected a msgpack map, got {type(message).__name__}")
    return message


def check_request(message: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """A decoded request -> (id, op, body). The body of "sample" is decoded by `decode_sample`."""
    fields = _fields(message, "request", {"v", "id", "op", "body"})
    request_id = _check_version_and_id(fields)
    op = fields["op"]
    if type(op) is not str or op not in OPS:
        raise WireError(f"request.op: expected one of {list(OPS)}, got {_brief(op)}")
    body = fields["body"]
    if not isinstance(body, dict):
        raise WireError(f"request.body: expected a map, got {type(body).__name__}")
    if op != "sample" and body:
        raise WireError(f"request.body: {op!r} takes an empty body, got fields {sorted(map(str, body))}")
    return request_id, op, body


def request_id_of(message: Any) -> int | None:
    """The request's id if it has a valid one (so an error reply can name it), else None."""
    if isinstance(message, dict):
        value = message.get("id")
        if type(value) is int and 0 <= value <= MAX_ID:
            return value
    return None


def decode_sample(body: dict[str, Any]) -> dict[str, Any]:
    """A sample body -> {"obs": {key: ndarray}, "steps", "x_init", "t_start", "normalized", "rng_state", "guidance"}."""
    unknown = sorted(set(map(str, body)) - SAMPLE_FIELDS)
    if unknown:
        raise WireError(f"sample: unknown field {unknown[0]!r}; expected fields {sorted(SAMPLE_FIELDS)}")
    obs = body.get("obs")
    if not isinstance(obs, dict) or not obs:
        raise WireError(f"sample.obs: expected a non-empty map {{key: array}}, got {_brief(obs)}")
    out: dict[str, Any] = {"obs": {}}
    for key, value in obs.items():
        if type(key) is not str:
            raise WireError(f"sample.obs: keys must be strings, got {_brief(key)}")
        out["obs"][key] = decode_array(value, f"sample.obs[{key!r}]")
    steps = body.get("steps")
    if steps is not None and not (type(steps) is int and 1 <= steps <= 10_000):
        raise WireError(f"sample.steps: expected nil or an integer in [1, 10000], got {_brief(steps)}")
    out["steps"] = steps
    out["x_init"] = None if body.get("x_init") is None else decode_array(body["x_init"], "sample.x_init")
    t_start = body.get("t_start")
    if t_start is None or (type(t_start) is float and 0.0 <= t_start <= 1.0):
        out["t_start"] = t_start
    elif isinstance(t_start, dict):
        out["t_start"] = decode_array(t_start, "sample.t_start")
    else:
        raise WireError(f"sample.t_start: expected nil, a float in [0, 1] or an array, got {_brief(t_start)}")
    normalized = body.get("normalized", False)
    if type(normalized) is not bool:
        raise WireError(f"sample.normalized: expected a bool, got {_brief(normalized)}")
    out["normalized"] = normalized
    out["rng_state"] = None if body.get("rng_state") is None else decode_array(body["rng_state"], "sample.rng_state")
    if out["rng_state"] is not None and (out["rng_state"].dtype != np.uint8 or out["rng_state"].ndim != 1):
        raise WireError(f"sample.rng_state: expected a 1-D uint8 array (torch.Generator.get_state()), got "
                        f"{out['rng_state'].dtype} of shape {out['rng_state'].shape}")
    out["guidance"] = _decode_guidance(body.get("guidance"))
    return out


def _decode_guidance(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind not in GUIDANCE_FIELDS:
        raise WireError(f"sample.guidance: expected nil or a map with kind in {sorted(GUIDANCE_FIELDS)}, "
                        f"got {_brief(value)}")
    fields = _fields(value, "sample.guidance", GUIDANCE_FIELDS[kind])
    out: dict[str, Any] = {"kind": kind}
    for name in sorted(GUIDANCE_FIELDS[kind] - {"kind", "max_weight"}):
        out[name] = decode_array(fields[name], f"sample.guidance.{name}")
    if kind == "guided":
        weight = fields["max_weight"]
        if type(weight) not in (int, float) or not (math.isfinite(weight) and weight >= 0):
            raise WireError(f"sample.guidance.max_weight: expected a finite number >= 0, got {_brief(weight)}")
        out["max_weight"] = float(weight)
    return out


def make_request(request_id: int, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "id": request_id, "op": op, "body": body or {}}


def make_reply(request_id: int | None, body: dict[str, Any] | None = None, error: BaseException | None = None,
               queue_ms: float = 0.0, infer_ms: float = 0.0) -> dict[str, Any]:
    """A success reply with `body`, or an error reply naming `error`'s type and message."""
    reply: dict[str, Any] = {"v": VERSION, "id": -1 if request_id is None else request_id, "ok": error is None,
                             "timing": {"queue_ms": float(queue_ms), "infer_ms": float(infer_ms)}}
    if error is None:
        reply["body"] = body or {}
    else:
        reply["error"] = {"type": type(error).__name__, "message": str(error)}
    return reply


def check_reply(message: dict[str, Any]) -> dict[str, Any]:
    """A decoded reply, checked (the client trusts a server no more than the server trusts a client)."""
    ok = message.get("ok") if isinstance(message, dict) else None
    if type(ok) is not bool:
        raise WireError(f"reply.ok: expected a bool, got {_brief(ok)}")
    fields = _fields(message, "reply", {"v", "id", "ok", "timing", "body" if ok else "error"})
    if fields["v"] != VERSION or type(fields["v"]) is not int:
        raise WireError(f"reply.v: this client speaks schema version {VERSION}, got {_brief(fields['v'])}")
    if type(fields["id"]) is not int:
        raise WireError(f"reply.id: expected an integer, got {_brief(fields['id'])}")
    timing = _fields(fields["timing"], "reply.timing", {"queue_ms", "infer_ms"})
    if not all(type(v) is float for v in timing.values()):
        raise WireError(f"reply.timing: expected floats, got {_brief(timing)}")
    payload = fields["body" if ok else "error"]
    if not isinstance(payload, dict):
        raise WireError(f"reply.{'body' if ok else 'error'}: expected a map, got {type(payload).__name__}")
    if not ok:
        _fields(payload, "reply.error", {"type", "message"})
    return message


# ---------------------------------------------------------------------------- helpers
def _check_version_and_id(fields: dict[str, Any]) -> int:
    version = fields["v"]
    if type(version) is not int or version != VERSION:
        raise WireError(f"request.v: this server speaks schema version {VERSION}, got {_brief(version)}")
    request_id = fields["id"]
    if type(request_id) is not int or not 0 <= request_id <= MAX_ID:
        raise WireError(f"request.id: expected an integer in [0, 2^63), got {_brief(request_id)}")
    return request_id


def _fields(value: Any, where: str, expected: set[str]) -> dict[str, Any]:
    """`value` as a map with exactly the `expected` string keys."""
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a map with fields {sorted(expected)}, got {type(value).__name__}")
    keys = set(value)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(map(str, keys - expected))
        raise WireError(f"{where}: expected fields {sorted(expected)}; missing {missing}, unexpected {extra[:5]}")
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not part of the schema")


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
