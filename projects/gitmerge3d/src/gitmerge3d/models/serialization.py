"""Space-filling-curve codes of integer grid coordinates (z-order and Hilbert), Pointcept-compatible.

Pointcept orders points by the code of their grid coordinate; checkpoints were trained on exactly
those orders, so the codes here must match bit for bit:

- z-order interleaves bits with x highest: bit i of x/y/z goes to bit 3i+2 / 3i+1 / 3i.
- Hilbert follows Skilling (2004, "Programming the Hilbert curve") on ``depth`` bits per axis:
  transposed-axes form walked from the top bit, then the interleaved Gray code is decoded.
- ``-trans`` orders swap the x and y columns first; the batch index sits above the 3*depth bits.
"""

from __future__ import annotations

import torch

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")


def _check_coord(grid_coord: torch.Tensor, depth: int) -> torch.Tensor:
    if grid_coord.dim() != 2 or grid_coord.shape[1] != 3:
        raise ValueError(f"grid_coord must have shape (N, 3), got {tuple(grid_coord.shape)}")
    if not 1 <= depth <= 16:
        raise ValueError(f"depth must be in [1, 16], got {depth}")
    return grid_coord.long()


_SPREAD: dict[torch.device, torch.Tensor] = {}


def _spread_table(device: torch.device) -> torch.Tensor:
    """Byte -> its 8 bits moved to every third position (bit i -> bit 3i): the OCNN lookup table."""
    if device not in _SPREAD:
        v = torch.arange(256, dtype=torch.long)
        table = torch.zeros(256, dtype=torch.long)
        for i in range(8):
            table |= ((v >> i) & 1) << (3 * i)
        _SPREAD[device] = table.to(device)
    return _SPREAD[device]


def z_order_encode(grid_coord: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """Morton code with x in the highest bit of every 3-bit group (one table lookup per byte and axis)."""
    g = _check_coord(grid_coord, depth)
    g = g & ((1 << depth) - 1)
    table = _spread_table(g.device)
    code = torch.zeros_like(g[:, 0])
    for block in range((depth + 7) // 8):
        b = (g >> (8 * block)) & 255
        part = (table[b[:, 0]] << 2) | (table[b[:, 1]] << 1) | table[b[:, 2]]
        code |= part << (24 * block)
    return code


def _hilbert_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Skilling's encoder as a finite-state machine over levels (top bit first).

    State = the signed axis permutation Skilling's exchanges and inversions have applied to all lower
    bits so far: transformed bit i = raw bit perm[i] XOR flip[i]. At a level the transformed octant is
    that level's 3-bit digit of the (Gray-coded) transposed index; then, for i = 0, 1, 2, a set bit
    inverts axis 0 and a clear bit exchanges axes 0 and i for the lower levels. Returns (digit, next
    state) indexed by state * 8 + raw octant (x bit << 2 | y bit << 1 | z bit).
    """
    start = ((0, 1, 2), (0, 0, 0))
    index, queue, rows = {start: 0}, [start], {}
    while queue:
        state = queue.pop(0)
        perm, flip = state
        for octant in range(8):
            raw = ((octant >> 2) & 1, (octant >> 1) & 1, octant & 1)
            bits = [raw[perm[i]] ^ flip[i] for i in range(3)]
            p, f = list(perm), list(flip)
            for i in range(3):
                if bits[i]:
                    f[0] ^= 1
                else:
                    p[0], p[i] = p[i], p[0]
                    f[0], f[i] = f[i], f[0]
            nxt = (tuple(p), tuple(f))
            if nxt not in index:
                index[nxt] = len(index)
                queue.append(nxt)
            rows[(index[state], octant)] = ((bits[0] << 2) | (bits[1] << 1) | bits[2], index[nxt])
    digit = torch.zeros(len(index) * 8, dtype=torch.long)
    nxt_state = torch.zeros(len(index) * 8, dtype=torch.long)
    for (st, octant), (d, n) in rows.items():
        digit[st * 8 + octant], nxt_state[st * 8 + octant] = d, n
    return digit, nxt_state


_HILBERT: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
_LEVELS_PER_STEP = 4  # Hilbert levels resolved per table lookup (tables of 8**4 entries per state)


def _hilbert_step_tables(levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_hilbert_tables`` composed over ``levels`` consecutive levels: (digits, next state), each
    (states, 8**levels), indexed by the levels' octants packed top level first (3 bits per level)."""
    digit1, next1 = (t.view(-1, 8) for t in _hilbert_tables())
    digit, nxt = digit1, next1
    for m in range(1, levels):
        # first level by the 1-level table, the remaining m levels by the m-level table of the next state
        digit = ((digit1 << (3 * m))[:, :, None] | digit[next1]).reshape(digit1.shape[0], -1)
        nxt = nxt[next1].reshape(digit1.shape[0], -1)
    return digit, nxt


def hilbert_encode(grid_coord: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """Hilbert index on a (2**depth)^3 cube (Skilling 2004, as a per-level state machine, top bit first).

    Levels are walked ``_LEVELS_PER_STEP`` at a time through composed tables (the top step takes the
    remainder), so a depth-16 code costs 4 lookups instead of 16 (fewer kernel launches on a GPU).
    """
    g = _check_coord(grid_coord, depth)
    device = g.device
    steps, first = -(-depth // _LEVELS_PER_STEP), depth % _LEVELS_PER_STEP or _LEVELS_PER_STEP
    sizes = [first] + [_LEVELS_PER_STEP] * (steps - 1)
    tables = {}
    for m in set(sizes):
        if (device, m) not in _HILBERT:
            _HILBERT[(device, m)] = tuple(t.reshape(-1).to(device) for t in _hilbert_step_tables(m))
        tables[m] = _HILBERT[(device, m)]
    shifts = torch.arange(depth - 1, -1, -1, device=device)
    bits = (g[:, :, None] >> shifts) & 1  # (N, 3, depth), top level first
    octants = (bits[:, 0] << 2) | (bits[:, 1] << 1) | bits[:, 2]
    # packed octants of each step: level l of a step of m levels lands at bits 3*(m-1-j)
    level_shift = torch.tensor([3 * (s - 1 - j) for s in sizes for j in range(s)], device=device)
    packed = (octants << level_shift).split(sizes, dim=1)
    state = None
    gray = None
    for m, part in zip(sizes, packed, strict=True):
        digit_table, next_table = tables[m]
        idx = part.sum(1) if state is None else state * (8**m) + part.sum(1)
        digits = digit_table[idx]
        gray = digits if gray is None else (gray << (3 * m)) | digits
        state = next_table[idx]
    code = gray
    shift = 1
    while shift < 3 * depth:  # Gray -> binary over the interleaved word (prefix XOR from the top)
        code = code ^ (code >> shift)
        shift <<= 1
    return code


def encode(grid_coord: torch.Tensor, batch: torch.Tensor | None = None, depth: int = 16, order: str = "z"):
    """Code of one order; with ``batch`` the sample index is put above the 3*depth coordinate bits."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    coord = grid_coord[:, [1, 0, 2]] if order.endswith("-trans") else grid_coord
    code = z_order_encode(coord, depth) if order.startswith("z") else hilbert_encode(coord, depth)
    if batch is not None:
        code = (batch.long() << (3 * depth)) | code
    return code


def encode_many(grid_coord: torch.Tensor, batch: torch.Tensor | None, depth: int, orders) -> list[torch.Tensor]:
    """``encode`` for several orders, one curve call per curve type (x/y-swapped copies stacked):
    the bit loops are the launch-bound part of serialization on a GPU."""
    for o in orders:
        if o not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {o!r}")
    n = grid_coord.shape[0]
    out = {}
    for curve, fn in (("z", z_order_encode), ("hilbert", hilbert_encode)):
        wanted = [o for o in orders if o.split("-")[0] == curve]
        if not wanted:
            continue
        coords = [grid_coord[:, [1, 0, 2]] if o.endswith("-trans") else grid_coord for o in wanted]
        codes = fn(torch.cat(coords), depth)
        for i, o in enumerate(wanted):
            code = codes[i * n : (i + 1) * n]
            out[o] = code if batch is None else (batch.long() << (3 * depth)) | code
    return [out[o] for o in orders]


def serialization_depth(grid_coord: torch.Tensor) -> int:
    """Pointcept's adaptive depth: bit length of (max grid coordinate + 1)."""
    return int(grid_coord.max().item() + 1).bit_length()


def serialize(grid_coord: torch.Tensor, batch: torch.Tensor, orders, depth: int | None = None):
    """Codes, orders (argsort) and inverse permutations for each order, stacked as (k, N)."""
    if batch.numel():  # one host sync for both values (a GPU forward serializes 5 Points)
        grid_max, batch_max = torch.stack([grid_coord.max().long(), batch.max().long()]).tolist()
        n_samples = batch_max + 1
        if depth is None:
            depth = int(grid_max + 1).bit_length()
    else:
        n_samples = 1
        if depth is None:
            depth = serialization_depth(grid_coord)
    if depth * 3 + n_samples.bit_length() > 63:
        raise ValueError(f"serialization needs depth*3 + batch bits <= 63, got depth={depth}, batch={n_samples}")
    code = torch.stack(encode_many(grid_coord, batch, depth, orders))
    order = torch.argsort(code, dim=1)
    inverse = torch.empty_like(order)
    inverse.scatter_(1, order, torch.arange(code.shape[1], device=code.device).expand_as(order))
    return code, order, inverse, depth
