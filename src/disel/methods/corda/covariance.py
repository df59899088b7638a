"""Input covariances of the targeted linear layers, collected in batches and cached on disk as safetensors.

PEFT's own CorDA hook squeezes the batch dimension and so needs one sequence per forward; here the
covariance is collected with our own hooks that flatten any batch and drop padded positions (using the
batch's ``attention_mask``), so users can hand over ordinary padded batches. The cache is keyed by a hash of
every model parameter, the calibration tensors, the target layers and the number of calibration subsets,
and is written with safetensors only (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import UserError

CACHE_VERSION = "disel-corda-cov-v1"


@dataclass
class CovarianceSet:
    """Per layer, one mean covariance ``E[x xᵀ]`` per calibration subset, plus the token count of each subset."""

    covs: dict[str, list[torch.Tensor]]  # layer name -> [C_0, ..., C_{K-1}] (float32, d_in x d_in)
    tokens: list[int]  # tokens seen by subset k (the same for every layer)
    key: str = ""
    from_cache: bool = False

    @property
    def num_subsets(self) -> int:
        return len(self.tokens)

    def pooled(self, name: str) -> torch.Tensor:
        """Token-weighted mean over subsets: the covariance of all calibration data together."""
        total = float(sum(self.tokens))
        out = torch.zeros_like(self.covs[name][0], dtype=torch.float64)
        for c, n in zip(self.covs[name], self.tokens, strict=True):
            out += c.double() * (n / total)
        return out.float()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values): any weight change misses the cache."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_fingerprint(batches: Sequence[Mapping[str, Any]]) -> str:
    """Hash of the model inputs of every batch (labels do not affect activations and are left out)."""
    h = hashlib.blake2b(digest_size=20)
    for i, b in enumerate(batches):
        h.update(f"batch{i}\n".encode())
        for k in sorted(b):
            if k == "labels":
                continue
            v = b[k]
            if isinstance(v, torch.Tensor):
                h.update(f"{k}|{tuple(v.shape)}|{v.dtype}\n".encode())
                h.update(_tensor_bytes(v))
            else:
                h.update(f"{k}|{v!r}\n".encode())
    return h.hexdigest()


def cache_key(model_fp: str, data_fp: str, targets: Sequence[str], num_subsets: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, model_fp, data_fp, sorted(targets), num_subsets]).encode())
    return h.hexdigest()[:32]


def materialize(calibration: Any, field: str = "calibration") -> list[dict[str, Any]]:
    """Call the zero-argument batch factory ``field`` and keep its batches (needed twice: hash, then forward)."""
    if calibration is None:
        raise UserError(
            f"CorDA needs calibration data: pass {field}=<zero-argument callable returning batches of "
            "input_ids/attention_mask> in MethodOptions."
        )
    if not callable(calibration):
        raise UserError(
            f"{field}={type(calibration).__name__} is not callable: pass a zero-argument function that "
            "returns an iterable of model-ready batch dicts."
        )
    batches = [dict(b) for b in calibration()]
    if not batches:
        raise UserError(f"The {field} callable returned no batches: give CorDA at least one batch of text.")
    for b in batches:
        if "input_ids" not in b and "inputs_embeds" not in b and "x" not in b:
            raise UserError(
                f"A {field} batch has keys {sorted(b)}: each batch must be a dict with 'input_ids' "
                "(and optionally 'attention_mask')."
            )
    return batches


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, Any]],
    num_subsets: int = 1,
    progress: bool = True,
) -> CovarianceSet:
    """Run the model on ``batches`` and accumulate ``Σ x xᵀ`` per target layer over non-padded tokens.

    Batch ``i`` goes to subset ``i % num_subsets`` (round robin), so subsets are disjoint and similar in size.
    """
    if num_subsets < 1 or num_subsets > len(batches):
        raise UserError(
            f"num_candidates={num_subsets} does not fit {len(batches)} calibration batches: use between 1 "
            "and the number of batches."
        )
    dev = _device_of(model)
    sums: dict[str, list[torch.Tensor | None]] = {n: [None] * num_subsets for n in targets}
    tokens = [0] * num_subsets
    state: dict[str, Any] = {"mask": None, "subset": 0}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask]
            x = x.float()
            if not torch.isfinite(x).all():
                raise UserError(
                    f"Layer {name} saw non-finite activations during CorDA calibration: check the model "
                    "weights and the calibration batches."
                )
            xtx = (x.T @ x).double()
            k = state["subset"]
            acc = sums[name][k]
            sums[name][k] = xtx if acc is None else acc + xtx

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for i, b in enumerate(tqdm(batches, desc="CorDA covariance", disable=not progress, leave=False)):
            inputs = {
                k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items() if k != "labels"
            }
            am = inputs.get("attention_mask")
            mask = am.reshape(-1).bool() if isinstance(am, torch.Tensor) else None
            state["mask"], state["subset"] = mask, i % num_subsets
            ref = inputs.get("input_ids", next(iter(inputs.values())))
            n_tok = (
                int(mask.sum())
                if mask is not None
                else int(ref.shape[0] * (ref.shape[1] if ref.dim() > 1 else 1))
            )
            tokens[i % num_subsets] += n_tok
            if "x" in inputs and len(inputs) == 1:  # plain nn.Module taking one tensor
                model(inputs["x"])
            else:
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    covs: dict[str, list[torch.Tensor]] = {}
    for name, lst in sums.items():
        if any(s is None for s in lst):
            raise UserError(
                f"Target layer {name} was never called on the calibration data: target only layers the "
                "forward pass uses."
            )
        covs[name] = [(s / max(n, 1)).float().cpu() for s, n in zip(lst, tokens, strict=True)]
    d_max = max(c[0].shape[0] for c in covs.values())
    if min(tokens) < d_max:
        warnings.warn(
            f"CorDA calibration has only {min(tokens)} tokens per subset for input dimensions up to {d_max}: "
            "the covariances are singular and rely on damping; give more calibration text.",
            stacklevel=2,
        )
    return CovarianceSet(covs=covs, tokens=tokens)


def save_covariances(path: str | os.PathLike[str], cs: CovarianceSet) -> Path:
    """Write ``cs`` with safetensors (atomically), metadata in the header."""
    from safetensors.torch import save as st_save

    from ...utils.io import atomic_write_bytes

    tensors = {f"{name}@{k}": c.contiguous() for name, lst in cs.covs.items() for k, c in enumerate(lst)}
    meta = {"version": CACHE_VERSION, "key": cs.key, "tokens": json.dumps(cs.tokens)}
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_covariances(path: str | os.PathLike[str], key: str, targets: Iterable[str]) -> CovarianceSet | None:
    """Read a cache file written by :func:`save_covariances`; ``None`` if it is missing or does not match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
                return None
            tokens = [int(t) for t in json.loads(meta["tokens"])]
            covs = {n: [f.get_tensor(f"{n}@{k}") for k in range(len(tokens))] for n in targets}
    except Exception:  # a damaged or foreign file: recompute and overwrite
        return None
    return CovarianceSet(covs=covs, tokens=tokens, key=key, from_cache=True)


def get_covariances(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, Any]],
    num_subsets: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> CovarianceSet:
    """Covariances from the cache in ``cache_dir`` if a matching file exists, else collected (and cached)."""
    key = cache_key(model_fingerprint(model), data_fingerprint(batches), list(targets), num_subsets)
    path = Path(cache_dir) / f"corda-cov-{key}.safetensors" if cache_dir is not None else None
    if path is not None:
        hit = load_covariances(path, key, targets)
        if hit is not None:
            return hit
    cs = collect_covariances(model, targets, batches, num_subsets=num_subsets, progress=progress)
    cs.key = key
    if path is not None:
        save_covariances(path, cs)
    return cs
