"""Matrix-product FLOPs of the exact model: the count the benchmarks' MFU and the sizing reports use.

The band counts ``2w + 1`` keys per query (what the model needs, not what an implementation
computes); global tokens add their columns to every query and their rows over every key, and the
global queries meet every key at the cheaper of the two exact formulations: projecting the global
keys and values of the whole sequence (HF's way) or folding those projections into the ``G`` queries
(this project's way while ``H G < E + G``). A train step costs three forward passes (the backward
pass does two products per forward one).
"""

from __future__ import annotations


def encoder_layer_flops(
    *, hidden: int, intermediate: int, heads: int, length: int, window: int, globals_: int, dense: bool = False
) -> float:
    """Forward FLOPs of one encoder layer over one row of ``length`` tokens.

    ``window``: the full attention window (one side ``window // 2``); ``globals_``: global tokens per row;
    ``dense``: plain O(L^2) attention of the same sizes instead, without the global projections."""
    E, F, L, G = hidden, intermediate, length, globals_
    w = window // 2
    per_layer = 2 * L * E * E * 4 + 2 * L * E * F * 2  # q, k, v, output; feed-forward
    if dense:
        return float(per_layer + 2 * 2 * L * L * E)
    per_layer += 2 * 2 * L * (2 * w + 1) * E  # band scores and values
    if G:
        H = heads
        per_layer += 2 * G * E * E  # query_global
        per_layer += 2 * 2 * L * G * E  # global columns of every query
        projected = 2 * L * E * E * 2 + 2 * 2 * G * L * E  # key_global, value_global; scores, values
        folded = 2 * 2 * H * G * E * L + 2 * 2 * H * G * E * (E // H)  # (H G) x E x L twice; fold, unfold
        per_layer += min(projected, folded)  # global queries over every key
    return float(per_layer)


def mlm_head_flops(*, hidden: int, vocab_size: int, tokens: float) -> float:
    """Forward FLOPs of the masked-LM head (dense, decoder) at ``tokens`` positions."""
    return float(2 * tokens * (hidden * hidden + hidden * vocab_size))


def model_flops_per_step(config, *, rows: int, length: int, globals_: int, head_tokens_per_row: float = 0.0) -> float:
    """FLOPs of one train step of ``rows`` rows: 3 x (every layer's forward + the masked-LM head at
    ``head_tokens_per_row`` positions of each row). ``config``: a ``LongformerConfig``."""
    layers = sum(
        encoder_layer_flops(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            length=length,
            window=window,
            globals_=globals_,
        )
        for window in config.attention_windows
    )
    head = mlm_head_flops(hidden=config.hidden_size, vocab_size=config.vocab_size, tokens=head_tokens_per_row)
    return 3.0 * rows * (layers + head)


__all__ = ["encoder_layer_flops", "mlm_head_flops", "model_flops_per_step"]
