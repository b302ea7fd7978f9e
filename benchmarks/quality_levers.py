"""Offline study of levers beyond plain KIVI-2: fake quantization in a transformers forward.

The model runs in fp32 with an attention function that replaces each cached key/value
by its KIVI reconstruction (``kivi_vllm.reference.quantize``/``dequantize``) exactly
where the engine would read it from a page: query position ``p`` reads positions below
``max(0, floor(p / G) * G - (R - G))`` dequantized and the others exact. Windows and
scored tokens are the harness's (``kivi_vllm.quality.ppl_windows``). Levers:

* ``sink``: the first ``sink`` groups of the sequence stay exact (kept in full precision)
* ``residual``: a longer full-precision window
* ``outliers``: per page and head, the ``outliers`` key channels with the largest range
  in the group stay exact (fp16 values + a channel index byte each)
* ``hi_layers``: the first and last ``hi_layers`` layers at 4 bits
* ``hi_list``: these layers (negative: from the end) at 4 bits; ``hi_keys``: 4-bit keys
  only (values stay 2-bit) in the ``hi_layers``/``hi_list`` layers; ``hi_values``: 4-bit
  values only
* ``rotate``: keys multiplied by a normalized Hadamard matrix before quantization (and
  back after), an orthogonal rotation that spreads outlier channels
* ``rotate_seed``: with ``rotate``, the randomized Hadamard ``diag(+-1) @ H`` of
  ``reference.random_hadamard`` (signs from this seed) instead of the plain one
* ``rotate_values``: the same for values (per-token groups of G channels)
* ``value_group``: channels per value group (default: G)
* ``scale8``: scales rounded to the nearest float8 e4m3 (1 byte; mins stay float16, the
  codes are computed against the rounded scale and clamped; ``reference.quantize``)

With ``--passkey``, each lever also answers the harness's passkey trials
(``kivi_vllm.quality.passkey_trials``) teacher-forced on the exact model's greedy answer:
a trial is a hit when the exact answer contains the key and the lever's argmax equals it
at every position up to the key's last token (its greedy answer would be the same), and
``passkey_logp`` is the mean log-probability of those answer tokens over the exact hits.

    nice -n 10 .venv/bin/python benchmarks/quality_levers.py --model smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET = 4 * 1024**3  # capacity figures as in benchmarks/capacity.py: 4 GiB,
MAX_SEQS = 256  # max_num_seqs tails (+1 scratch slot)


@dataclass(frozen=True)
class Lever:
    bits: int = 2
    group: int = 32
    residual: int = 32
    sink: int = 0  # groups
    outliers: int = 0  # key channels per page and head
    hi_layers: int = 0  # first and last layers at 4 bits
    hi_list: tuple[int, ...] = ()  # these layers at 4 bits (negative: from the end)
    hi_keys: bool = False  # the 4-bit layers raise keys only
    hi_values: bool = False  # the 4-bit layers raise values only
    rotate: bool = False
    rotate_values: bool = False
    rotate_seed: int | None = None  # randomized Hadamard (with rotate)
    value_group: int = 0  # channels per value group (0: group)
    scale8: bool = False  # float8 e4m3 scales
    exact: bool = False  # no quantization at all (the fp32 reference)

    def __post_init__(self) -> None:
        if self.hi_keys and self.hi_values:
            raise ValueError("hi_keys and hi_values exclude each other (omit both: 4-bit keys "
                             "and values)")

    @property
    def name(self) -> str:
        if self.exact:
            return "fp32"
        s = f"kivi{self.bits}-g{self.group}-r{self.residual}"
        for key in ("sink", "outliers", "hi_layers"):
            if getattr(self, key):
                s += f"+{key}{getattr(self, key)}"
        if self.hi_list:
            s += "+hi" + ".".join(str(i) for i in self.hi_list)
        if self.hi_list or self.hi_layers:
            s += "k" if self.hi_keys else "v" if self.hi_values else ""
        if self.rotate:
            s += "+rotate" if self.rotate_seed is None else f"+rotate_s{self.rotate_seed}"
        s += "+rotv" if self.rotate_values else ""
        s += f"+vg{self.value_group}" if self.value_group else ""
        return s + ("+scale8" if self.scale8 else "")

    def is_hi(self, layer: int, layers: int) -> bool:
        """Whether ``layer`` (of ``layers``) is one of the 4-bit layers."""
        if layer < self.hi_layers or layer >= layers - self.hi_layers:
            return True
        return any(i % layers == layer for i in self.hi_list)

    def key_rotation(self, d: int) -> torch.Tensor | None:
        from kivi_vllm import reference

        if not self.rotate:
            return None
        if self.rotate_seed is None:
            return reference.hadamard(d)
        return reference.random_hadamard(d, self.rotate_seed)


def fake_kv(k: torch.Tensor, v: torch.Tensor, lv: Lever, kbits: int, vbits: int) -> tuple:
    """KIVI reconstruction of complete groups of k, v [b, h, t, d] (fp32)."""
    from kivi_vllm import reference

    g, d = lv.group, k.shape[-1]
    vgs = lv.value_group or g
    kh, vh = k.clone(), v.clone()
    rot = lv.key_rotation(d)
    rot_v = reference.hadamard(d) if lv.rotate_values else None
    for j in range(k.shape[2] // g):
        sl = slice(j * g, (j + 1) * g)
        kg = k[:, :, sl] @ rot if rot is not None else k[:, :, sl]
        kq = fake_quant(kg, 2, kbits, lv.scale8)
        if lv.outliers:
            rng = kg.amax(2, keepdim=True) - kg.amin(2, keepdim=True)
            top = rng.topk(lv.outliers, dim=-1).indices.expand(-1, -1, g, -1)
            kq.scatter_(-1, top, kg.half().float().gather(-1, top))
        kh[:, :, sl] = kq @ rot.T if rot is not None else kq
        vg = v[:, :, sl] @ rot_v if rot_v is not None else v[:, :, sl]
        vq = fake_quant(vg.unflatten(-1, (d // vgs, vgs)), -1, vbits, lv.scale8).flatten(-2)
        vh[:, :, sl] = vq @ rot_v.T if rot_v is not None else vq
    return kh, vh


def fake_quant(x: torch.Tensor, dim: int, bits: int, scale8: bool) -> torch.Tensor:
    """KIVI reconstruction of ``x`` with one (scale, min) per slice along ``dim``."""
    from kivi_vllm import reference

    return reference.dequantize(*reference.quantize(x, dim, bits, fp8_scale=scale8))


_STATE: dict[str, Any] = {}


def sim_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    lv: Lever = _STATE["lever"]
    _, hq, t, _ = query.shape
    q, k, v = query.float(), key.float(), value.float()
    pos = torch.arange(t)
    causal = pos[None, :] > pos[:, None]
    rep = hq // k.shape[1]
    if lv.exact:
        use_hat = torch.zeros(t, t, dtype=torch.bool)
        kh, vh = k, v
    else:
        layer, layers = module.layer_idx, _STATE["layers"]
        hi = lv.is_hi(layer, layers)
        kh, vh = fake_kv(k, v, lv, 4 if hi and not lv.hi_values else lv.bits,
                         4 if hi and not lv.hi_keys else lv.bits)
        g = lv.group
        bound = torch.clamp(pos // g * g - (lv.residual - g), min=0)
        use_hat = (pos[None, :] < bound[:, None]) & (pos[None, :] >= lv.sink * g)
    k, v, kh, vh = (x.repeat_interleave(rep, 1) for x in (k, v, kh, vh))
    scores = torch.where(use_hat, q @ kh.transpose(-1, -2), q @ k.transpose(-1, -2))
    probs = torch.softmax((scores * scaling).masked_fill(causal, float("-inf")), -1)
    out = (probs * use_hat) @ vh + (probs * ~use_hat) @ v
    errors = _STATE.get("errors")
    if errors is not None and not lv.exact:  # this layer's error on the scored positions
        exact = torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(causal, -torch.inf),
                              -1) @ v
        sl = slice(-_STATE["scored"], None)
        err = (out[:, :, sl] - exact[:, :, sl]).norm() / exact[:, :, sl].norm()
        errors.setdefault(module.layer_idx, []).append(err.item())
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def cost(lv: Lever, hf: Any) -> dict[str, float]:
    """Page bytes per token (all layers) and the token capacity vs bf16 at 4 GiB with
    256 sequences' full-precision tails (residual + sink groups) carved out."""
    from kivi_vllm.page_format import PageFormat, bf16_bytes_per_token

    heads, layers = hf.num_key_value_heads, hf.num_hidden_layers
    d = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    bf16 = bf16_bytes_per_token(heads, d) * layers
    if lv.exact:
        return {"bytes_per_token": bf16, "capacity_vs_bf16": 1.0}
    lo = PageFormat(lv.bits, lv.group, d, heads).bytes_per_token
    hi = PageFormat(4, lv.group, d, heads).bytes_per_token
    n_hi = sum(lv.is_hi(i, layers) for i in range(layers))
    # key and value codes have the same size
    extra_hi = (hi - lo) / 2 if lv.hi_keys or lv.hi_values else hi - lo
    per_layer_extra = heads * lv.outliers * (2 + 1 / lv.group)  # fp16 values + index byte
    vgs, s = lv.value_group or lv.group, 1 if lv.scale8 else 2  # scale bytes
    meta_saved = heads * (4 * d / lv.group * 2 - d * (2 + s) / lv.group - d / vgs * (2 + s))
    pages = (lo - meta_saved) * layers + extra_hi * n_hi + per_layer_extra * layers
    tail_tokens = lv.residual + lv.sink * lv.group
    tails = (MAX_SEQS + 1) * tail_tokens * bf16
    return {
        "bytes_per_token": pages,
        "capacity_vs_bf16": ((BUDGET - tails) / pages) / (BUDGET / bf16),
    }


LEVERS = [
    Lever(exact=True),
    Lever(),
    Lever(sink=1),
    Lever(residual=64),
    Lever(sink=1, residual=64),
    Lever(outliers=4),
    Lever(rotate=True),
    Lever(hi_layers=1),
    Lever(bits=4),
    Lever(residual=128),
    # combinations (G32; tails = residual + sink groups: 96 tokens keep >= 4.5x bf16)
    Lever(sink=1, residual=64, rotate=True),
    Lever(sink=1, rotate=True),
    Lever(sink=2),
    Lever(sink=1, outliers=1),
    Lever(sink=1, outliers=2),
    Lever(sink=1, residual=96, rotate=True),
    Lever(sink=2, rotate=True),
    Lever(sink=1, outliers=1, rotate=True),
    Lever(sink=1, outliers=4),
    Lever(sink=1, residual=64, rotate=True, rotate_values=True),
    # randomized Hadamard (seeds 0-4) and 4-bit first/last layers with sink + rotation
    *(Lever(sink=1, residual=64, rotate=True, rotate_seed=s) for s in range(5)),
    Lever(sink=1, residual=64, rotate=True, hi_layers=1),
    Lever(sink=1, residual=64, rotate=True, hi_layers=2),
    Lever(sink=1, rotate=True, hi_layers=1),
    Lever(sink=1, residual=96, rotate=True, rotate_seed=0),
    # 4-bit for the layers with the largest attention-output error (--layer-errors)
    Lever(sink=1, residual=64, rotate=True, hi_list=(18,)),
    Lever(sink=1, residual=64, rotate=True, hi_list=(18, 20), hi_keys=True),
    Lever(sink=1, residual=64, rotate=True, hi_list=(7, 8, 18, 20)),
    Lever(sink=1, residual=64, rotate=True, hi_list=(0,)),
    Lever(sink=1, residual=64, rotate=True, hi_list=(0, 18), hi_keys=True),
]


def passkey_reference(path: str, tok: Any, trials: list) -> list[dict[str, Any]]:
    """The exact (fp32, sdpa) model's greedy answers (8 tokens) and how many of their
    tokens it takes to spell the key (0: the answer misses it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    refs = []
    with torch.inference_mode():
        for t in trials:
            out = model.generate(torch.tensor([t.prompt]), max_new_tokens=8, do_sample=False)
            ans = out[0, len(t.prompt):].tolist()
            need = next((n for n in range(1, len(ans) + 1) if t.key in tok.decode(ans[:n])), 0)
            refs.append({"answer": ans, "key_tokens": need})
    return refs


def passkey_scores(model: Any, trials: list, refs: list[dict[str, Any]]) -> dict[str, Any]:
    """Hits (the lever's argmax follows the exact answer through the key) and the mean
    log-probability of those answer tokens, over the trials the exact model gets right."""
    hits, logps = [], []
    with torch.inference_mode():
        for t, ref in zip(trials, refs, strict=True):
            n = ref["key_tokens"]
            if not n:
                hits.append(False)
                continue
            ans = ref["answer"][:n]
            res = model(torch.tensor([t.prompt + ans[:-1]]), logits_to_keep=n)
            lp = torch.log_softmax(res.logits[0].float(), -1)
            tgt = torch.tensor(ans)
            hits.append(bool((lp.argmax(-1) == tgt).all()))
            logps.append(lp.gather(1, tgt[:, None]).mean().item())
    return {"passkey_hits": sum(hits), "passkey_trials": len(hits),
            "passkey_logp": sum(logps) / max(len(logps), 1),
            "passkey_miss": [i for i, h in enumerate(hits) if not h]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-len", type=int, default=1152)
    p.add_argument("--scored", type=int, default=64)
    p.add_argument("--first-window", type=int, default=0,
                   help="skip this many windows (a held-out set: the next --windows)")
    p.add_argument("--layer-errors", action="store_true",
                   help="also record each layer's relative attention-output error on the "
                        "scored positions (vs the same layer's inputs unquantized)")
    p.add_argument("--only", default=None, help="comma-separated lever names")
    p.add_argument("--levers", default=None,
                   help='JSON list of Lever fields instead of the built-in list, e.g. '
                        '\'[{"sink": 1, "residual": 96, "rotate": true, "hi_list": [0]}]\'')
    p.add_argument("--passkey", action="store_true",
                   help="also score the harness's passkey trials (see module doc)")
    p.add_argument("--passkey-lengths", default="512,1024,1536,2048")
    p.add_argument("--passkey-depths", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--no-ppl", action="store_true", help="passkey only")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm import quality
    from kivi_vllm.models import ensure_model

    torch.set_num_threads(os.cpu_count() or 1)
    path = ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoConfig.from_pretrained(path)
    if getattr(hf, "sliding_window", 0) is None:  # Gemma 3 full-attention variant
        hf.sliding_window = args.window_len
    AttentionInterface.register("kivi_levers", sim_attention)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=hf, dtype=torch.float32, attn_implementation="kivi_levers"
    ).eval()
    _STATE["layers"] = hf.num_hidden_layers
    first = args.first_window
    windows = quality.ppl_windows(tok, first + args.windows, args.window_len)[first:]
    out = Path(args.out) if args.out else RESULTS / f"quality-levers-{args.model}.json"
    doc = json.loads(out.read_text()) if out.exists() else {"records": []}
    records = {r["name"]: r for r in doc["records"]}
    only = set(args.only.split(",")) if args.only else None
    levers = LEVERS
    if args.levers:
        levers = [Lever(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
                  for d in json.loads(args.levers)]
    trials: list = []
    if args.passkey:
        trials = quality.passkey_trials(
            tok, [int(x) for x in args.passkey_lengths.split(",")],
            [float(x) for x in args.passkey_depths.split(",")])
        setup = [args.passkey_lengths, args.passkey_depths]
        if doc.get("passkey_setup") != setup:
            doc.update(passkey_setup=setup, passkey_reference=passkey_reference(path, tok, trials))
            refs = doc["passkey_reference"]
            print(f"exact passkey: {sum(bool(r['key_tokens']) for r in refs)}/{len(refs)}",
                  flush=True)
    for lv in levers:
        if only and lv.name not in only:
            continue
        _STATE.update(lever=lv, scored=args.scored, errors={} if args.layer_errors else None)
        nll: list[float] = []
        with torch.inference_mode():
            for w in [] if args.no_ppl else windows:
                # logits of the last scored + 1 positions only (the others are unused)
                res = model(torch.tensor([w]), logits_to_keep=args.scored + 1)
                lp = torch.log_softmax(res.logits[0, :-1].float(), -1)
                tgt = torch.tensor(w[-args.scored :])
                nll += (-lp.gather(1, tgt[:, None])[:, 0]).tolist()
        rec = {**records.get(lv.name, {}), "name": lv.name, **asdict(lv), **cost(lv, hf)}
        if nll:
            rec.update(ppl=math.exp(sum(nll) / len(nll)), ppl_tokens=len(nll))
        if trials:
            rec.update(passkey_scores(model, trials, doc["passkey_reference"]))
        if _STATE["errors"]:
            errs = _STATE["errors"]
            rec["layer_errors"] = [sum(errs[i]) / len(errs[i]) for i in sorted(errs)]
            print("layer errors:", " ".join(f"{i}:{e:.3f}" for i, e in
                                            enumerate(rec["layer_errors"])), flush=True)
        records[lv.name] = rec
        base = records.get("fp32")
        for r in records.values():
            r["ppl_vs_fp32"] = r["ppl"] / base["ppl"] - 1 if base and "ppl" in r else None
        doc.update(
            model=args.model, windows=args.windows, first_window=first,
            window_len=args.window_len,
            scored=args.scored, records=list(records.values()),
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
        out.write_text(json.dumps(doc, indent=1) + "\n")
        ppl = (f"ppl {rec['ppl']:.3f} ({rec['ppl_vs_fp32']:+.1%} vs fp32)"
               if rec.get("ppl_vs_fp32") is not None else "")
        pk = (f"passkey {rec['passkey_hits']}/{rec['passkey_trials']} "
              f"logp {rec['passkey_logp']:.3f}" if "passkey_hits" in rec else "")
        print(f"{lv.name:40s} {ppl} {pk} {rec['bytes_per_token']:.0f} B/tok, "
              f"{rec['capacity_vs_bf16']:.2f}x bf16", flush=True)


if __name__ == "__main__":
    main()
