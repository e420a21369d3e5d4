"""`python -m convert`: lists the conversion programs."""

import sys

COMMANDS = {
    "hf_to_flax": "Hugging Face (PyTorch) Longformer -> Flax checkpoint (Orbax params + config + tokenizer)",
    "flax_to_hf": "Flax checkpoint / HF dir / pretraining run -> HF dir (config.json, model.safetensors)",
    "roberta_to_longformer": "RoBERTa -> long Longformer (positions copied in repeats, global q/k/v copied); "
    "a Longformer -> a longer one",
    "export": "a model -> serving artifacts (jax.export programs per length bucket, ONNX, manifest) for "
    "longformer_jax.load_exported",
    "fill_mask": "top-k fillers of <mask> tokens with a masked-LM model",
}


def main() -> int:
    print("usage: python -m convert.<command> --help\n")
    for name, text in COMMANDS.items():
        print(f"  {name:<24}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
