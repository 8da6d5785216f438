"""The teacher cache of the geometry FT (DISTILL.CACHE_TEACHER): per image, the teacher's best query and its
mask logits (fp16), computed once with the image's fixed prompts and read back on every later visit.

Two homes, same values: `HostTeacherCache` keeps each mask on the CPU (no GPU memory; a hit stacks the masks
in pinned memory and copies them without blocking the host), `DeviceTeacherCache` keeps up to `max_bytes` of
masks in one preallocated device tensor indexed by a key -> row map (a hit is one gather on the device, no
copy at all) and spills the images that do not fit to a host cache. Neither reads a value back to the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync: a pageable copy makes the host wait for the stream (everything the
    step queued before it); a pinned one is queued like a kernel."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class HostTeacherCache:
    """key -> (best query, fp16 mask logits (H, W)) on the CPU."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def has_all(self, keys: Sequence[str]) -> bool:
        return all(k in self._items for k in keys)

    def get(self, keys: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (B,) long, masks (B, H, W) fp16) on `device`, in the order of `keys`."""
        idx = torch.tensor([self._items[k][0] for k in keys], dtype=torch.long)
        masks = torch.stack([self._items[k][1] for k in keys])
        return host_to_device(idx, device), host_to_device(masks, device)

    def put(self, keys: Sequence[str], idx: torch.Tensor, masks: torch.Tensor) -> None:
        """Store a batch (device tensors; one device -> host copy each, which waits for them)."""
        for k, i, m in zip(keys, idx.tolist(), masks.to("cpu", torch.float16), strict=True):
            self._items[k] = (int(i), m)


class DeviceTeacherCache:
    """Up to max_bytes of fp16 masks (H, W) in one device tensor (rows allocated on first use, at most
    `capacity` images); images past the cap go to a HostTeacherCache."""

    def __init__(self, capacity: int, max_bytes: float, mask_hw: tuple[int, int], device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1 images, got {capacity}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        row_bytes = 2 * mask_hw[0] * mask_hw[1] + 8  # fp16 mask + int64 query
        self.rows = min(capacity, int(max_bytes // row_bytes))
        self.device = device
        self.masks = torch.empty(self.rows, *mask_hw, dtype=torch.float16, device=device)
        self.query = torch.zeros(self.rows, dtype=torch.long, device=device)
        self._row: dict[str, int] = {}
        self.spill = HostTeacherCache()

    def __len__(self) -> int:
        return len(self._row) + len(self.spill)

    def __contains__(self, key: str) -> bool:
        return key in self._row or key in self.spill

    def has_all(self, keys: Sequence[str]) -> bool:
        return all(k in self for k in keys)

    def _rows(self, keys: Sequence[str]) -> torch.Tensor:
        return host_to_device(torch.tensor([self._row[k] for k in keys], dtype=torch.long), self.device)

    def get(self, keys: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (B,), masks (B, H, W) fp16) in the order of `keys`: one gather when all rows are on the
        device, else the device rows and the spilled ones merged."""
        if all(k in self._row for k in keys):
            rows = self._rows(keys)
            return self.query[rows].to(device), self.masks[rows].to(device)
        idx = torch.empty(len(keys), dtype=torch.long, device=device)
        masks = torch.empty(len(keys), *self.masks.shape[1:], dtype=torch.float16, device=device)
        on = [i for i, k in enumerate(keys) if k in self._row]
        off = [i for i, k in enumerate(keys) if k not in self._row]
        if on:
            rows, at = self._rows([keys[i] for i in on]), host_to_device(torch.tensor(on), device)
            idx[at], masks[at] = self.query[rows].to(device), self.masks[rows].to(device)
        s_idx, s_masks = self.spill.get([keys[i] for i in off], device)
        at = host_to_device(torch.tensor(off), device)
        idx[at], masks[at] = s_idx, s_masks
        return idx, masks

    def put(self, keys: Sequence[str], idx: torch.Tensor, masks: torch.Tensor) -> None:
        """Store a batch: rows while they last (copied on the device, no host sync), the rest spilled."""
        new = [i for i, k in enumerate(keys) if k not in self._row]
        free = self.rows - len(self._row)
        fit, rest = new[:free], new[free:]
        if fit:
            start = len(self._row)
            for n, i in enumerate(fit):
                self._row[keys[i]] = start + n
            sel = host_to_device(torch.tensor(fit), masks.device) if len(fit) < len(keys) else slice(None)
            self.masks[start : start + len(fit)] = masks[sel].to(self.device, torch.float16)
            self.query[start : start + len(fit)] = idx[sel].to(self.device)
        if rest:
            self.spill.put([keys[i] for i in rest], idx[rest], masks[rest])


TeacherCache = HostTeacherCache | DeviceTeacherCache


def build_teacher_cache(device_gb: float, capacity: int, mask_hw: tuple[int, int], device: torch.device):
    """DISTILL.CACHE_TEACHER_DEVICE_GB: 0 -> HostTeacherCache; > 0 -> DeviceTeacherCache of at most that many
    GB (on the CPU device the 'device' is the host: the same code, for tests)."""
    if device_gb < 0:
        raise ValueError(f"DISTILL.CACHE_TEACHER_DEVICE_GB: expected >= 0, got {device_gb}")
    if device_gb == 0:
        return HostTeacherCache()
    return DeviceTeacherCache(capacity, device_gb * 1e9, mask_hw, device)
