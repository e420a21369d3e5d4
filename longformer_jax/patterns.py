"""Pictures of the attention patterns, probed from the attention module the model runs.

The one home of "which keys does each query attend" as data and as pictures:

- :func:`attention_pattern` returns the boolean (B, H, L, L) pattern of one layer of a config for
  given masks. It is not a drawing of the rule: it runs the model's own
  :class:`~longformer_jax.modeling.LongformerSelfAttention` (the band, the global columns, the global
  rows, as the model calls them) with parameters that turn it into a probe: every query is zero (all
  the keys a query may attend get the same score) and the values are one-hot in the key position, so
  the output of query ``i`` is its row of attention probabilities, and key ``j`` is attended exactly
  where that probability is non-zero.
- ``python -m longformer_jax.patterns --out docs/patterns`` draws the patterns (two-sided band,
  dilated, dilated on some heads, causal, global rows and columns, padding) as PNG files.

The dense statement of the same patterns is ``attention.attention_pattern_mask``; the tests check that
both agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from longformer_jax import attention as attn
from longformer_jax.config import LongformerConfig
from longformer_jax.inputs import prepare_inputs
from longformer_jax.modeling import LongformerSelfAttention


def _probe_params(E: int) -> dict[str, Any]:
    """Self-attention parameters of the probe: zero queries, one-hot values (identity projections)."""
    zero = {"kernel": jnp.zeros((E, E)), "bias": jnp.zeros((E,))}
    ident = {"kernel": jnp.eye(E), "bias": jnp.zeros((E,))}
    return {"query": zero, "key": zero, "value": ident, "query_global": zero, "key_global": zero, "value_global": ident}


def attention_pattern(
    config: LongformerConfig,
    attention_mask=None,
    global_attention_mask=None,
    *,
    length: int | None = None,
    layer: int = 0,
) -> np.ndarray:
    """(B, H, L, L) bool: whether query ``i`` of head ``h`` attends key ``j`` in ``layer`` of ``config``.

    Args:
        config: the model's config (its window, dilation and causal setting of ``layer`` are used).
        attention_mask: (B, L), 1 keep and 0 pad; all ones when None.
        global_attention_mask: (B, L), 1 global; none when None.
        length: L when both masks are None.
        layer: the layer whose pattern is probed.

    Returns:
        The pattern of the input's own length (the padding ``prepare_inputs`` adds is cut off), probed
        from the attention module the model runs (see the module docstring). A pad query attends nothing.
    """
    if attention_mask is None and global_attention_mask is None:
        if length is None:
            raise ValueError("attention_pattern: pass attention_mask, global_attention_mask or length.")
        attention_mask = np.ones((1, length), np.int32)
    shape = np.shape(attention_mask if attention_mask is not None else global_attention_mask)
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"layer={layer} is not a layer of this model (0 .. {config.num_hidden_layers - 1}).")
    x = prepare_inputs(config, np.zeros(shape, np.int32), attention_mask, global_attention_mask)
    B, Lp = x.mask.shape
    H = config.num_attention_heads
    # A model whose head width is the padded length: the values of token j are the one-hot vector e_j.
    probe = dataclasses.replace(
        config, hidden_size=H * Lp, dtype="float32", attention_implementation="blocked", scan_layers=False
    )
    module = LongformerSelfAttention(
        probe, config.attention_windows[layer], attention_dilation=config.attention_dilations[layer]
    )
    h_BxLxE = jnp.tile(jnp.eye(Lp, dtype=jnp.float32)[None], (B, 1, H))
    slots = attn.global_slots(x.mask == 2, x.num_global_slots)
    out, _, _ = jax.jit(module.apply)({"params": _probe_params(H * Lp)}, h_BxLxE, x.mask, slots)
    p_BxHxLxL = np.asarray(out).reshape(B, Lp, H, Lp).transpose(0, 2, 1, 3)
    L = x.length
    return p_BxHxLxL[:, :, :L, :L] > 0


# ---------------------------------------------------------------------------------------- the pictures
@dataclasses.dataclass(frozen=True)
class Picture:
    """One picture: a file name, a title, the config's pattern settings and the tokens' kinds."""

    name: str
    title: str
    window: int = 8
    heads: int = 1
    dilation: Any = 1
    causal: bool = False
    global_tokens: tuple[int, ...] = ()
    pad_from: int | None = None  # positions from here on are padding


def pictures(length: int) -> list[Picture]:
    """The patterns the program draws, for sequences of ``length`` tokens."""
    g = (4, length // 2 + 8)
    return [
        Picture("band", "two-sided band (window 8: w = 4 keys each side)"),
        Picture("dilated", "dilated band (dilation 2: keys i + 2k, k = -4..4)", dilation=2),
        Picture("dilated_per_head", "dilation per head (1, 2, 4, 8)", heads=4, dilation=((1, 2, 4, 8),)),
        Picture("causal", "causal band (keys i - 4 .. i)", causal=True),
        Picture("global", f"band + global tokens {g[0]} and {g[1]} (rows and columns)", global_tokens=g),
        Picture("causal_global", f"causal band + global tokens {g[0]} and {g[1]}", causal=True, global_tokens=g),
        Picture(
            "padding",
            f"band + global token 4, padding from {length - length // 4}",
            global_tokens=(4,),
            pad_from=length - length // 4,
        ),
    ]


def picture_pattern(p: Picture, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(pattern (H, L, L) bool from :func:`attention_pattern`, merged mask (L,): 0 pad, 1 local, 2 global)."""
    config = LongformerConfig(
        vocab_size=8,
        hidden_size=p.heads,
        num_hidden_layers=1,
        num_attention_heads=p.heads,
        intermediate_size=1,
        attention_window=p.window,
        max_position_embeddings=length + 2,
        attention_dilation=p.dilation,
        causal_attention=p.causal,
    )
    am = np.ones((1, length), np.int32)
    if p.pad_from is not None:
        am[0, p.pad_from :] = 0
    gm = np.zeros((1, length), np.int32)
    gm[0, list(p.global_tokens)] = 1
    return attention_pattern(config, am, gm)[0], am[0] * (gm[0] + 1)


def draw(p: Picture, pattern_HxLxL: np.ndarray, mask_L: np.ndarray, path: Path) -> None:
    """One PNG: a panel per head, query rows down and key columns across; the band in blue, what global
    attention adds in orange, pad rows and columns grey."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    H, L, _ = pattern_HxLxL.shape
    is_global, is_pad = mask_L == 2, mask_L == 0
    fig = Figure(figsize=(3.0 * H + 0.4, 3.4), dpi=100)
    axes = fig.subplots(1, H, squeeze=False)[0]
    cmap = ListedColormap(["white", "#d9d9d9", "#1f77b4", "#ff7f0e"])
    for h, ax in enumerate(axes):
        img = np.where(is_pad[:, None] | is_pad[None, :], 1, 0)
        via_global = is_global[:, None] | is_global[None, :]
        img = np.where(pattern_HxLxL[h], np.where(via_global, 3, 2), img)
        ax.imshow(img, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_xticks([0, L - 1])
        ax.set_yticks([0, L - 1])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("key j", fontsize=7)
        if h == 0:
            ax.set_ylabel("query i", fontsize=7)
        if H > 1:
            ax.set_title(f"head {h}", fontsize=7)
    fig.suptitle(p.title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_pictures(out: str | Path, length: int = 64) -> list[Path]:
    """Draws every picture of :func:`pictures` into ``out`` (created); returns the files written."""
    if length <= 0 or length % 64:
        raise ValueError(
            f"--length {length}: give a positive multiple of 64 (the widest pattern: window 8 x dilation 8)."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in pictures(length):
        pattern, mask = picture_pattern(p, length)
        files.append(out / f"{p.name}.png")
        draw(p, pattern, mask, files[-1])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longformer_jax.patterns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory for the PNG files (created)")
    parser.add_argument("--length", type=int, default=64, help="sequence length of the pictures (a multiple of 64)")
    args = parser.parse_args(argv)
    try:
        files = write_pictures(args.out, args.length)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
