"""Product-space merging of PEFT LoRA adapters (decaf_lora.merge_adapters and `decaf merge`).

The adapters are made with PEFT itself on a 2-layer, 16-wide random BERT sequence classifier and saved with PEFT's
own ``save_pretrained``. They differ in rank, lora_alpha, rsLoRA and per-module ``rank_pattern`` / ``alpha_pattern``,
so every scale convention is exercised. PEFT initialises B to zero; B is drawn at random here so that every merge
is non-trivial, and the classifier head is perturbed per adapter so that head averaging is visible.

References are formed independently of the library: the dense float64 weighted sum of scaled products per layer,
cut to rank R by ``torch.linalg.svd``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import decaf_lora
from decaf_lora.errors import DecafError
from decaf_lora.merge import format_report
from decaf_lora.rundir import current_umask

TARGETS = ["query", "key", "value", "dense"]
PREFIX = "base_model.model."
# (name, LoraConfig fields): ranks 4 / 2 / 6 (3 on one module), alphas 8 / 16 / 6 (2 on value), one rsLoRA.
SPECS = [
    ("plain", dict(r=4, lora_alpha=8)),
    ("rslora", dict(r=2, lora_alpha=16, use_rslora=True)),
    ("patterns", dict(r=6, lora_alpha=6, rank_pattern={"layer.1.attention.self.query": 3}, alpha_pattern={"value": 2})),
]
WEIGHTS = [1.0, 2.0, 1.0]


def _quiet_load(path, **kw):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(path, **kw)


def make_adapter(base_dir: str, out: str, seed: int, heads: bool = True, targets=TARGETS, **lora) -> str:
    """A PEFT LoRA adapter with random non-zero B (and a perturbed head), saved by PEFT's save_pretrained."""
    import peft

    model = _quiet_load(base_dir)
    config = peft.LoraConfig(target_modules=targets, task_type="SEQ_CLS" if heads else None, **lora)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def seq_base(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with a 3-class head, saved once so every load has the same (random) classifier."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("seq-base"))
    _quiet_load(tiny_bert_dir, num_labels=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(seq_base, tmp_path_factory):
    """Three sequence-classification adapters (LoRA + trained classifier) of different ranks, alphas and rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(seq_base, str(root / name), i + 1, **kw) for i, (name, kw) in enumerate(SPECS)]


@pytest.fixture(scope="module")
def lora_only(seq_base, tmp_path_factory):
    """The same kinds of adapters without heads: PEFT's add_weighted_adapter refuses several modules_to_save."""
    root = tmp_path_factory.mktemp("lora-only")
    return [make_adapter(seq_base, str(root / name), 10 + i, heads=False, **kw) for i, (name, kw) in enumerate(SPECS)]


def read(path: str) -> tuple[dict, dict]:
    with open(os.path.join(path, "adapter_config.json")) as fh:
        return load_file(os.path.join(path, "adapter_model.safetensors")), json.load(fh)


def scale_of(config: dict, module: str, r: int) -> float:
    """PEFT's rule, written out: alpha from alpha_pattern (key matching a dotted suffix), alpha/r or alpha/sqrt(r)."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def reference(paths: list[str], weights: list[float], rank: int):
    """Per layer the float64 best rank-R fit of the formed sum and its tail; heads averaged; weights normalised."""
    w = [x / sum(weights) for x in weights]
    loaded = [read(p) for p in paths]
    modules = sorted(k[: -len(".lora_A.weight")] for k in loaded[0][0] if k.endswith(".lora_A.weight"))
    fits, tails = {}, {}
    for key in modules:
        name = key[len(PREFIX) :]
        M = sum(
            wj
            * scale_of(cfg, name, sd[f"{key}.lora_A.weight"].shape[0])
            * (sd[f"{key}.lora_B.weight"].double() @ sd[f"{key}.lora_A.weight"].double())
            for wj, (sd, cfg) in zip(w, loaded)
        )
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        fits[name] = U[:, :rank] * S[:rank] @ Vh[:rank]
        tails[name] = float(S[rank:].norm())
    heads = {k: sum(wj * sd[k].double() for wj, (sd, _) in zip(w, loaded)) for k in loaded[0][0] if "lora_" not in k}
    return fits, tails, heads


def merged_products(path: str) -> dict[str, torch.Tensor]:
    """``scale * B A`` per layer of a written adapter, the scale read from its own config."""
    sd, cfg = read(path)
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            base = key[: -len(".lora_A.weight")]
            A, B = sd[key].double(), sd[f"{base}.lora_B.weight"].double()
            out[base[len(PREFIX) :]] = scale_of(cfg, base[len(PREFIX) :], A.shape[0]) * (B @ A)
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and ". " not in msg


# ------------------------------------------------------------------------------------------------- correctness


def test_peft_loads_the_merge_and_its_logits_match_a_float64_hand_merge(seq_base, tiny_bert_dir, adapters, tmp_path):
    """(a) PeftModel.from_pretrained on the merged directory gives the logits of the base with the float64 rank-R
    fits added to its weights by hand and the weighted mean head."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    rank = 5
    out = str(tmp_path / "merged")
    result = decaf_lora.merge_adapters(adapters, WEIGHTS, rank, out_dir=out)
    assert result.out_dir == out and sorted(os.listdir(out))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    fits, _, heads = reference(adapters, WEIGHTS, rank)

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tok(
        ["a merged adapter", "loads with plain PEFT", "and gives these logits"], padding=True, return_tensors="pt"
    )
    model = PeftModel.from_pretrained(_quiet_load(seq_base), out).eval()
    hand = _quiet_load(seq_base).double().eval()
    with torch.no_grad():
        for name, fit in fits.items():
            hand.get_submodule(name).weight += fit
        for key, value in heads.items():
            hand.get_submodule(key[len(PREFIX) :].rsplit(".", 1)[0]).get_parameter(key.rsplit(".", 1)[1]).copy_(value)
        got, want = model(**batch).logits.double(), hand(**batch).logits
    assert (got - want).abs().max() <= 1e-4
    # and the merge changed the model: the base alone gives other logits
    with torch.no_grad():
        assert (_quiet_load(seq_base).eval()(**batch).logits.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("rank", [1, 3, None])
def test_merged_products_match_the_dense_float64_best_fit(adapters, tmp_path, rank):
    """(b) per layer, scale * B A of the written adapter is TSVD_R of the weighted sum of scaled products."""
    out = str(tmp_path / "merged")
    result = decaf_lora.merge_adapters(adapters, WEIGHTS, rank, out_dir=out)
    R = 6 if rank is None else rank  # the default: the largest input rank (SPECS: 4, 2, 6)
    assert result.rank == R
    _, cfg = read(out)
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["rank_pattern"]) == (R, R, False, {})
    fits, tails, _ = reference(adapters, WEIGHTS, R)
    got = merged_products(out)
    assert got.keys() == fits.keys() and len(fits) == 13
    for name, fit in fits.items():
        assert rel(got[name], fit) <= 1e-5, name
    for layer in result.layers:
        assert layer.tail == pytest.approx(tails[layer.name], rel=1e-6, abs=1e-9)
        assert layer.tail > 1e-3  # rank <= 6 < 4 + 2 + 6: something is really discarded
        assert 0 < layer.relative_tail < 1


def test_a_rank_covering_every_input_is_exact(adapters):
    """With R >= sum of input ranks the merge loses nothing: tails vanish and products equal the full sum."""
    result = decaf_lora.merge_adapters(adapters, WEIGHTS, rank=12)
    fits, _, _ = reference(adapters, WEIGHTS, rank=16)  # 16 = min(d, k): the untruncated sum
    for layer in result.layers:
        key = PREFIX + layer.name
        product = (
            result.state_dict[f"{key}.lora_B.weight"].double() @ result.state_dict[f"{key}.lora_A.weight"].double()
        )
        assert rel(product, fits[layer.name]) <= 1e-5
        assert layer.tail <= 1e-5 * layer.norm


def test_in_memory_state_dicts_give_the_same_merge(seq_base, adapters):
    """(state_dict, config) pairs, as get_peft_model_state_dict returns them, merge like the directories."""
    import peft

    pairs = []
    for path in adapters:
        model = peft.PeftModel.from_pretrained(_quiet_load(seq_base), path)
        pairs.append((peft.get_peft_model_state_dict(model), model.peft_config["default"]))
    from_memory = decaf_lora.merge_adapters(pairs, WEIGHTS, 4)
    from_dirs = decaf_lora.merge_adapters(adapters, WEIGHTS, 4)
    assert from_memory.out_dir is None and from_memory.state_dict.keys() == from_dirs.state_dict.keys()
    for key, value in from_dirs.state_dict.items():
        if ".lora_A." in key:
            b = key.replace(".lora_A.", ".lora_B.")
            mem = from_memory.state_dict[b].double() @ from_memory.state_dict[key].double()
            assert rel(mem, from_dirs.state_dict[b].double() @ value.double()) <= 1e-6
    # the plain dict of an adapter_config.json works too
    sd, cfg = read(adapters[0])
    assert decaf_lora.merge_adapters([(sd, cfg)]).rank == 4


def test_merging_an_adapter_with_itself_returns_it(adapters):
    """Weights are normalised: [1, 3] of one adapter twice is that adapter (product, head), at its own rank."""
    result = decaf_lora.merge_adapters([adapters[0], adapters[0]], [1, 3])
    assert result.weights == (0.25, 0.75) and result.rank == 4
    original = merged_products(adapters[0])
    sd, _ = read(adapters[0])
    for layer in result.layers:
        key = PREFIX + layer.name
        product = (
            result.state_dict[f"{key}.lora_B.weight"].double() @ result.state_dict[f"{key}.lora_A.weight"].double()
        )
        assert rel(product, original[layer.name]) <= 1e-6
        assert layer.tail <= 1e-6 * layer.norm
    assert torch.allclose(result.state_dict[PREFIX + "classifier.weight"], sd[PREFIX + "classifier.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_input_dtype_is_kept_and_written(adapters, tmp_path, dtype):
    """bf16 inputs give bf16 factors and float64 inputs float64 ones; the arithmetic is float64 either way."""
    pairs = []
    for path in adapters:
        sd, cfg = read(path)
        pairs.append(({k: v.to(dtype) for k, v in sd.items()}, cfg))
    result = decaf_lora.merge_adapters(pairs, WEIGHTS, 3, out_dir=str(tmp_path / "merged"))
    assert {v.dtype for v in result.state_dict.values()} == {dtype}
    fits, _, _ = reference(adapters, WEIGHTS, 3)
    got = merged_products(str(tmp_path / "merged"))
    tol = 1e-5 if dtype == torch.float64 else 2e-2  # bf16 inputs and outputs carry 8 bits of mantissa
    assert max(rel(got[name], fit) for name, fit in fits.items()) <= tol


def test_a_default_rank_above_a_layer_size_pads_that_layer(seq_base, tmp_path):
    """PEFT accepts r = 20 on 16-wide layers; merging such adapters keeps r = 20 with zero directions, exactly."""
    from peft import PeftModel

    wide = make_adapter(seq_base, str(tmp_path / "r20"), 3, heads=False, r=20, lora_alpha=10)
    out = str(tmp_path / "merged")
    result = decaf_lora.merge_adapters([wide, wide], out_dir=out)
    assert result.rank == 20
    original, got = merged_products(wide), merged_products(out)
    assert max(rel(got[name], product) for name, product in original.items()) <= 1e-6
    PeftModel.from_pretrained(_quiet_load(seq_base), out)


def test_heads_are_averaged_with_the_merge_weights(seq_base, adapters, tmp_path):
    """(d) the classifier (modules_to_save) of the merge is the weighted mean of the inputs' classifiers."""
    from peft import PeftModel

    out = str(tmp_path / "merged")
    result = decaf_lora.merge_adapters(adapters, WEIGHTS, out_dir=out)
    assert result.heads == ["classifier"]
    _, _, heads = reference(adapters, WEIGHTS, 1)
    assert set(heads) == {PREFIX + "classifier.weight", PREFIX + "classifier.bias"}
    model = PeftModel.from_pretrained(_quiet_load(seq_base), out)
    loaded = model.base_model.model.classifier.modules_to_save["default"]
    for key, want in heads.items():
        assert torch.allclose(result.state_dict[key].double(), want, atol=1e-6)
        assert torch.allclose(getattr(loaded, key.rsplit(".", 1)[1]).double(), want, atol=1e-6)
    inputs = [read(p)[0][PREFIX + "classifier.weight"] for p in adapters]
    assert min((result.state_dict[PREFIX + "classifier.weight"] - h).abs().max() for h in inputs) > 1e-2


@pytest.mark.parametrize("first", ["plain", "rslora"])
def test_agrees_with_peft_add_weighted_adapter_svd(seq_base, lora_only, first):
    """(c) PEFT's own ``add_weighted_adapter(..., combination_type="svd")`` and ours give the same merged product.

    How PEFT does it (peft/tuners/lora/model.py): per layer it forms ``sum_j w_j get_delta_weight(j)`` densely,
    where ``get_delta_weight`` includes each adapter's scale (alpha / r or alpha / sqrt(r), per module), takes a
    full ``torch.linalg.svd`` and stores ``B = U S``, ``A = Vh`` with rank ``svd_rank`` or, by default, the largest
    input rank (``rank_pattern`` included) -- the same default as ours. Two convention differences are bridged:

    * weights: PEFT uses them raw (a task-arithmetic sum); ours are normalised to sum 1, so PEFT gets the
      normalised weights here;
    * scale: PEFT writes the merged adapter's config as a copy of the FIRST adapter's with ``r = lora_alpha = R``,
      so its scale is 1 as ours is -- unless that first adapter uses rsLoRA: then PEFT keeps ``use_rslora=True``
      and applies ``R / sqrt(R)`` to the product it computed. With a plain adapter first we compare the deltas
      PEFT's merged adapter applies; with the rsLoRA adapter first we compare what PEFT's SVD computed (its stored
      ``B A``), which is the same mathematics, and our adapter's scale stays 1 regardless of order.

    Heads are left out: PEFT refuses to merge several adapters that each have ``modules_to_save``.
    """
    import peft
    from peft.tuners.lora import LoraLayer

    order = sorted(range(3), key=lambda i: SPECS[i][0] != first)
    paths = [lora_only[i] for i in order]
    w = [WEIGHTS[i] / sum(WEIGHTS) for i in order]
    model = peft.PeftModel.from_pretrained(_quiet_load(seq_base), paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.add_weighted_adapter(["a0", "a1", "a2"], w, "merged", combination_type="svd")
    ours = decaf_lora.merge_adapters(paths, w)
    assert ours.rank == model.peft_config["merged"].r == 6

    compared = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            key = PREFIX + name
            mine = ours.state_dict[f"{key}.lora_B.weight"].double() @ ours.state_dict[f"{key}.lora_A.weight"].double()
            if first == "plain":
                theirs = module.get_delta_weight("merged").double()
            else:
                theirs = module.lora_B["merged"].weight.double() @ module.lora_A["merged"].weight.double()
            assert rel(mine, theirs) <= 1e-5, name
            compared += 1
    assert compared == len(ours.layers) == 13


def test_never_forms_the_dense_matrix(adapters, monkeypatch):
    """The merge's SVDs are of small cores, never of a d x k layer-sized matrix."""
    seen = []
    real_svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    result = decaf_lora.merge_adapters(adapters[:2], rank=2)  # ranks 4 + 2: cores at most 6 x 6
    layer_shapes = {layer.shape for layer in result.layers}
    assert not layer_shapes & set(seen) and all(max(s) <= 6 for s in seen)


def test_overwrite_replaces_only_a_previous_merge(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty directory is fine
    decaf_lora.merge_adapters(adapters, rank=2, out_dir=str(out))
    with pytest.raises(DecafError, match="not empty"):
        decaf_lora.merge_adapters(adapters, rank=3, out_dir=str(out))
    assert read(str(out))[1]["r"] == 2
    decaf_lora.merge_adapters(adapters, rank=3, out_dir=str(out), overwrite=True)
    assert read(str(out))[1]["r"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".merge")]  # no temporary directory left behind
    assert (out.stat().st_mode & 0o777) == 0o777 & ~current_umask()  # an ordinary folder, not mkdtemp's 0700

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "adapter_config.json").write_text("{}")
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DecafError, match="not the output of a previous merge"):
        decaf_lora.merge_adapters(adapters, out_dir=str(precious), overwrite=True)
    assert sorted(os.listdir(precious)) == ["adapter_config.json", "notes.txt"]
    with pytest.raises(DecafError, match="not the output of a previous merge"):  # a user's own adapter, README and all
        decaf_lora.merge_adapters(adapters[:2], out_dir=adapters[2], overwrite=True)
    with pytest.raises(DecafError, match="one of the input adapters"):
        decaf_lora.merge_adapters(adapters, out_dir=adapters[0], overwrite=True)


# ------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad(seq_base, adapters, tmp_path_factory):
    """Adapter directories that must be refused, each built from a good one or with PEFT."""
    root = tmp_path_factory.mktemp("bad")

    def edited(name, **changes):
        path = root / name
        shutil.copytree(adapters[1], path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        return str(path)

    bin_only = root / "bin-only"
    bin_only.mkdir()
    shutil.copy(os.path.join(adapters[0], "adapter_config.json"), bin_only)
    (bin_only / "adapter_model.bin").write_bytes(b"not a pickle: decaf must refuse before any unpickling")

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    wide = str(root / "wide-base")
    cfg = BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    BertForSequenceClassification(cfg).save_pretrained(wide)
    wide_adapter = make_adapter(wide, str(root / "wide"), 5, r=2, lora_alpha=4)
    with open(os.path.join(wide_adapter, "adapter_config.json")) as fh:
        wide_cfg = json.load(fh)
    wide_cfg["base_model_name_or_path"] = seq_base  # claims the same base: only the shapes give it away
    with open(os.path.join(wide_adapter, "adapter_config.json"), "w") as fh:
        json.dump(wide_cfg, fh)

    from safetensors.torch import load_file, save_file

    inf_factor = root / "inf-factor"
    shutil.copytree(adapters[1], inf_factor)
    tensors = load_file(inf_factor / "adapter_model.safetensors")
    first_a = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[first_a][0, 0] = float("inf")
    save_file(tensors, inf_factor / "adapter_model.safetensors")

    return {
        "alpha_list": edited("alpha-list", alpha_pattern=[1, 2]),
        "alpha_string": edited("alpha-string", lora_alpha="8"),
        "alpha_nan": edited("alpha-nan", lora_alpha=float("nan")),
        "rank_pattern_float": edited("rank-pattern-float", rank_pattern={"query": 2.5}),
        "inf_factor": str(inf_factor),
        "missing": str(root / "no-such-adapter"),
        "bin_only": str(bin_only),
        "other_base": edited("other-base", base_model_name_or_path="someone/another-model"),
        "other_task": edited("other-task", task_type="TOKEN_CLS"),
        "other_targets": make_adapter(seq_base, str(root / "qv"), 6, targets=["query", "value"], r=2, lora_alpha=4),
        "other_shapes": wide_adapter,
        "dora": make_adapter(seq_base, str(root / "dora"), 7, r=2, lora_alpha=4, use_dora=True),
    }


BAD_CASES = {
    # id: (adapters from the good ones / the bad ones, keyword arguments, a fragment of the one sentence)
    "missing dir": (lambda g, b: [g[0], b["missing"]], {}, "does not exist"),
    ".bin-only dir": (lambda g, b: [g[0], b["bin_only"]], {}, "holds only adapter_model.bin"),
    "different base models": (lambda g, b: [g[0], b["other_base"]], {}, "base_model_name_or_path="),
    "different task types": (lambda g, b: [g[0], b["other_task"]], {}, "task_type="),
    "different target modules": (lambda g, b: [g[0], b["other_targets"]], {}, "same target modules"),
    "different shapes": (lambda g, b: [g[0], b["other_shapes"]], {}, "is 24 x 24 in adapter"),
    "DoRA": (lambda g, b: [g[0], b["dora"]], {}, "use_dora=True"),
    "alpha_pattern a list": (lambda g, b: [g[0], b["alpha_list"]], {}, "alpha_pattern"),
    "lora_alpha a string": (lambda g, b: [g[0], b["alpha_string"]], {}, "lora_alpha='8'"),
    "lora_alpha NaN": (lambda g, b: [g[0], b["alpha_nan"]], {}, "lora_alpha=nan"),
    "rank_pattern a float": (lambda g, b: [g[0], b["rank_pattern_float"]], {}, "rank_pattern"),
    "infinite factor": (lambda g, b: [g[0], b["inf_factor"]], {}, "NaN or infinite values"),
    "weights summing past the largest float": (lambda g, b: g, {"weights": [1e308, 1e308, 1]}, "largest float"),
    "negative weight": (lambda g, b: g, {"weights": [1, -1, 1]}, "negative value"),
    "NaN weight": (lambda g, b: g, {"weights": [1, float("nan"), 1]}, "non-finite"),
    "wrong number of weights": (lambda g, b: g, {"weights": [1, 1]}, "weights has 2 values but 3 adapters"),
    "zero weights": (lambda g, b: g, {"weights": [0, 0, 0]}, "sum to 0"),
    "rank 0": (lambda g, b: g, {"rank": 0}, "rank=0 is invalid"),
    "rank above min(d, k)": (lambda g, b: g, {"rank": 17}, "exceeds min(d, k)=16"),
    "no adapters": (lambda g, b: [], {}, "non-empty list"),
    "not a pair": (lambda g, b: [{"a": 1}], {}, "(state_dict, config) pair"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_give_one_sentence(adapters, bad, tmp_path, case):
    """(e) each mistake is one DecafError sentence naming what is wrong, and nothing is written."""
    make_inputs, kwargs, fragment = BAD_CASES[case]
    out = tmp_path / "merged"
    with pytest.raises(DecafError) as info:
        decaf_lora.merge_adapters(make_inputs(adapters, bad), out_dir=str(out), **kwargs)
    msg = str(info.value)
    assert fragment in msg and one_sentence(msg), msg
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".merge")]


def test_an_out_dir_that_is_a_link_is_refused_before_the_merge(adapters, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(DecafError, match="is a symbolic link"):
        decaf_lora.merge_adapters(adapters, out_dir=str(tmp_path / "link"))
    assert os.listdir(target) == [] and os.path.islink(tmp_path / "link")


def test_a_non_empty_out_dir_is_refused_and_left_alone(adapters, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(DecafError) as info:
        decaf_lora.merge_adapters(adapters, out_dir=str(out))
    assert "exists and is not empty" in str(info.value) and one_sentence(str(info.value))
    assert os.listdir(out) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_merges_and_prints_the_tail_table(seq_base, adapters, tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel

    from decaf_lora.cli import main

    out = str(tmp_path / "merged")
    res = CliRunner().invoke(main, ["merge", *adapters, "--out", out, "--weights", "1,2,1", "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "bert.encoder.layer.1.attention.self.query" in res.stdout and "tail/||M||" in res.stdout
    assert "heads averaged: classifier" in res.stdout and f"wrote PEFT adapter to {out}" in res.stdout
    PeftModel.from_pretrained(_quiet_load(seq_base), out)
    expected = decaf_lora.merge_adapters(adapters, WEIGHTS, 4)
    assert format_report(expected) in res.stdout


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--weights", "1,-2,1"], "negative value"),
        (["--weights", "1,two,1"], "comma-separated list of numbers"),
        (["--rank", "0"], "rank=0 is invalid"),
    ],
)
def test_cli_errors_exit_2_without_traceback(adapters, tmp_path, extra, fragment):
    from click.testing import CliRunner

    from decaf_lora.cli import main

    res = CliRunner().invoke(main, ["merge", *adapters, "--out", str(tmp_path / "m"), *extra])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.output


def test_cli_refuses_a_bin_only_dir(adapters, bad, tmp_path):
    from click.testing import CliRunner

    from decaf_lora.cli import main

    res = CliRunner().invoke(main, ["merge", adapters[0], bad["bin_only"], "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.startswith("error: ") and "adapter_model.bin" in res.stderr
