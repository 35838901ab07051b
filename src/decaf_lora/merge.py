"""Merge PEFT LoRA adapters of one base model in product space: ``TSVD_R(sum_j w_j s_j B_j A_j)`` per layer.

Averaging the factors ``A`` and ``B`` of independently trained adapters is wrong (the cross terms ``B_i A_j`` have
no meaning), so a merge has to combine the *products*, which is what each adapter adds to the base weight. The
exact best rank-R fit of that weighted sum comes from the library's factored truncated SVD
(:func:`decaf_lora.lowrank.truncated_svd_of_sum`), which never forms the d x k matrix: merging four rank-16
adapters of a 4096 x 4096 layer costs two thin QRs of 4096 x 64 stacks instead of a dense 4096 x 4096 SVD.

Conventions (each one a choice; the reasons are beside them):

* Scale. Adapter j's factors are folded with their own LoRA scale ``s_j`` (``lora_alpha / r``, or
  ``lora_alpha / sqrt(r)`` with ``use_rslora``, per module through ``rank_pattern`` / ``alpha_pattern``), so
  adapters with different ranks, alphas and rsLoRA settings merge by what they actually add to the model. The
  merged adapter is written with ``r = lora_alpha = R`` and ``use_rslora = False``, i.e. scale exactly 1, and
  stores ``B = U S``, ``A = Vh``: its stored product *is* the merged delta, no input's alpha is privileged, and
  no factor is divided by a scale. This is also what PEFT's ``add_weighted_adapter(combination_type="svd")``
  writes (it sets ``lora_alpha = r``), so the two are directly comparable. (PEFT, though, keeps the first
  adapter's ``use_rslora``, so its merge of an rsLoRA adapter listed first applies ``sqrt(R)`` to its product.)
* Weights default to uniform and are normalised to sum 1: a merge is a weighted *average* of adapters (as
  DeCAF's consensus is), so ``weights=[1, 3]`` and ``[0.25, 0.75]`` mean the same thing and merging an adapter
  with itself returns it. They must be finite and >= 0 with a positive sum. (PEFT uses its weights raw, as a
  task-arithmetic sum; pass normalised weights to it to compare.)
* Rank defaults to the largest rank any input uses in any layer (PEFT's default for its svd merge too). An
  explicit rank must fit every layer (``1 <= R <= min(d, k)``); where a default rank exceeds a small layer's
  ``min(d, k)``, that layer's factors are padded with zeros (the product is exact anyway).
* Compatibility: one ``base_model_name_or_path`` (a config without one, e.g. built in memory, is taken to be of
  the others' base), one ``task_type``, the same adapted layers with the same shapes, the same heads. Variants
  that are not a plain ``W + s B A`` (DoRA, LoRA biases, trained biases, PiSSA-like inits that change the base,
  embedding or convolution LoRA) are refused rather than merged wrongly.
* Heads (``modules_to_save``, e.g. a sequence classifier's ``classifier``) are full-rank parameters, so their
  weighted average with the same normalised weights is exact.

Inputs are adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``; a pickled
``adapter_model.bin`` is never loaded) or in-memory ``(state_dict, config)`` pairs, the state dict keyed as PEFT
saves it (``get_peft_model_state_dict``) and the config a ``peft.LoraConfig`` or the dict of an
``adapter_config.json``. All arithmetic is float64 (one merge, cheap in factored form); results are cast back to
the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import DecafError
from .lowrank import split_factors, truncated_svd_of_sum
from .rundir import dir_mode, file_mode

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
REPORT_NAME = "merge_report.json"
#: What a merge writes: ``overwrite`` replaces a directory holding these and nothing else (a previous merge).
MERGE_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, REPORT_NAME})
MERGED_BY = "decaf_lora.merge_adapters"
#: Show a progress bar (on a terminal) from this many adapted layers on; fewer finish before one would help.
PROGRESS_MIN_LAYERS = 32
#: Layers merged per batched call (bounds memory: 16 x 4096 x 64 float64 stacks are 34 MB).
BATCH_LAYERS = 16
#: ``init_lora_weights`` values whose adapters only make sense with a base model that PEFT modified at init.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
_PEFT_PREFIX = "base_model.model."


class MergeError(DecafError):
    """Adapters that cannot be merged, bad merge arguments, or an output directory that must not be touched."""


@dataclass(frozen=True)
class LayerReport:
    """One adapted layer of a merge: what the rank-R fit threw away, absolutely and relative to the sum."""

    name: str  # module name in the base model, e.g. bert.encoder.layer.0.attention.self.query
    shape: tuple[int, int]  # (d, k): out x in features
    input_ranks: tuple[int, ...]
    rank: int
    norm: float  # ||M||_F of M = sum_j w_j s_j B_j A_j
    tail: float  # ||M - TSVD_R(M)||_F

    @property
    def relative_tail(self) -> float:
        return self.tail / self.norm if self.norm > 0 else 0.0


@dataclass
class MergeResult:
    """The merged adapter (``state_dict`` keyed as PEFT saves it, ``config`` a ``peft.LoraConfig``) and its report."""

    state_dict: dict[str, torch.Tensor]
    config: object
    weights: tuple[float, ...]  # normalised, one per input
    rank: int
    layers: list[LayerReport]
    heads: list[str] = field(default_factory=list)  # head modules averaged, e.g. ['classifier']
    out_dir: str | None = None

    @property
    def tail(self) -> float:
        """``||M - TSVD_R(M)||_F`` over all layers together."""
        return math.sqrt(sum(layer.tail**2 for layer in self.layers))

    @property
    def relative_tail(self) -> float:
        norm = math.sqrt(sum(layer.norm**2 for layer in self.layers))
        return self.tail / norm if norm > 0 else 0.0


@dataclass
class _Adapter:
    label: str
    config: object  # peft.LoraConfig
    keys: dict[str, tuple[str, str]]  # module name -> (A key, B key)
    tensors: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    scales: dict[str, float]


def merge_adapters(
    adapters: Sequence,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> MergeResult:
    """Merge LoRA adapters of one base model into one adapter: per layer the best rank-``rank`` fit of
    ``sum_j w_j s_j B_j A_j``, heads averaged with the same weights.

    Args:
        adapters: adapter directories, or ``(state_dict, config)`` pairs (see the module docstring); at least one.
        weights: one finite weight >= 0 per adapter, positive sum; normalised to sum 1. Default: uniform.
        rank: rank of the merged adapter, ``1 <= rank <= min(d, k)`` of every layer. Default: the largest rank
            of any input layer.
        out_dir: if given, write a PEFT adapter directory there atomically (temporary directory + rename). It must
            not exist or be empty; with ``overwrite=True`` it may also be the output of a previous merge.
        progress: a tqdm bar over layers; ``None`` shows it on a terminal from ``PROGRESS_MIN_LAYERS`` layers on.

    Returns:
        A :class:`MergeResult` with the merged tensors, the ``LoraConfig`` (scale 1: ``r = lora_alpha = rank``),
        the normalised weights, and per layer the discarded tail ``||M - TSVD_R(M)||_F``.

    Raises:
        MergeError: one sentence naming the argument, the value and the fix.
    """
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or not adapters:
        raise MergeError(
            f"adapters={adapters!r} must be a non-empty list of adapter directories or (state_dict, config) pairs."
        )
    if out_dir is not None:
        _check_out_dir(os.fspath(out_dir), overwrite, adapters)
    loaded = [_load(item, i) for i, item in enumerate(adapters)]
    _check_compatible(loaded)
    w = _normalised_weights(weights, len(loaded))
    names = list(loaded[0].keys)
    ref = loaded[0]
    shapes = {n: (ref.tensors[ref.keys[n][1]].shape[0], ref.tensors[ref.keys[n][0]].shape[1]) for n in names}
    R = _resolve_rank(rank, loaded, shapes)

    # Layers of one shape and one total input rank are merged in one batched call: per-call overhead, not flops,
    # dominates small layers (a MiniLM layer is ~1 ms alone); chunks keep memory bounded and the progress bar live.
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in names:
        q = sum(ad.tensors[ad.keys[name][0]].shape[0] for ad in loaded)
        groups.setdefault((*shapes[name], q), []).append(name)
    from tqdm.auto import tqdm

    show = progress if progress is not None else (None if len(names) >= PROGRESS_MIN_LAYERS else False)
    fits = {}
    with tqdm(total=len(names), desc="merging layers", unit="layer", disable=None if show is None else not show) as bar:
        for (d, k, _), members in groups.items():
            for start in range(0, len(members), BATCH_LAYERS):
                chunk = members[start : start + BATCH_LAYERS]
                B, A = _stacked_factors(chunk, loaded, w)
                keep = min(R, d, k)
                t = truncated_svd_of_sum(B, A, torch.ones(1, dtype=torch.float64), keep)
                Bm, Am = split_factors(t.U, t.S, t.Vh, "all-into-b")  # B = U S, A = Vh: scale 1 in the config
                if keep < R:  # only for a default rank above this layer's min(d, k): zero directions, same product
                    Bm, Am = F.pad(Bm, (0, R - keep)), F.pad(Am, (0, 0, 0, R - keep))
                for i, name in enumerate(chunk):
                    fits[name] = (Bm[i], Am[i], float(t.S[i].pow(2).sum()), float(t.tail[i]))
                bar.update(len(chunk))
    out: dict[str, torch.Tensor] = {}
    reports = []
    for name in names:  # the first adapter's layer order
        Bm, Am, kept, tail = fits[name]
        a_key, b_key = ref.keys[name]
        dtype = _common_dtype([ad.tensors[key] for ad in loaded for key in ad.keys[name]])
        # own storage per tensor, not views into the batched result (which would keep the whole batch alive)
        out[a_key], out[b_key] = Am.to(dtype, copy=True).contiguous(), Bm.to(dtype, copy=True).contiguous()
        ranks = tuple(ad.tensors[ad.keys[name][0]].shape[0] for ad in loaded)
        reports.append(LayerReport(name, shapes[name], ranks, R, math.sqrt(kept + tail**2), tail))
    for key in ref.heads:
        out[key] = _average_head(key, [ad.heads[key] for ad in loaded], w)

    config = _merged_config(loaded, R)
    heads = sorted({_module_name(key).rsplit(".", 1)[0] for key in ref.heads})
    result = MergeResult(out, config, tuple(w), R, reports, heads=heads)
    if out_dir is not None:
        result.out_dir = _write_adapter_dir(os.fspath(out_dir), result, [ad.label for ad in loaded], overwrite)
    return result


def parse_weights(text: str) -> list[float]:
    """``"1,2,1"`` (the CLI's ``--weights``) as numbers; range checks happen in :func:`merge_adapters`."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise MergeError(
            f"weights={text!r} is not a comma-separated list of numbers; write e.g. --weights 0.5,0.25,0.25."
        ) from None


def format_report(result: MergeResult) -> str:
    """The merge as a table: per layer the shape, input ranks, ``||M||_F`` and the discarded tail."""
    rows = [(r.name, f"{r.shape[0]} x {r.shape[1]}", ",".join(map(str, r.input_ranks)), r) for r in result.layers]
    width = max([len("layer")] + [len(r[0]) for r in rows])
    shape_w = max([len("d x k")] + [len(r[1]) for r in rows])
    ranks_w = max([len("ranks in")] + [len(r[2]) for r in rows])
    weights = ", ".join(f"{x:.4g}" for x in result.weights)
    lines = [
        f"merged {len(result.weights)} adapters (weights {weights}) into rank {result.rank}: {len(rows)} layers"
        + (f", heads averaged: {', '.join(result.heads)}" if result.heads else ""),
        f"{'layer':<{width}}  {'d x k':>{shape_w}}  {'ranks in':>{ranks_w}}  {'||M||_F':>10}  {'tail':>10}  tail/||M||",
    ]
    for name, shape, ranks, r in rows:
        lines.append(
            f"{name:<{width}}  {shape:>{shape_w}}  {ranks:>{ranks_w}}  {r.norm:10.4g}  {r.tail:10.4g}  "
            f"{r.relative_tail:10.3%}"
        )
    norm = math.sqrt(sum(r.norm**2 for r in result.layers))
    pad = " " * (shape_w + ranks_w + 4)
    lines.append(f"{'all layers':<{width}}  {pad}  {norm:10.4g}  {result.tail:10.4g}  {result.relative_tail:10.3%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- inputs


def _load(item, index: int) -> _Adapter:
    if isinstance(item, (str, os.PathLike)):
        label = os.fspath(item)
        state, raw = _read_dir(label)
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
        label, (state, raw) = f"adapters[{index}]", item
    else:
        raise MergeError(
            f"adapters[{index}] is a {type(item).__name__}; pass an adapter directory or a (state_dict, config) pair."
        )
    config = _lora_config(raw, label)
    return _parse_state(state, config, label)


def _read_dir(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The config and tensors of an adapter directory; safetensors only, so a file from elsewhere is just numbers."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise MergeError(
            f"adapter directory {path!r} does not exist; pass a directory written by PEFT's save_pretrained or "
            "`decaf export`."
        )
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        if os.path.isfile(os.path.join(path, PICKLE_NAME)):
            raise MergeError(
                f"adapter directory {path!r} holds only {PICKLE_NAME}, a pickle that decaf-lora never loads; re-save "
                f"it with PEFT's save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}."
            )
        raise MergeError(f"adapter directory {path!r} has no {WEIGHTS_NAME}; pass a PEFT adapter directory.")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise MergeError(f"adapter directory {path!r} has no {CONFIG_NAME}; pass a PEFT adapter directory.")
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise MergeError(
            f"{os.path.join(path, CONFIG_NAME)!r} is not readable JSON ({_brief(exc)}); re-save the adapter."
        ) from None
    try:
        state = load_file(os.path.join(path, WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise MergeError(
            f"{os.path.join(path, WEIGHTS_NAME)!r} is not a readable safetensors file ({_brief(exc)}); re-save it."
        ) from None
    return state, raw


def _brief(exc: BaseException) -> str:
    """A library's error message squeezed into our one sentence: one line, no final full stop."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def _lora_config(raw, label: str):
    """A ``peft.LoraConfig`` from a config object or an adapter_config.json dict; PEFT validates its own fields."""
    import peft

    if isinstance(raw, peft.LoraConfig):
        config = raw
    elif isinstance(raw, Mapping):
        kind = str(raw.get("peft_type", "LORA"))
        if kind.rsplit(".", 1)[-1] != "LORA":
            raise MergeError(f"adapter {label!r} has peft_type={kind!r}; merge_adapters merges LORA adapters only.")
        try:
            config = peft.LoraConfig.from_peft_type(**{**raw, "peft_type": "LORA"})
        except (TypeError, ValueError) as exc:
            raise MergeError(f"adapter {label!r} has a config PEFT rejects ({_brief(exc)}); fix its fields.") from None
    else:
        raise MergeError(
            f"adapter {label!r} has a config of type {type(raw).__name__}; pass a peft.LoraConfig or dict."
        )
    problem = _scaling_problem(config)
    if problem:
        raise MergeError(f"adapter {label!r} has {problem}; fix its config.")
    unsupported = {
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "bias": config.bias != "none" and config.bias,
        "trainable_token_indices": config.trainable_token_indices,
        "target_parameters": config.target_parameters,
        "layer_replication": config.layer_replication,
    }
    for f in dataclasses.fields(config):  # LoRA variants (DoRA, aLoRA, ...) change the layer's function
        if f.metadata.get("is_lora_variant"):
            unsupported[f.name] = getattr(config, f.name)
    if any(str(config.init_lora_weights).lower().startswith(p) for p in _BASE_CHANGING_INITS):
        unsupported["init_lora_weights"] = config.init_lora_weights
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        key, value = next(iter(bad.items()))
        raise MergeError(
            f"adapter {label!r} sets {key}={value!r}, which a product-space merge of plain LoRA cannot honour; "
            "merge plain LoRA adapters only."
        )
    return config


def _scaling_problem(config) -> str | None:
    """What in the rank and alpha fields cannot give a scale: PEFT takes any JSON there, the merge needs numbers."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(config.r, int) and not isinstance(config.r, bool) and config.r >= 1):
        return f"r={config.r!r} (it must be an integer >= 1)"
    if not number(config.lora_alpha):
        return f"lora_alpha={config.lora_alpha!r} (it must be a finite number)"
    for field_name, ints in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = getattr(config, field_name) or {}
        if not isinstance(pattern, Mapping):
            return f"{field_name} of type {type(pattern).__name__} (it must map module names to numbers)"
        for key, v in pattern.items():
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1 if ints else number(v)
            if not isinstance(key, str) or not ok:
                return f"{field_name}[{key!r}]={v!r} (it must be {'an integer >= 1' if ints else 'a finite number'})"
    return None


def _parse_state(state: Mapping, config, label: str) -> _Adapter:
    """Split a PEFT state dict into per-module (A, B) keys and head tensors; each module's scale from the config."""
    from peft.utils.other import get_pattern_key

    keys, heads, tensors = {}, {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise MergeError(f"adapter {label!r} maps {key!r} to a {type(value).__name__}; state dicts hold tensors.")
        tensors[key] = value
        if key.endswith(_A_SUFFIX):
            keys.setdefault(key[: -len(_A_SUFFIX)], [None, None])[0] = key
        elif key.endswith(_B_SUFFIX):
            keys.setdefault(key[: -len(_B_SUFFIX)], [None, None])[1] = key
        elif "lora_" in key:
            raise MergeError(
                f"adapter {label!r} holds {key!r}, which is not a linear layer's lora_A/lora_B; merge_adapters merges "
                "LoRA on linear layers only."
            )
        else:
            heads[key] = value
    if not keys:
        raise MergeError(f"adapter {label!r} holds no lora_A/lora_B weights; pass a LoRA adapter.")
    modules, scales = {}, {}
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    for prefixed, (a_key, b_key) in keys.items():
        name = _module_name(prefixed)
        if a_key is None or b_key is None:
            raise MergeError(f"adapter {label!r} has lora_A or lora_B of {name!r} but not both; re-save the adapter.")
        A, B = tensors[a_key], tensors[b_key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or not A.is_floating_point():
            raise MergeError(
                f"adapter {label!r} layer {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; a linear "
                "LoRA layer needs float lora_A (r, k) and lora_B (d, r)."
            )
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise MergeError(
                f"adapter {label!r} layer {name!r} holds NaN or infinite values in lora_A or lora_B; its training "
                "diverged: merge a healthy adapter."
            )
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.lora_alpha)
        if A.shape[0] != r:
            raise MergeError(
                f"adapter {label!r} layer {name!r} has rank {A.shape[0]} in its tensors but r={r} in its config; "
                "re-save the adapter with PEFT."
            )
        modules[name] = (a_key, b_key)
        scales[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return _Adapter(label, config, modules, tensors, heads, scales)


def _stacked_factors(chunk: list[str], adapters: list[_Adapter], w: list[float]):
    """Per layer one factor pair ``[c_1 B_1 ... c_m B_m]`` (d x sum r_j), ``[A_1; ...; A_m]``, ``c_j = w_j s_j``.

    Stacked along the rank with unit weight, the pair's product is the weighted sum of scaled products, and ranks
    may differ between adapters. Returned as (layers, 1, d, q) and (layers, 1, q, k) in float64.
    """
    B = [
        torch.cat([ad.tensors[ad.keys[n][1]].double() * (wj * ad.scales[n]) for wj, ad in zip(w, adapters)], 1)
        for n in chunk
    ]
    A = [torch.cat([ad.tensors[ad.keys[n][0]].double() for ad in adapters], 0) for n in chunk]
    return torch.stack(B)[:, None], torch.stack(A)[:, None]


def _module_name(key: str) -> str:
    """The name PEFT matches ``rank_pattern`` / ``alpha_pattern`` against: the module's name in the base model."""
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _check_compatible(adapters: list[_Adapter]) -> None:
    """Adapters of one base model, one task, the same layers and heads with the same shapes, or one sentence."""
    ref = adapters[0]
    base = next((ad.config.base_model_name_or_path for ad in adapters if ad.config.base_model_name_or_path), None)
    for ad in adapters[1:]:
        other_base = ad.config.base_model_name_or_path
        if base and other_base and not _same_base(base, other_base):
            raise MergeError(
                f"adapter {ad.label!r} was trained on base_model_name_or_path={other_base!r} but adapter "
                f"{ref.label!r} on {base!r}; merge adapters of one base model."
            )
        if _task(ad) != _task(ref):
            raise MergeError(
                f"adapter {ad.label!r} has task_type={_task(ad)!r} but adapter {ref.label!r} has {_task(ref)!r}; "
                "merge adapters of one task type."
            )
        if set(ad.keys) != set(ref.keys):
            extra, missing = sorted(set(ad.keys) - set(ref.keys)), sorted(set(ref.keys) - set(ad.keys))
            example = f"it adapts {extra[0]!r}, which" if extra else f"it lacks {missing[0]!r}, which"
            raise MergeError(
                f"adapter {ad.label!r} adapts other layers than adapter {ref.label!r} ({example} the other does not; "
                f"target_modules={_targets(ad)} vs {_targets(ref)}); merge adapters with the same target modules."
            )
        if set(ad.heads) != set(ref.heads):
            raise MergeError(
                f"adapter {ad.label!r} trains heads {sorted(ad.heads)} but adapter {ref.label!r} trains "
                f"{sorted(ref.heads)}; merge adapters with the same modules_to_save."
            )
        if ad.config.fan_in_fan_out != ref.config.fan_in_fan_out:
            raise MergeError(
                f"adapter {ad.label!r} has fan_in_fan_out={ad.config.fan_in_fan_out} but adapter {ref.label!r} has "
                f"{ref.config.fan_in_fan_out}; merge adapters of one base model."
            )
        for name, (a_key, b_key) in ref.keys.items():
            d, k = ref.tensors[b_key].shape[0], ref.tensors[a_key].shape[1]
            od, ok = ad.tensors[ad.keys[name][1]].shape[0], ad.tensors[ad.keys[name][0]].shape[1]
            if (d, k) != (od, ok):
                raise MergeError(
                    f"layer {name!r} is {od} x {ok} in adapter {ad.label!r} but {d} x {k} in adapter {ref.label!r}; "
                    "merge adapters of one base model."
                )
        for key, head in ref.heads.items():
            if ad.heads[key].shape != head.shape:
                raise MergeError(
                    f"head {key!r} has shape {tuple(ad.heads[key].shape)} in adapter {ad.label!r} but "
                    f"{tuple(head.shape)} in adapter {ref.label!r}; merge adapters of one base model and task."
                )


def _same_base(a: str, b: str) -> bool:
    """Equal names, or two spellings of one local directory."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _task(ad: _Adapter):
    t = ad.config.task_type
    return None if t is None else str(getattr(t, "value", t))


def _targets(ad: _Adapter):
    t = ad.config.target_modules
    return sorted(t) if isinstance(t, (set, list, tuple)) else t


def _normalised_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise MergeError(f"weights={weights!r} is not a list of numbers; give one weight per adapter, e.g. [0.5, 0.5].")
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise MergeError(f"weights={list(weights)!r} is not a list of numbers; give one weight per adapter.") from None
    if len(w) != n:
        raise MergeError(f"weights has {len(w)} values but {n} adapters were given; give one weight per adapter.")
    if not all(math.isfinite(x) for x in w):
        raise MergeError(f"weights={w} contains a non-finite value; use finite weights >= 0.")
    if any(x < 0 for x in w):
        raise MergeError(f"weights={w} has a negative value; use weights >= 0 (a merge is a weighted average).")
    try:
        total = math.fsum(w)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):  # each weight is finite, their sum is not
        raise MergeError(f"weights={w} sum beyond the largest float; scale them down (only their ratios matter).")
    if total <= 0:
        raise MergeError(f"weights={w} sum to 0; give at least one positive weight.")
    return [x / total for x in w]


def _resolve_rank(rank, adapters: list[_Adapter], shapes: dict[str, tuple[int, int]]) -> int:
    if rank is None:
        return max(ad.tensors[a_key].shape[0] for ad in adapters for a_key, _ in ad.keys.values())
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"rank={rank!r} is invalid; use an integer >= 1.")
    name, (d, k) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(d, k):
        raise MergeError(
            f"rank={rank} exceeds min(d, k)={min(d, k)} of layer {name!r} ({d} x {k}); use a rank <= {min(d, k)}."
        )
    return rank


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _average_head(key: str, heads: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """Weighted mean of a full-rank head parameter (exact); integer buffers must agree and are kept."""
    if not heads[0].is_floating_point():
        if any(not torch.equal(h, heads[0]) for h in heads[1:]):
            raise MergeError(f"head {key!r} is an integer tensor that differs between adapters; it cannot be averaged.")
        return heads[0].clone()
    total = sum(wj * h.to(torch.float64) for wj, h in zip(w, heads))
    return total.to(_common_dtype(heads)).contiguous()


def _merged_config(adapters: list[_Adapter], rank: int):
    """The first adapter's config with scale 1 (``r = lora_alpha = rank``, no rsLoRA, no per-module patterns)."""
    ref = adapters[0].config
    base = next((ad.config.base_model_name_or_path for ad in adapters if ad.config.base_model_name_or_path), None)
    return dataclasses.replace(
        ref,
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=base,
    )


# ---------------------------------------------------------------------------------------------- output


def _check_out_dir(out_dir: str, overwrite: bool, inputs: Sequence) -> None:
    """Refuse, before any work, to write where something not ours would be lost."""
    if os.path.islink(out_dir):  # it is renamed into place: a link would be replaced, not its target filled
        raise MergeError(f"out_dir={out_dir!r} is a symbolic link; pass the directory itself, new or empty.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MergeError(f"out_dir={out_dir!r} is a file; pass a new or empty directory.")
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item) and os.path.isdir(out_dir):
            if os.path.samefile(item, out_dir):
                raise MergeError(f"out_dir={out_dir!r} is one of the input adapters; write the merge somewhere else.")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise MergeError(
            f"out_dir={out_dir!r} exists and is not empty; pass a new or empty directory, or overwrite=True "
            "(--overwrite) to replace a previous merge."
        )
    if not _is_previous_merge(out_dir):
        raise MergeError(
            f"out_dir={out_dir!r} is not the output of a previous merge (it must hold {REPORT_NAME} and only the files "
            "a merge writes), so overwrite will not replace it; pass a new or empty directory."
        )


def _is_previous_merge(path: str) -> bool:
    """Only a directory this function wrote may be replaced: its report says so, and nothing else was added."""
    entries = set(os.listdir(path))
    if REPORT_NAME not in entries or not entries <= MERGE_FILES:
        return False
    if any(os.path.islink(os.path.join(path, e)) or not os.path.isfile(os.path.join(path, e)) for e in entries):
        return False
    try:
        with open(os.path.join(path, REPORT_NAME), encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("merged_by") == MERGED_BY


def _write_adapter_dir(out_dir: str, result: MergeResult, labels: list[str], overwrite: bool) -> str:
    """Write config, tensors and report into a temporary sibling directory, then rename it into place.

    A crash leaves either nothing or a complete adapter; a previous merge (``overwrite``) is moved aside first and
    removed only once the new one is in place (a crash between the two renames leaves it in a hidden
    ``.merge-old-*`` sibling, never lost).
    """
    from safetensors.torch import save_file

    _check_out_dir(out_dir, overwrite, labels)  # again: the directory may have changed during the merge
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".merge-")
    old = None
    try:
        result.config.save_pretrained(tmp)
        tensors = {k: v.detach().cpu().contiguous() for k, v in result.state_dict.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        report = {
            "merged_by": MERGED_BY,
            "inputs": labels,
            "weights": list(result.weights),
            "rank": result.rank,
            "scale": "r = lora_alpha = rank, so PEFT applies scale 1 to the stored B A",
            "heads": result.heads,
            "layers": [
                {**dataclasses.asdict(r), "relative_tail": r.relative_tail, "shape": list(r.shape)}
                for r in result.layers
            ],
        }
        with open(os.path.join(tmp, REPORT_NAME), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        for name in os.listdir(tmp):  # ordinary permissions (mkdtemp's directory is owner-only)
            os.chmod(os.path.join(tmp, name), file_mode())
        os.chmod(tmp, dir_mode())
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # a previous adapter, checked above: move it aside
            old = tempfile.mkdtemp(dir=parent, prefix=".merge-old-")
            os.replace(out_dir, old)
            if not _is_previous_merge(old):  # something was added between the check and the move: put it back
                os.replace(old, out_dir)
                old = None
                raise MergeError(
                    f"out_dir={out_dir!r} changed during the merge and is no longer only a previous merge; pass a new "
                    "or empty directory (nothing there was deleted or overwritten)."
                )
        os.replace(tmp, out_dir)  # onto a missing or empty directory: atomic
    except BaseException:
        if old is not None and not os.path.exists(out_dir):
            os.replace(old, out_dir)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:  # the previous merge's own files only; anything else keeps the folder (rmdir refuses)
            for name in MERGE_FILES & set(os.listdir(old)):
                path = os.path.join(old, name)
                if os.path.isfile(path) and not os.path.islink(path):  # a directory by that name is not ours
                    os.unlink(path)
            try:
                os.rmdir(old)
            except OSError:
                warnings.warn(f"left {old!r} in place: it holds files the previous merge did not write.", stacklevel=2)
    return out_dir
