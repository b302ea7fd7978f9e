"""FastGen (Ge et al., ICLR 2024) adaptive per-head KV compression, on top of KIVI.

``policy``: the policies, token classes and the choice per KV head; ``profile``: the
chunked profiler (never materialises the prompt's full attention matrix);
``attention``: per-head attention over kept tokens and KIVI storage of kept tokens.
The design for vLLM is in ``docs/fastgen.md``.
"""

from kivi_vllm.fastgen.attention import attend_kept, kept_indices, kivi_kept_kv
from kivi_vllm.fastgen.policy import POLICY_NAMES, Policy, TokenClasses, choose_policies
from kivi_vllm.fastgen.profile import HeadProfile, profile_attention, profile_heads

__all__ = [
    "POLICY_NAMES",
    "HeadProfile",
    "Policy",
    "TokenClasses",
    "attend_kept",
    "choose_policies",
    "kept_indices",
    "kivi_kept_kv",
    "profile_attention",
    "profile_heads",
]
